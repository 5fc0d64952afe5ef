"""Landsat from Google Earth Engine, streamed through xee straight into the cube.

The flow is plan -> collection -> xee -> cube -> chosen dates -> Zarr::

    plan = plan_pull(sensor="LANDSAT_8", start="2013-04-15", end="2013-08-31", bbox=(114.17, 30.48, 114.33, 30.62),
                     wrs_path=123, wrs_row=39)  # product="sr" for Collection 2 Level-2 surface reflectance
    print(plan.describe())                 # offline: CRS, grid, pixel count, expected store size
    pull_region(plan, "stores/wuhan.zarr")  # needs Earth Engine credentials

Only :func:`initialize_earthengine`, :func:`open_xee` and :func:`pull_region` reach the network; planning,
building the collection and :func:`xee_to_cube` work offline. ``ee`` and ``xee`` are imported inside the
functions that use them, so importing this module stays cheap.

What xee 0.1.2 returns (read from ``xee/ext.py`` and checked in the tests): one variable per Earth Engine band,
named by the band id, each with dims ``("time", "y", "x")``, dtype float32 whatever the band's type (masked
pixels become NaN); ``time`` is datetime64 from ``system:time_start``; ``y``/``x`` are pixel centres of
``crs_transform`` (``y`` decreasing for a north-up grid); each variable's attrs carry the band's Earth Engine
info plus ``crs``; its *encoding* carries ``scale_factor`` = the pixel size (not a CF scale: it must not reach
the store); the dataset attrs are the collection's properties.

Two products per sensor (Landsat 5 TM, 7 ETM+, 8 OLI, 9 OLI-2): ``"toa"``, Collection 2 Tier 1 TOA reflectance
(already scaled by Earth Engine), and ``"sr"``, Collection 2 Tier 1 Level-2 surface reflectance, whose digital
numbers are scaled here (:data:`SR_SCALE`, :data:`SR_OFFSET`). Landsat 7 scenes after the scan line corrector
failed (:data:`cmsn_cube.qa.SLC_FAILURE_DAY`) have stripes without data: they become gaps the reconstruction fills
like clouds (see :func:`cmsn_cube.qa.add_slc_off_gaps`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS, LANDSAT_SCALE_M, SENSOR_BANDS, make_cube, validate_cube
from cmsn_cube.exceptions import (
    BandMismatchError,
    DimensionError,
    EarthEngineError,
    MissingCRSError,
    MissingDateError,
    RegionError,
    TimeAxisError,
)
from cmsn_cube.extras import require
from cmsn_cube.qa import (
    DEFAULT_CLOUD_LEVELS,
    QA_BITS,
    SLC_FAILURE_DAY,
    add_cloud_mask,
    add_slc_off_gaps,
    cloud_fraction,
    select_dates,
    slc_off_dates,
)
from cmsn_cube.store import write_cube

if TYPE_CHECKING:  # pragma: no cover
    import ee

Sensor = Literal["LANDSAT_5", "LANDSAT_7", "LANDSAT_8", "LANDSAT_9"]

#: ``"toa"``: top-of-atmosphere reflectance; ``"sr"``: Level-2 surface reflectance.
Product = Literal["toa", "sr"]

#: ``(west, south, east, north)`` in degrees (EPSG:4326).
BBox = tuple[float, float, float, float]

#: ``(a, b, c, d, e, f)`` affine transform, GDAL/rasterio order: x scale, row rotation, x origin (left edge),
#: column rotation, y scale (negative: north up), y origin (top edge). The order xee's ``crs_transform`` takes.
Transform = tuple[float, float, float, float, float, float]

#: TOA collection per sensor. Source: Earth Engine data catalog, "USGS Landsat 5 TM / 7 ETM+ / 8 / 9 Collection 2
#: Tier 1 TOA Reflectance" (bands already scaled to reflectance).
COLLECTIONS: dict[str, str] = {
    "LANDSAT_5": "LANDSAT/LT05/C02/T1_TOA",
    "LANDSAT_7": "LANDSAT/LE07/C02/T1_TOA",
    "LANDSAT_8": "LANDSAT/LC08/C02/T1_TOA",
    "LANDSAT_9": "LANDSAT/LC09/C02/T1_TOA",
}

#: Surface reflectance collection per sensor. Source: Earth Engine data catalog, "USGS Landsat 5 / 7 / 8 / 9 Level 2,
#: Collection 2, Tier 1" (bands ``SR_B*`` as digital numbers: scale with :data:`SR_SCALE` and :data:`SR_OFFSET`).
SR_COLLECTIONS: dict[str, str] = {
    "LANDSAT_5": "LANDSAT/LT05/C02/T1_L2",
    "LANDSAT_7": "LANDSAT/LE07/C02/T1_L2",
    "LANDSAT_8": "LANDSAT/LC08/C02/T1_L2",
    "LANDSAT_9": "LANDSAT/LC09/C02/T1_L2",
}

#: Collections per product.
PRODUCT_COLLECTIONS: dict[str, dict[str, str]] = {"toa": COLLECTIONS, "sr": SR_COLLECTIONS}

#: Collection 2 Level-2 surface reflectance = DN * SR_SCALE + SR_OFFSET, and DN 0 is fill. Source: USGS Landsat
#: Collection 2 Level-2 Science Product Guide (the same for TM, ETM+, OLI and OLI-2).
SR_SCALE, SR_OFFSET, SR_FILL_DN = 2.75e-05, -0.2, 0

#: Prefix of the Level-2 surface reflectance bands (``SR_B2`` for Landsat 8's blue).
SR_BAND_PREFIX = "SR_"

#: Collection 2 pixel quality band (same name in every collection; bits in :data:`cmsn_cube.qa.QA_BITS`).
QA_BAND = "QA_PIXEL"

#: Image properties holding the WRS-2 path and row. Source: Earth Engine catalog image properties of the
#: Collection 2 Landsat collections.
WRS_PATH_PROPERTY, WRS_ROW_PROPERTY = "WRS_PATH", "WRS_ROW"

#: Days between two acquisitions of one path/row by one Landsat (16-day repeat cycle of WRS-2).
REVISIT_DAYS = 16

#: Environment variables that name credentials. ``GOOGLE_APPLICATION_CREDENTIALS`` is Google's standard
#: (a service-account JSON key, or any ADC file); ``EE_SERVICE_ACCOUNT_KEY`` is ours: a service-account JSON key.
CREDENTIAL_ENV_VARS: tuple[str, ...] = ("EE_SERVICE_ACCOUNT_KEY", "GOOGLE_APPLICATION_CREDENTIALS")

#: Environment variables read for the Cloud project when ``project`` is not given.
PROJECT_ENV_VARS: tuple[str, ...] = ("EE_PROJECT", "GOOGLE_CLOUD_PROJECT")

#: Upper bound on ``ee.Initialize`` with credentials that exist but do not work: it retries ~24 s otherwise.
INITIALIZE_TIMEOUT_S = 20.0

#: Dask chunks of the opened collection: one date, 512 x 512 pixels (matches the store's chunks on disk).
DEFAULT_XEE_CHUNKS: dict[str, int] = {"time": 1, "y": 512, "x": 512}

#: Bytes per pixel and date in the store, uncompressed: 4 float32 bands + uint16 QA + bool mask.
_STORE_BYTES_PER_PIXEL = 4 * len(BANDS) + 2 + 1

#: Other names older xee releases gave the spatial dims (0.0.x: ``X``/``Y`` or ``lon``/``lat``).
_DIM_ALIASES: dict[str, str] = {"X": "x", "Y": "y", "lon": "x", "lat": "y"}

_HOW_TO_AUTHENTICATE = (
    "authenticate once with `earthengine authenticate` (writes ~/.config/earthengine/credentials), "
    "or point EE_SERVICE_ACCOUNT_KEY / GOOGLE_APPLICATION_CREDENTIALS at a service-account JSON key; "
    "to work offline, use the embedded scene instead: `cmsn-cube synth stores/synthetic.zarr`"
)


# ----------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PullPlan:
    """Everything a pull will ask Earth Engine for, computed offline.

    Attributes
    ----------
    name : str
        Region name (also the default store name).
    sensor : {"LANDSAT_5", "LANDSAT_7", "LANDSAT_8", "LANDSAT_9"}
        The sensor; with ``product``, fixes the collection and the band names.
    collection_id : str
        Earth Engine collection id (:func:`collection_id`).
    bands : tuple of str
        Sensor band names in :data:`cmsn_cube.cube.BANDS` order, then ``QA_PIXEL``.
    start, end : str
        First and last day of the window (ISO dates, both included).
    bbox : tuple of float
        ``(west, south, east, north)`` in degrees.
    wrs_path, wrs_row : int or None
        WRS-2 path and row filter.
    crs : str
        The grid's CRS: the UTM zone of the bbox centre (``EPSG:326NN`` north, ``EPSG:327NN`` south).
    crs_transform : tuple of float
        Affine transform of the grid (:data:`Transform` order).
    shape_2d : tuple of int
        ``(width, height)`` in pixels, the order xee takes.
    levels : tuple of float
        Target cloud fraction per kept date (ignored when ``dates`` is given).
    dates : tuple of str or None
        Days to keep instead of choosing by cloud level.
    scale_m : float
        Pixel size in metres.
    product : {"toa", "sr"}
        TOA reflectance or Level-2 surface reflectance.
    """

    name: str
    sensor: Sensor
    collection_id: str
    bands: tuple[str, ...]
    start: str
    end: str
    bbox: BBox
    wrs_path: int | None
    wrs_row: int | None
    crs: str
    crs_transform: Transform
    shape_2d: tuple[int, int]
    levels: tuple[float, ...] = DEFAULT_CLOUD_LEVELS
    dates: tuple[str, ...] | None = None
    scale_m: float = LANDSAT_SCALE_M
    product: Product = "toa"

    @property
    def slc_off(self) -> bool:
        """Whether some dates of the window are Landsat 7 SLC-off (striped: the stripes become gaps to fill)."""
        return self.sensor == "LANDSAT_7" and self.end > SLC_FAILURE_DAY

    @property
    def pixel_count(self) -> int:
        """Pixels per date and band."""
        return self.shape_2d[0] * self.shape_2d[1]

    @property
    def expected_acquisitions(self) -> int:
        """Acquisition days in the window for one path/row (16-day revisit; more where rows or paths overlap)."""
        days = (dt.date.fromisoformat(self.end) - dt.date.fromisoformat(self.start)).days + 1
        return max(1, math.ceil(days / REVISIT_DAYS))

    @property
    def n_kept(self) -> int:
        """Dates the store will hold."""
        return len(self.dates) if self.dates else len(self.levels)

    @property
    def expected_store_mb(self) -> float:
        """Store size for the kept dates, uncompressed (Zarr compression makes it smaller)."""
        return self.n_kept * self.pixel_count * _STORE_BYTES_PER_PIXEL / 2**20

    @property
    def expected_transfer_mb(self) -> float:
        """What xee fetches: every date of the window, all bands as float32 (+1 mask byte, EE's accounting)."""
        return self.expected_acquisitions * len(self.bands) * self.pixel_count * 5 / 2**20

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-able data, derived figures included."""
        out = asdict(self)
        out.update(
            pixel_count=self.pixel_count,
            expected_acquisitions=self.expected_acquisitions,
            expected_store_mb=round(self.expected_store_mb, 2),
            expected_transfer_mb=round(self.expected_transfer_mb, 2),
        )
        return out

    def describe(self) -> str:
        """A human-readable summary (what ``cmsn-cube pull --dry-run`` prints)."""
        width, height = self.shape_2d
        wrs = f"{self.wrs_path:03d}/{self.wrs_row:03d}" if self.wrs_path and self.wrs_row else "any"
        keep = f"dates {', '.join(self.dates)}" if self.dates else f"cloud levels {', '.join(map(str, self.levels))}"
        west, south, east, north = self.bbox
        scaling = f" (DN * {SR_SCALE:g} - {-SR_OFFSET:g}, clipped to [0, 1])" if self.product == "sr" else ""
        slc = (
            [f"slc-off     Landsat 7 after {SLC_FAILURE_DAY}: no-data stripes become gaps, filled like clouds"]
            if self.slc_off
            else []
        )
        return "\n".join(
            [
                f"region      {self.name}",
                f"collection  {self.collection_id} ({self.sensor}, {_PRODUCT_NAMES[self.product]})",
                f"bands       {', '.join(self.bands)} -> {', '.join(BANDS)}{scaling} + qa_pixel",
                *slc,
                f"dates       {self.start} .. {self.end} (~{self.expected_acquisitions} acquisitions), keep {keep}",
                f"bbox        W {west} S {south} E {east} N {north} (WRS-2 path/row {wrs})",
                f"crs         {self.crs}, {self.scale_m:g} m, transform {tuple(round(v, 3) for v in self.crs_transform)}",
                f"grid        {width} x {height} px = {self.pixel_count:,} px per date and band",
                f"store       ~{self.expected_store_mb:.1f} MB uncompressed for {self.n_kept} dates; "
                f"~{self.expected_transfer_mb:.1f} MB fetched from Earth Engine",
            ]
        )


#: How :meth:`PullPlan.describe` and the cube's attrs name the products.
_PRODUCT_NAMES: dict[str, str] = {"toa": "TOA reflectance", "sr": "surface reflectance"}


def _check_sensor_product(sensor: str, product: str) -> None:
    if product not in PRODUCT_COLLECTIONS:
        raise RegionError(
            f"product must be one of {sorted(PRODUCT_COLLECTIONS)} (TOA or surface reflectance), got {product!r}"
        )
    if sensor not in PRODUCT_COLLECTIONS[product]:
        raise RegionError(f"sensor must be one of {sorted(PRODUCT_COLLECTIONS[product])}, got {sensor!r}")


def collection_id(sensor: str, product: str = "toa") -> str:
    """The Earth Engine collection of a sensor and product.

    Examples
    --------
    >>> collection_id("LANDSAT_7", "sr"), collection_id("LANDSAT_9")
    ('LANDSAT/LE07/C02/T1_L2', 'LANDSAT/LC09/C02/T1_TOA')
    """
    _check_sensor_product(sensor, product)
    return PRODUCT_COLLECTIONS[product][sensor]


def utm_crs(lon: float, lat: float) -> str:
    """EPSG code of the WGS 84 UTM zone holding ``(lon, lat)`` (``EPSG:326NN`` north, ``EPSG:327NN`` south).

    Examples
    --------
    >>> utm_crs(114.3, 30.6), utm_crs(145.3, -34.4)
    ('EPSG:32650', 'EPSG:32755')
    """
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def _check_bbox(bbox: Sequence[float]) -> BBox:
    values = tuple(float(v) for v in bbox)
    if len(values) != 4:
        raise RegionError(f"bbox must be (west, south, east, north) in degrees, got {bbox!r}")
    west, south, east, north = values
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise RegionError(
            f"bbox {values} is not (west, south, east, north) in degrees with west < east and south < north"
        )
    return values  # type: ignore[return-value]


def _iso_day(value: str | dt.date, what: str) -> str:
    try:
        return dt.date.fromisoformat(str(value)[:10]).isoformat()
    except ValueError as error:
        raise RegionError(f"{what} must be an ISO date like 2013-05-12, got {value!r}") from error


def grid_for_bbox(bbox: Sequence[float], *, crs: str | None = None, scale: float = LANDSAT_SCALE_M) -> dict[str, Any]:
    """The pixel grid covering ``bbox`` at ``scale`` metres: ``crs``, ``crs_transform``, ``shape_2d`` for xee.

    Uses :func:`xee.fit_geometry` (pure pyproj/shapely, offline) on the bbox densified along its edges, so the
    grid covers the whole box after the curved reprojection, with edges snapped to multiples of ``scale``.

    Parameters
    ----------
    bbox : sequence of float
        ``(west, south, east, north)`` in degrees.
    crs : str, optional
        Grid CRS; default the UTM zone of the bbox centre (:func:`utm_crs`).
    scale : float
        Pixel size in metres.
    """
    shapely = require("shapely", "ee")
    xee = require("xee", "ee")

    west, south, east, north = _check_bbox(bbox)
    crs = crs or utm_crs((west + east) / 2, (south + north) / 2)
    # a box's edges are curves in UTM: densify so the bounds of the reprojected vertices cover it
    box = shapely.segmentize(shapely.box(west, south, east, north), max_segment_length=(east - west) / 64)
    with warnings.catch_warnings():
        # xee 0.1.2 calls shapely.ops.transform, deprecated in shapely 2.1: not ours to fix
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="xee")
        params = xee.fit_geometry(box, geometry_crs="EPSG:4326", grid_crs=crs, grid_scale=(scale, -scale))
    return {
        "crs": params["crs"],
        "crs_transform": tuple(float(v) for v in params["crs_transform"]),
        "shape_2d": tuple(int(v) for v in params["shape_2d"]),
    }


def plan_pull(
    *,
    sensor: Sensor,
    start: str | dt.date,
    end: str | dt.date,
    bbox: Sequence[float],
    wrs_path: int | None = None,
    wrs_row: int | None = None,
    name: str = "region",
    levels: Sequence[float] = DEFAULT_CLOUD_LEVELS,
    dates: Sequence[str | dt.date] | None = None,
    crs: str | None = None,
    scale: float = LANDSAT_SCALE_M,
    product: Product = "toa",
) -> PullPlan:
    """Describe a pull fully offline: collection, bands, window, grid, pixel count and expected size.

    Parameters
    ----------
    sensor : {"LANDSAT_5", "LANDSAT_7", "LANDSAT_8", "LANDSAT_9"}
        Which Landsat.
    start, end : str or datetime.date
        First and last day of the window, both included.
    bbox : sequence of float
        ``(west, south, east, north)`` in degrees; the grid covers it.
    wrs_path, wrs_row : int, optional
        Keep only scenes of this WRS-2 path/row (avoids mixing view geometries from neighbouring paths).
    name : str
        Region name.
    levels : sequence of float
        Target cloud fraction per kept date (default 25 %, 15 %, 10 %).
    dates : sequence of str, optional
        Keep exactly these days instead of choosing by cloud level.
    crs : str, optional
        Grid CRS; default the UTM zone of the bbox centre.
    scale : float
        Pixel size in metres.
    product : {"toa", "sr"}
        TOA reflectance (``LANDSAT/L*/C02/T1_TOA``) or Level-2 surface reflectance (``LANDSAT/L*/C02/T1_L2``).

    Returns
    -------
    PullPlan

    Raises
    ------
    RegionError
        Unknown sensor or product, bad bbox, window or dates.

    Examples
    --------
    >>> plan = plan_pull(sensor="LANDSAT_8", start="2013-05-01", end="2013-05-31", bbox=(114.2, 30.5, 114.3, 30.6))
    >>> plan.crs, plan.bands
    ('EPSG:32650', ('B2', 'B3', 'B4', 'B5', 'QA_PIXEL'))
    >>> plan_pull(sensor="LANDSAT_9", start="2022-05-01", end="2022-05-31", bbox=(114.2, 30.5, 114.3, 30.6),
    ...           product="sr").bands
    ('SR_B2', 'SR_B3', 'SR_B4', 'SR_B5', 'QA_PIXEL')
    """
    _check_sensor_product(sensor, product)
    start_day, end_day = _iso_day(start, "start"), _iso_day(end, "end")
    if end_day < start_day:
        raise RegionError(f"end {end_day} comes before start {start_day}")
    kept = tuple(_iso_day(d, "dates") for d in dates) if dates else None
    if kept and not all(start_day <= d <= end_day for d in kept):
        raise RegionError(f"dates {kept} must lie in the window {start_day} .. {end_day}")
    if not kept and not levels:
        raise RegionError("give cloud levels (e.g. 0.25, 0.15, 0.10) or explicit dates to keep")
    grid = grid_for_bbox(bbox, crs=crs, scale=scale)
    return PullPlan(
        name=name,
        sensor=sensor,
        collection_id=collection_id(sensor, product),
        bands=sensor_band_names(sensor, product) + (QA_BAND,),
        start=start_day,
        end=end_day,
        bbox=_check_bbox(bbox),
        wrs_path=int(wrs_path) if wrs_path is not None else None,
        wrs_row=int(wrs_row) if wrs_row is not None else None,
        crs=grid["crs"],
        crs_transform=grid["crs_transform"],
        shape_2d=grid["shape_2d"],
        levels=tuple(float(v) for v in levels),
        dates=kept,
        scale_m=float(scale),
        product=product,
    )


def sensor_band_names(sensor: str, product: str = "toa") -> tuple[str, ...]:
    """The sensor's band names for :data:`cmsn_cube.cube.BANDS`, in that order, in the product's collection.

    Landsat 5 TM and 7 ETM+ share one band map, Landsat 8 OLI and 9 OLI-2 another
    (:data:`cmsn_cube.cube.SENSOR_BANDS`); the surface reflectance bands carry the prefix ``SR_``.

    Examples
    --------
    >>> sensor_band_names("LANDSAT_7"), sensor_band_names("LANDSAT_9")
    (('B1', 'B2', 'B3', 'B4'), ('B2', 'B3', 'B4', 'B5'))
    >>> sensor_band_names("LANDSAT_5", "sr")
    ('SR_B1', 'SR_B2', 'SR_B3', 'SR_B4')
    """
    if sensor not in SENSOR_BANDS:
        raise RegionError(f"no band map for sensor {sensor!r}; known: {sorted(SENSOR_BANDS)}")
    if product not in PRODUCT_COLLECTIONS:
        raise RegionError(f"product must be one of {sorted(PRODUCT_COLLECTIONS)}, got {product!r}")
    prefix = SR_BAND_PREFIX if product == "sr" else ""
    return tuple(prefix + SENSOR_BANDS[sensor][band] for band in BANDS)


#: The regions of the seed study, shipped inside the package (the default of ``--config``).
REGIONS_FILE = Path(__file__).resolve().parents[1] / "data" / "regions.yaml"


def load_regions(config: str | os.PathLike[str] = REGIONS_FILE) -> dict[str, dict[str, Any]]:
    """Read a regions file (default the packaged :data:`REGIONS_FILE`): region name -> :func:`plan_pull` arguments."""
    import yaml

    path = Path(config)
    if not path.exists():
        raise RegionError(f"no regions file at {path}; pass --config FILE.yaml or --bbox/--start/--end")
    document = yaml.safe_load(path.read_text()) or {}
    regions = document.get("regions", document)
    if not isinstance(regions, Mapping) or not regions:
        raise RegionError(f"{path} must hold a mapping 'regions: {{name: {{sensor, bbox, start, end, ...}}}}'")
    return {str(name): dict(spec) for name, spec in regions.items()}


#: Keys of a region entry that :func:`plan_pull` takes (others, such as ``description``, are documentation).
_PLAN_KEYS = ("sensor", "product", "start", "end", "bbox", "wrs_path", "wrs_row", "levels", "dates", "crs", "scale")


def plan_region(
    name: str,
    *,
    config: str | os.PathLike[str] = REGIONS_FILE,
    use_dates: bool = False,
    product: Product | None = None,
) -> PullPlan:
    """The :class:`PullPlan` of region ``name`` in a regions file.

    Parameters
    ----------
    name : str
        Region name in the file.
    config : path-like
        The regions file; default the packaged one (:data:`REGIONS_FILE`).
    use_dates : bool
        Keep the region's listed ``dates`` (the seed's) instead of choosing dates by cloud level.
    product : {"toa", "sr"}, optional
        Overrides the region's ``product`` (default ``"toa"``).
    """
    regions = load_regions(config)
    if name not in regions:
        raise RegionError(f"no region {name!r} in {config}; regions there: {sorted(regions)}")
    spec = {key: regions[name][key] for key in _PLAN_KEYS if key in regions[name]}
    if not use_dates:
        spec.pop("dates", None)
    if product is not None:
        spec["product"] = product
    missing = [key for key in ("sensor", "start", "end", "bbox") if key not in spec]
    if missing:
        raise RegionError(f"region {name!r} in {config} lacks {missing}")
    return plan_pull(name=name, **spec)


# ----------------------------------------------------------------------------------------- the collection


def build_collection(
    sensor: Sensor,
    *,
    product: Product = "toa",
    start: str | dt.date,
    end: str | dt.date,
    bbox: Sequence[float] | None = None,
    wrs_path: int | None = None,
    wrs_row: int | None = None,
    mosaic: bool = True,
) -> ee.ImageCollection:
    """The Landsat collection of a region and window: sensor bands + QA_PIXEL, one image per day.

    Builds the expression only (no request): ``ee`` must be initialized (``initialize_earthengine``) because
    the client library needs the algorithm list to build it. Surface reflectance stays in digital numbers here
    and :func:`xee_to_cube` scales it, so that fill (DN 0) is still told apart from dark ground after scaling.

    Parameters
    ----------
    sensor : {"LANDSAT_5", "LANDSAT_7", "LANDSAT_8", "LANDSAT_9"}
        Which Landsat; with ``product``, fixes the collection and band names.
    product : {"toa", "sr"}
        TOA reflectance or Level-2 surface reflectance (:func:`collection_id`).
    start, end : str or datetime.date
        First and last day, both included.
    bbox : sequence of float, optional
        ``(west, south, east, north)`` in degrees: keep scenes intersecting it.
    wrs_path, wrs_row : int, optional
        WRS-2 path/row filter. At least one of ``bbox`` or ``wrs_path`` is needed.
    mosaic : bool
        Mosaic the scenes of each acquisition day into one image (a bbox across two rows of a path is covered
        by two scenes of the same day; the cube allows one image per time).

    Returns
    -------
    ee.ImageCollection
        Bands ``(*sensor bands, "QA_PIXEL")`` in :data:`cmsn_cube.cube.BANDS` order, sorted by time; each image
        carries ``system:time_start`` (its first scene's), ``system:id``/``system:index`` (the day) and
        ``n_scenes``.
    """
    ee = require("ee", "ee", package="earthengine-api")

    source_id = collection_id(sensor, product)
    if bbox is None and wrs_path is None:
        raise RegionError("give a bbox or a WRS-2 path (and row) so the collection is not the whole archive")
    start_day = _iso_day(start, "start")
    # filterDate's end is exclusive: advance one day so `end` is included
    end_next = (dt.date.fromisoformat(_iso_day(end, "end")) + dt.timedelta(days=1)).isoformat()
    collection = ee.ImageCollection(source_id).filterDate(start_day, end_next)
    if wrs_path is not None:
        collection = collection.filter(ee.Filter.eq(WRS_PATH_PROPERTY, int(wrs_path)))
    if wrs_row is not None:
        collection = collection.filter(ee.Filter.eq(WRS_ROW_PROPERTY, int(wrs_row)))
    if bbox is not None:
        collection = collection.filterBounds(ee.Geometry.Rectangle(list(_check_bbox(bbox)), "EPSG:4326", False))
    bands = list(sensor_band_names(sensor, product)) + [QA_BAND]
    collection = collection.select(bands)
    if not mosaic:
        return collection.sort("system:time_start")

    days = collection.aggregate_array("system:time_start").map(lambda t: ee.Date(t).format("YYYY-MM-dd")).distinct()

    def mosaic_day(day: Any) -> Any:  # an ee.Image
        start_of_day = ee.Date.parse("YYYY-MM-dd", day)
        scenes = collection.filterDate(start_of_day, start_of_day.advance(1, "day"))
        first = scenes.sort("system:time_start").first()
        # mosaic() drops properties; xee reads system:time_start (time) and system:id (reduceColumns)
        return (
            scenes.mosaic()
            .select(bands)
            .set(
                {
                    "system:time_start": first.get("system:time_start"),
                    "system:id": ee.String(source_id + "/").cat(day),
                    "system:index": day,
                    "n_scenes": scenes.size(),
                }
            )
        )

    return ee.ImageCollection.fromImages(days.map(mosaic_day)).sort("system:time_start")


def collection_for_plan(plan: PullPlan) -> ee.ImageCollection:
    """:func:`build_collection` for a :class:`PullPlan`."""
    return build_collection(
        plan.sensor,
        product=plan.product,
        start=plan.start,
        end=plan.end,
        bbox=plan.bbox,
        wrs_path=plan.wrs_path,
        wrs_row=plan.wrs_row,
    )


def open_xee(
    plan: PullPlan,
    *,
    chunks: Mapping[str, int] | None = None,
    collection: ee.ImageCollection | None = None,
    **xee_options: Any,
) -> xr.Dataset:
    """Open the plan's collection lazily with xee on the plan's grid (one metadata request, no pixels).

    Parameters
    ----------
    plan : PullPlan
        What to open.
    chunks : mapping, optional
        Dask chunks over xee's dims ``time``/``y``/``x``; default :data:`DEFAULT_XEE_CHUNKS`.
    collection : ee.ImageCollection, optional
        Open this instead of :func:`collection_for_plan`.
    **xee_options
        Passed to ``xr.open_dataset(..., engine="ee")`` (e.g. ``io_chunks``, ``executor_kwargs``).

    Returns
    -------
    xarray.Dataset
        xee's layout (see the module docstring); convert with :func:`xee_to_cube`.
    """
    ee = require("ee", "ee", package="earthengine-api")

    collection = collection if collection is not None else collection_for_plan(plan)
    chunks = dict(chunks or DEFAULT_XEE_CHUNKS)
    # one Earth Engine request per dask chunk and band (1 x 512 x 512 float32 ~ 1.3 MB, under the 48 MB limit)
    xee_options.setdefault("io_chunks", dict(chunks))
    try:
        return xr.open_dataset(
            collection,  # type: ignore[arg-type]  # xee's backend takes an ee.ImageCollection
            engine="ee",
            crs=plan.crs,
            crs_transform=plan.crs_transform,
            shape_2d=plan.shape_2d,
            chunks=chunks,
            **xee_options,
        )
    except ee.EEException as error:
        raise EarthEngineError(f"Earth Engine refused to open {plan.collection_id} for {plan.name}: {error}") from error


# ------------------------------------------------------------------------------------ xee -> the cube


def _xee_variable(ds: xr.Dataset, names: Sequence[str]) -> xr.DataArray | None:
    for name in names:
        if name in ds.data_vars:
            return ds[name]
    return None


def _normalise_dims(ds: xr.Dataset) -> xr.Dataset:
    renames = {old: new for old, new in _DIM_ALIASES.items() if old in ds.dims and new not in ds.dims}
    return ds.rename(renames) if renames else ds


def xee_to_cube(
    ds: xr.Dataset,
    *,
    sensor: Sensor,
    product: Product = "toa",
    crs: str | None = None,
    source: str | None = None,
    qa_band: str = QA_BAND,
) -> xr.Dataset:
    """Turn what xee returns into a cube: reflectance, qa_pixel, cloud_mask, band names, CRS, sensor. Lazy.

    Parameters
    ----------
    ds : xarray.Dataset
        xee's dataset: one ``(time, y, x)`` float32 variable per band named by its band id in the product's
        collection (common names ``blue``... are accepted too), NaN where Earth Engine masked the pixel.
    sensor : {"LANDSAT_5", "LANDSAT_7", "LANDSAT_8", "LANDSAT_9"}
        The sensor, whose band names (:func:`sensor_band_names`) are looked up.
    product : {"toa", "sr"}
        ``"toa"``: the bands are TOA reflectance already. ``"sr"``: they are Level-2 digital numbers, scaled here
        to ``DN * SR_SCALE + SR_OFFSET`` clipped to [0, 1]; DN 0 is fill.
    crs : str, optional
        The grid's CRS; default the ``crs`` attr xee puts on every variable.
    source : str, optional
        Recorded in ``attrs["source"]``; default names Earth Engine and the collection.
    qa_band : str
        Name of the QA variable.

    Returns
    -------
    xarray.Dataset
        A valid cube with ``cloud_mask`` decoded from QA; pixels without data (masked, QA fill bit, or SR DN 0)
        are NaN in ``reflectance`` and have the fill bit set in ``qa_pixel``. They are False in ``cloud_mask``,
        except on Landsat 7 SLC-off dates, where they are the stripes and count as gaps to fill
        (:func:`cmsn_cube.qa.add_slc_off_gaps`). ``attrs["product"]`` records the product, the ``sensor(time)``
        and ``slc_off(time)`` coordinates the sensor and the SLC-off dates.

    Raises
    ------
    BandMismatchError
        A band of the sensor is missing (wrong ``sensor`` or ``product``?).
    DimensionError, TimeAxisError, MissingCRSError
        The dataset is not laid out as xee lays it out.
    RegionError
        Unknown sensor or product.
    """
    source_id = collection_id(sensor, product)
    ds = _normalise_dims(ds)
    sensor_names = sensor_band_names(sensor, product)
    arrays = []
    for common, sensor_name in zip(BANDS, sensor_names, strict=True):
        array = _xee_variable(ds, (sensor_name, common))
        if array is None:
            raise BandMismatchError(
                f"the xee dataset has no band {sensor_name!r} ({common} of {sensor} {product}); it has"
                f" {sorted(map(str, ds.data_vars))} - are sensor and product right? (Landsat 5/7 TM/ETM+: B1-B4,"
                f" Landsat 8/9 OLI: B2-B5; surface reflectance: {SR_BAND_PREFIX}B*)"
            )
        arrays.append(array)
    qa = _xee_variable(ds, (qa_band, "qa_pixel"))
    if qa is None:
        raise BandMismatchError(f"the xee dataset has no {qa_band!r} band; it has {sorted(map(str, ds.data_vars))}")
    for array in (*arrays, qa):
        if set(array.dims) != {"time", "y", "x"}:
            raise DimensionError(
                f"xee variable {array.name!r} has dims {array.dims}; expected ('time', 'y', 'x') as xee 0.1.2 returns"
            )
    if not np.issubdtype(ds["time"].dtype, np.datetime64):
        raise TimeAxisError(
            f"time is {ds['time'].dtype}, not datetime64: xee could not read system:time_start from the collection"
            " (every image needs it; build the collection with build_collection)"
        )
    if not ds.indexes["time"].is_monotonic_increasing:
        ds = ds.sortby("time")  # lazy: a reordering index, no pixels read
        arrays = [ds[a.name] for a in arrays]
        qa = ds[qa.name]
    crs = crs or qa.attrs.get("crs") or arrays[0].attrs.get("crs")
    if not crs:
        raise MissingCRSError("the xee dataset names no CRS (no 'crs' attr); pass crs='EPSG:326NN'")

    # xee's encoding holds scale_factor = pixel size: rebuild from .data so no xee encoding reaches the store
    reflectance = xr.Variable.concat([a.transpose("time", "y", "x").variable for a in arrays], dim="band")
    reflectance = reflectance.transpose("time", "band", "y", "x").data.astype("float32")
    qa_values = qa.transpose("time", "y", "x").variable.data
    no_data = np.isnan(qa_values)
    # masked QA means no data: set the fill bit so decoding calls it fill, not clear
    qa_words = np.where(no_data, 1 << QA_BITS["fill"], np.nan_to_num(qa_values)).astype("uint16")
    if product == "sr":
        # DN 0 is Level-2 fill (SLC-off stripes among them) where Earth Engine did not mask it: not -0.2 clipped
        qa_words = np.where((reflectance == SR_FILL_DN).any(axis=1), qa_words | (1 << QA_BITS["fill"]), qa_words)
        scaled = reflectance * np.float32(SR_SCALE) + np.float32(SR_OFFSET)
        reflectance = np.clip(scaled, np.float32(0), np.float32(1)).astype("float32")
    fill = (qa_words & (1 << QA_BITS["fill"])) != 0
    reflectance = np.where(fill[:, None], np.float32("nan"), reflectance)

    cube = make_cube(
        reflectance,
        time=ds["time"].values.astype("datetime64[ns]"),
        y=ds["y"].values,
        x=ds["x"].values,
        crs=crs,
        sensor=sensor,
        qa_pixel=qa_words,
        source=source or f"Google Earth Engine {source_id} via xee",
        attrs={"collection_id": source_id, "reflectance": product.upper(), "product": product},
    )
    cube["reflectance"].attrs["long_name"] = _PRODUCT_NAMES[product]
    # a per-date flag that travels into the reconstruction (its coords come from the cube's)
    cube = cube.assign_coords(slc_off=slc_off_dates(cube))
    return add_slc_off_gaps(add_cloud_mask(cube))


# -------------------------------------------------------------------------------------- choosing dates


def choose_dates(
    cube: xr.Dataset,
    *,
    levels: Sequence[float] = DEFAULT_CLOUD_LEVELS,
    dates: Sequence[str | dt.date] | None = None,
    progress: bool = False,
) -> xr.Dataset:
    """Keep the dates nearest the target cloud levels (or exactly ``dates``), with their cloud fraction.

    Computes the cloud fraction of every date (reads QA and reflectance once); the returned cube stays lazy.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube with ``cloud_mask`` (or ``qa_pixel``).
    levels : sequence of float
        Target cloud fractions, one date each (default 25 %, 15 %, 10 %).
    dates : sequence of str, optional
        Keep these days instead (the seed's dates); each must be in the cube.
    progress : bool
        Show a progress bar while the fractions are computed.

    Returns
    -------
    xarray.Dataset
        The chosen dates in time order, with a ``cloud_fraction(time)`` coordinate.

    Raises
    ------
    MissingDateError
        A requested day is not in the cube.
    NoDataError
        Fewer usable dates than levels.
    """
    validate_cube(cube)
    if dates:
        days = cube["time"].values.astype("datetime64[D]")
        wanted = [np.datetime64(_iso_day(d, "dates"), "D") for d in dates]
        missing = [str(d) for d in wanted if d not in days]
        if missing:
            available = ", ".join(str(d) for d in days)
            raise MissingDateError(f"no acquisition on {', '.join(missing)}; the window has {available}")
        positions = sorted(int(np.flatnonzero(days == d)[0]) for d in wanted)
        fractions = _compute(cloud_fraction(cube.isel(time=positions)), progress=progress)
        return cube.isel(time=positions).assign_coords(cloud_fraction=("time", fractions.values))
    fractions = _compute(cloud_fraction(cube), progress=progress)
    positions = select_dates(fractions, levels)
    return cube.isel(time=positions).assign_coords(cloud_fraction=("time", fractions.values[positions]))


def _compute(array: xr.DataArray, *, progress: bool) -> xr.DataArray:
    if not progress:
        return array.compute()
    from tqdm.dask import TqdmCallback

    with TqdmCallback(desc="cloud fraction per date", unit="task"):
        return array.compute()


# ------------------------------------------------------------------------------------- authentication


def _credentials_source() -> tuple[str, str | None]:
    """Where credentials are, without any request: ``(kind, path)``; raise when there are none."""
    for variable in CREDENTIAL_ENV_VARS:
        value = os.environ.get(variable)
        if not value:
            continue
        if not Path(value).expanduser().is_file():
            raise EarthEngineError(f"{variable}={value} names no file; point it at a service-account JSON key")
        return variable, str(Path(value).expanduser())
    oauth = require("ee.oauth", "ee", package="earthengine-api")

    persistent = Path(oauth.get_credentials_path())
    if persistent.is_file():
        return "earthengine", str(persistent)
    # gcloud's application default credentials (`gcloud auth application-default login`)
    gcloud_dir = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    adc = Path(gcloud_dir) / "application_default_credentials.json"
    if adc.is_file():
        return "gcloud", str(adc)
    raise EarthEngineError(f"no Earth Engine credentials found: {_HOW_TO_AUTHENTICATE}")


def _service_account_credentials(key_file: str) -> Any:
    ee = require("ee", "ee", package="earthengine-api")

    try:
        email = json.loads(Path(key_file).read_text())["client_email"]
    except (OSError, ValueError, KeyError) as error:
        raise EarthEngineError(f"{key_file} is not a service-account JSON key (no client_email): {error}") from error
    return ee.ServiceAccountCredentials(email, key_file=key_file)


def initialize_earthengine(project: str | None = None, *, timeout_s: float = INITIALIZE_TIMEOUT_S) -> None:
    """Initialize Earth Engine, or fail fast with what to do.

    Credentials are looked for first, without any request (``EE_SERVICE_ACCOUNT_KEY``,
    ``GOOGLE_APPLICATION_CREDENTIALS``, ``~/.config/earthengine/credentials``, gcloud's application default
    credentials): without any, this raises at once instead of letting ``ee.Initialize`` try for seconds. Does
    nothing when Earth Engine is already initialized.

    Parameters
    ----------
    project : str, optional
        Google Cloud project registered for Earth Engine; default ``EE_PROJECT``/``GOOGLE_CLOUD_PROJECT`` or
        the credentials' quota project (a service account's own project).
    timeout_s : float
        Give up on ``ee.Initialize`` after this long (bad credentials or no network make it retry).

    Raises
    ------
    EarthEngineError
        No credentials, bad credentials, no project, or Earth Engine unreachable; the message says what to do.
    """
    ee = require("ee", "ee", package="earthengine-api")

    if ee.data.is_initialized():
        return
    kind, path = _credentials_source()
    project = project or next((os.environ[v] for v in PROJECT_ENV_VARS if os.environ.get(v)), None)
    credentials: Any = "persistent"
    if kind == "EE_SERVICE_ACCOUNT_KEY" and path:
        credentials = _service_account_credentials(path)

    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            ee.Initialize(credentials, project=project)
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    # a daemon thread so that unreachable servers cannot hold the caller past timeout_s
    worker = threading.Thread(target=run, name="ee-initialize", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise EarthEngineError(
            f"Earth Engine did not answer within {timeout_s:g} s (credentials from {kind}: {path}); check the network"
            f" and that the credentials are valid, or {_HOW_TO_AUTHENTICATE.split('; ', 1)[1]}"
        )
    if "error" in outcome:
        error = outcome["error"]
        hint = "pass --project (a Cloud project registered for Earth Engine)" if "project" in str(error) else ""
        raise EarthEngineError(
            f"Earth Engine initialization failed with credentials from {kind} ({path}): "
            f"{type(error).__name__}: {error}. {hint or _HOW_TO_AUTHENTICATE}"
        ) from error


# --------------------------------------------------------------------------------------------- the pull


def pull_region(
    plan: PullPlan,
    out: str | os.PathLike[str],
    *,
    project: str | None = None,
    chunks: Mapping[str, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    collection: ee.ImageCollection | None = None,
) -> str:
    """Pull a region into a Zarr store: initialize, open with xee, convert, choose dates, write.

    Parameters
    ----------
    plan : PullPlan
        From :func:`plan_pull` or :func:`plan_region`.
    out : path-like
        Store path (``stores/<region>.zarr``) or fsspec URL.
    project : str, optional
        Earth Engine Cloud project (see :func:`initialize_earthengine`).
    chunks : mapping, optional
        Dask chunks of the opened collection (default :data:`DEFAULT_XEE_CHUNKS`).
    overwrite : bool
        Replace an existing store.
    progress : bool
        Show progress while cloud fractions are computed and the store is written.
    collection : ee.ImageCollection, optional
        Use this collection instead of :func:`collection_for_plan`.

    Returns
    -------
    str
        The store's path.
    """
    initialize_earthengine(project)
    ds = open_xee(plan, chunks=chunks, collection=collection)
    cube = xee_to_cube(ds, sensor=plan.sensor, product=plan.product)
    cube = choose_dates(cube, levels=plan.levels, dates=plan.dates, progress=progress)
    cube.attrs.update(region=plan.name, bbox=list(plan.bbox), window=f"{plan.start}/{plan.end}")
    if plan.wrs_path is not None and plan.wrs_row is not None:
        cube.attrs["wrs_path_row"] = f"{plan.wrs_path:03d}/{plan.wrs_row:03d}"
    return write_cube(cube, out, overwrite=overwrite, progress=progress)


__all__ = [
    "COLLECTIONS",
    "PRODUCT_COLLECTIONS",
    "SR_COLLECTIONS",
    "SR_OFFSET",
    "SR_SCALE",
    "Product",
    "PullPlan",
    "RegionError",
    "Sensor",
    "build_collection",
    "choose_dates",
    "collection_for_plan",
    "collection_id",
    "grid_for_bbox",
    "initialize_earthengine",
    "load_regions",
    "open_xee",
    "plan_pull",
    "plan_region",
    "pull_region",
    "sensor_band_names",
    "utm_crs",
    "xee_to_cube",
]
