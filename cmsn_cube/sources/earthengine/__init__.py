"""Landsat from Google Earth Engine, streamed through xee straight into the cube.

The flow is plan -> collection -> xee -> cube -> chosen dates -> Zarr::

    plan = plan_pull(sensor="LANDSAT_8", start="2013-04-15", end="2013-08-31", bbox=(114.17, 30.48, 114.33, 30.62),
                     wrs_path=123, wrs_row=39)  # product="sr" for Collection 2 Level-2 surface reflectance
    print(plan.describe())                 # offline: CRS, grid, pixel count, expected store size
    pull_region(plan, "stores/wuhan.zarr")  # needs Earth Engine credentials

Only :func:`initialize_earthengine`, :func:`open_xee` and :func:`pull_region` reach the network; planning,
building the collection and :func:`xee_to_cube` work offline. ``ee`` and ``xee`` are imported inside the
functions that use them, so importing this package stays cheap. One module per step: ``plan`` (the grid, the
plan and its sizes, the regions file), ``collection`` (sensors, products, band names; the ``ee.ImageCollection``
and opening it with xee), ``auth`` (credentials and ``ee.Initialize``), ``convert`` (:func:`xee_to_cube`) and
``pull`` (choosing the dates, :func:`pull_region`); every public name is importable from here.

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

from cmsn_cube.exceptions import RegionError
from cmsn_cube.qa import cloud_fraction as cloud_fraction  # importable from here, as before the split
from cmsn_cube.sources._common import SR_FILL_DN, SR_OFFSET, SR_SCALE, BBox, utm_crs
from cmsn_cube.sources.earthengine.auth import (
    CREDENTIAL_ENV_VARS,
    INITIALIZE_TIMEOUT_S,
    PROJECT_ENV_VARS,
    initialize_earthengine,
)
from cmsn_cube.sources.earthengine.collection import (
    COLLECTIONS,
    DEFAULT_XEE_CHUNKS,
    PRODUCT_COLLECTIONS,
    QA_BAND,
    SR_BAND_PREFIX,
    SR_COLLECTIONS,
    WRS_PATH_PROPERTY,
    WRS_ROW_PROPERTY,
    Product,
    Sensor,
    build_collection,
    collection_for_plan,
    collection_id,
    open_xee,
    sensor_band_names,
)
from cmsn_cube.sources.earthengine.convert import xee_to_cube
from cmsn_cube.sources.earthengine.plan import (
    REGIONS_FILE,
    REVISIT_DAYS,
    PullPlan,
    Transform,
    grid_for_bbox,
    load_regions,
    plan_pull,
    plan_region,
)
from cmsn_cube.sources.earthengine.pull import choose_dates, pull_region

__all__ = [
    "BBox",
    "COLLECTIONS",
    "CREDENTIAL_ENV_VARS",
    "DEFAULT_XEE_CHUNKS",
    "INITIALIZE_TIMEOUT_S",
    "PRODUCT_COLLECTIONS",
    "PROJECT_ENV_VARS",
    "Product",
    "PullPlan",
    "QA_BAND",
    "REGIONS_FILE",
    "REVISIT_DAYS",
    "RegionError",
    "SR_BAND_PREFIX",
    "SR_COLLECTIONS",
    "SR_FILL_DN",
    "SR_OFFSET",
    "SR_SCALE",
    "Sensor",
    "Transform",
    "WRS_PATH_PROPERTY",
    "WRS_ROW_PROPERTY",
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
