"""The Landsat collections of Earth Engine: sensors, products, band names, and the collection a pull opens.

Facts from the Earth Engine data catalog (collection ids, band names, image properties) and the two steps that
use them: :func:`build_collection` builds the ``ee.ImageCollection`` expression (offline once ``ee`` is
initialized) and :func:`open_xee` opens it with xee on a plan's grid (one metadata request).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import xarray as xr

from cmsn_cube.cube import BANDS, SENSOR_BANDS
from cmsn_cube.exceptions import EarthEngineError, RegionError
from cmsn_cube.extras import require
from cmsn_cube.sources._common import check_bbox, iso_day

if TYPE_CHECKING:  # pragma: no cover
    import ee

    from cmsn_cube.sources.earthengine.plan import PullPlan

Sensor = Literal["LANDSAT_5", "LANDSAT_7", "LANDSAT_8", "LANDSAT_9"]

#: ``"toa"``: top-of-atmosphere reflectance; ``"sr"``: Level-2 surface reflectance.
Product = Literal["toa", "sr"]

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

#: How :meth:`PullPlan.describe` and the cube's attrs name the products.
PRODUCT_NAMES: dict[str, str] = {"toa": "TOA reflectance", "sr": "surface reflectance"}

#: Prefix of the Level-2 surface reflectance bands (``SR_B2`` for Landsat 8's blue).
SR_BAND_PREFIX = "SR_"

#: Collection 2 pixel quality band (same name in every collection; bits in :data:`cmsn_cube.qa.QA_BITS`).
QA_BAND = "QA_PIXEL"

#: Image properties holding the WRS-2 path and row. Source: Earth Engine catalog image properties of the
#: Collection 2 Landsat collections.
WRS_PATH_PROPERTY, WRS_ROW_PROPERTY = "WRS_PATH", "WRS_ROW"

#: Dask chunks of the opened collection: one date, 512 x 512 pixels (matches the store's chunks on disk).
DEFAULT_XEE_CHUNKS: dict[str, int] = {"time": 1, "y": 512, "x": 512}


def check_sensor_product(sensor: str, product: str) -> None:
    """Raise a RegionError unless ``product`` is ``"toa"`` or ``"sr"`` and ``sensor`` has a collection of it."""
    if product not in PRODUCT_COLLECTIONS:
        raise RegionError(
            f"product must be one of {sorted(PRODUCT_COLLECTIONS)} (TOA or surface reflectance), got {product!r}"
        )
    if sensor not in PRODUCT_COLLECTIONS[product]:
        raise RegionError(f"sensor must be one of {sorted(PRODUCT_COLLECTIONS[product])}, got {sensor!r}")


def collection_id(sensor: str, product: str = "toa") -> str:
    """Return the Earth Engine collection of a sensor and product.

    Examples
    --------
    >>> collection_id("LANDSAT_7", "sr"), collection_id("LANDSAT_9")
    ('LANDSAT/LE07/C02/T1_L2', 'LANDSAT/LC09/C02/T1_TOA')
    """
    check_sensor_product(sensor, product)
    return PRODUCT_COLLECTIONS[product][sensor]


def sensor_band_names(sensor: str, product: str = "toa") -> tuple[str, ...]:
    """Return the sensor's band names for :data:`cmsn_cube.cube.BANDS`, in that order, in the product's collection.

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
    """Build the Landsat collection of a region and window: sensor bands + QA_PIXEL, one image per day.

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
    collection = _filtered(ee, source_id, start=start, end=end, bbox=bbox, wrs_path=wrs_path, wrs_row=wrs_row)
    bands = list(sensor_band_names(sensor, product)) + [QA_BAND]
    collection = collection.select(bands)
    if not mosaic:
        return collection.sort("system:time_start")
    return _mosaic_by_day(ee, collection, bands, source_id)


def _filtered(
    ee: Any,
    source_id: str,
    *,
    start: str | dt.date,
    end: str | dt.date,
    bbox: Sequence[float] | None,
    wrs_path: int | None,
    wrs_row: int | None,
) -> ee.ImageCollection:
    """Filter the collection ``source_id`` to the window, the WRS-2 path/row and the bbox."""
    start_day = iso_day(start, "start")
    # filterDate's end is exclusive: advance one day so `end` is included
    end_next = (dt.date.fromisoformat(iso_day(end, "end")) + dt.timedelta(days=1)).isoformat()
    collection = ee.ImageCollection(source_id).filterDate(start_day, end_next)
    if wrs_path is not None:
        collection = collection.filter(ee.Filter.eq(WRS_PATH_PROPERTY, int(wrs_path)))
    if wrs_row is not None:
        collection = collection.filter(ee.Filter.eq(WRS_ROW_PROPERTY, int(wrs_row)))
    if bbox is not None:
        collection = collection.filterBounds(ee.Geometry.Rectangle(list(check_bbox(bbox)), "EPSG:4326", False))
    return collection


def _mosaic_by_day(ee: Any, collection: Any, bands: list[str], source_id: str) -> ee.ImageCollection:
    """Mosaic the scenes of each acquisition day into one image that keeps the properties xee reads."""
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
    """Build the collection of a :class:`PullPlan` with :func:`build_collection`."""
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
        xee's layout (see :mod:`cmsn_cube.sources.earthengine`); convert with :func:`xee_to_cube`.
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
