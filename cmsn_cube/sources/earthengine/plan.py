"""Pull planning, offline: the grid of a bbox, what a pull asks for and how big it gets, the packaged regions.

:func:`plan_pull` (or :func:`plan_region` for a region of a regions file) computes a :class:`PullPlan` without
any request: collection and bands, the window, the UTM grid covering the bbox (:func:`grid_for_bbox`), the pixel
count and the expected store and transfer sizes.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cmsn_cube.cube import BANDS, LANDSAT_SCALE_M
from cmsn_cube.exceptions import RegionError
from cmsn_cube.extras import require
from cmsn_cube.qa import DEFAULT_CLOUD_LEVELS, SLC_FAILURE_DAY
from cmsn_cube.sources._common import (
    SR_OFFSET,
    SR_SCALE,
    STORE_BYTES_PER_PIXEL,
    BBox,
    check_bbox,
    check_window,
    iso_day,
    utm_crs,
)
from cmsn_cube.sources.earthengine.collection import (
    PRODUCT_NAMES,
    QA_BAND,
    Product,
    Sensor,
    check_sensor_product,
    collection_id,
    sensor_band_names,
)

#: ``(a, b, c, d, e, f)`` affine transform, GDAL/rasterio order: x scale, row rotation, x origin (left edge),
#: column rotation, y scale (negative: north up), y origin (top edge). The order xee's ``crs_transform`` takes.
Transform = tuple[float, float, float, float, float, float]

#: Days between two acquisitions of one path/row by one Landsat (16-day repeat cycle of WRS-2).
REVISIT_DAYS = 16

#: The regions of the seed study, shipped inside the package (the default of ``--config``).
REGIONS_FILE = Path(__file__).resolve().parents[2] / "data" / "regions.yaml"

#: Keys of a region entry that :func:`plan_pull` takes (others, such as ``description``, are documentation).
_PLAN_KEYS = ("sensor", "product", "start", "end", "bbox", "wrs_path", "wrs_row", "levels", "dates", "crs", "scale")


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
        return self.n_kept * self.pixel_count * STORE_BYTES_PER_PIXEL / 2**20

    @property
    def expected_transfer_mb(self) -> float:
        """What xee fetches: every date of the window, all bands as float32 (+1 mask byte, EE's accounting)."""
        return self.expected_acquisitions * len(self.bands) * self.pixel_count * 5 / 2**20

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as plain JSON-able data, derived figures included."""
        out = asdict(self)
        out.update(
            pixel_count=self.pixel_count,
            expected_acquisitions=self.expected_acquisitions,
            expected_store_mb=round(self.expected_store_mb, 2),
            expected_transfer_mb=round(self.expected_transfer_mb, 2),
        )
        return out

    def describe(self) -> str:
        """Return a human-readable summary (what ``cmsn-cube pull --dry-run`` prints)."""
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
                f"collection  {self.collection_id} ({self.sensor}, {PRODUCT_NAMES[self.product]})",
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


def grid_for_bbox(bbox: Sequence[float], *, crs: str | None = None, scale: float = LANDSAT_SCALE_M) -> dict[str, Any]:
    """Fit the pixel grid covering ``bbox`` at ``scale`` metres: ``crs``, ``crs_transform``, ``shape_2d`` for xee.

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

    west, south, east, north = check_bbox(bbox)
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
    check_sensor_product(sensor, product)
    start_day, end_day = check_window(start, end)
    kept = _kept_days(dates, levels, start_day=start_day, end_day=end_day)
    grid = grid_for_bbox(bbox, crs=crs, scale=scale)
    return PullPlan(
        name=name,
        sensor=sensor,
        collection_id=collection_id(sensor, product),
        bands=sensor_band_names(sensor, product) + (QA_BAND,),
        start=start_day,
        end=end_day,
        bbox=check_bbox(bbox),
        wrs_path=int(wrs_path) if wrs_path is not None else None,
        wrs_row=int(wrs_row) if wrs_row is not None else None,
        levels=tuple(float(v) for v in levels),
        dates=kept,
        scale_m=float(scale),
        product=product,
        **grid,
    )


def _kept_days(
    dates: Sequence[str | dt.date] | None, levels: Sequence[float], *, start_day: str, end_day: str
) -> tuple[str, ...] | None:
    """Return the ISO days to keep (None: choose by cloud level); they must lie in the window."""
    kept = tuple(iso_day(d, "dates") for d in dates) if dates else None
    if kept and not all(start_day <= d <= end_day for d in kept):
        raise RegionError(f"dates {kept} must lie in the window {start_day} .. {end_day}")
    if not kept and not levels:
        raise RegionError("give cloud levels (e.g. 0.25, 0.15, 0.10) or explicit dates to keep")
    return kept


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


def plan_region(
    name: str,
    *,
    config: str | os.PathLike[str] = REGIONS_FILE,
    use_dates: bool = False,
    product: Product | None = None,
) -> PullPlan:
    """Plan the pull of region ``name`` in a regions file (:func:`plan_pull` with the region's arguments).

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
