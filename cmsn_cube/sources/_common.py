"""Offline steps the two Landsat sources share: the bbox and window checks, the UTM grid, the finished cube.

The Earth Engine source (:mod:`cmsn_cube.sources.earthengine`) and the STAC source (:mod:`cmsn_cube.sources.stac`)
plan the same things (a bbox in degrees, a window of days, a grid in the UTM zone of the bbox), read the same
Collection 2 Level-2 products and finish their cubes the same way; this module holds that common part once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import xarray as xr

from cmsn_cube.cube import BANDS
from cmsn_cube.exceptions import RegionError
from cmsn_cube.qa import add_cloud_mask, add_slc_off_gaps, slc_off_dates

#: ``(west, south, east, north)`` in degrees (EPSG:4326).
BBox = tuple[float, float, float, float]

#: Bytes per pixel and date in the store, uncompressed: 4 float32 bands + uint16 QA + bool mask.
STORE_BYTES_PER_PIXEL = 4 * len(BANDS) + 2 + 1

#: Collection 2 Level-2 surface reflectance = DN * SR_SCALE + SR_OFFSET, and DN 0 is fill. Source: USGS Landsat
#: Collection 2 Level-2 Science Product Guide (the same for TM, ETM+, OLI and OLI-2).
SR_SCALE, SR_OFFSET, SR_FILL_DN = 2.75e-05, -0.2, 0


def utm_crs(lon: float, lat: float) -> str:
    """Return the EPSG code of the WGS 84 UTM zone holding ``(lon, lat)`` (``EPSG:326NN`` north, ``EPSG:327NN`` south).

    Examples
    --------
    >>> utm_crs(114.3, 30.6), utm_crs(145.3, -34.4)
    ('EPSG:32650', 'EPSG:32755')
    """
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def check_bbox(bbox: Sequence[float]) -> BBox:
    """Return ``bbox`` as four floats, or raise a RegionError when it is not ``(west, south, east, north)``.

    Examples
    --------
    >>> check_bbox([114, 30.5, 114.5, 31])
    (114.0, 30.5, 114.5, 31.0)
    """
    values = tuple(float(v) for v in bbox)
    if len(values) != 4:
        raise RegionError(f"bbox must be (west, south, east, north) in degrees, got {bbox!r}")
    west, south, east, north = values
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise RegionError(
            f"bbox {values} is not (west, south, east, north) in degrees with west < east and south < north"
        )
    return values  # type: ignore[return-value]


def iso_day(value: str | dt.date, what: str) -> str:
    """Return the ISO day of a date or an ISO date string; ``what`` names the argument in the error.

    Examples
    --------
    >>> iso_day("2013-05-12T02:55:00", "start")
    '2013-05-12'
    """
    try:
        return dt.date.fromisoformat(str(value)[:10]).isoformat()
    except ValueError as error:
        raise RegionError(f"{what} must be an ISO date like 2013-05-12, got {value!r}") from error


def check_window(start: str | dt.date, end: str | dt.date) -> tuple[str, str]:
    """Return the window's first and last ISO day, or raise a RegionError when it ends before it starts."""
    start_day, end_day = iso_day(start, "start"), iso_day(end, "end")
    if end_day < start_day:
        raise RegionError(f"end {end_day} comes before start {start_day}")
    return start_day, end_day


def add_landsat_masks(cube: xr.Dataset) -> xr.Dataset:
    """Add ``slc_off(time)``, ``cloud_mask`` decoded from QA, and the Landsat 7 SLC-off stripes as gaps to fill.

    The last step of both Landsat sources: :func:`cmsn_cube.qa.add_cloud_mask`, then
    :func:`cmsn_cube.qa.add_slc_off_gaps` on the dates :func:`cmsn_cube.qa.slc_off_dates` flags.
    """
    # a per-date flag that travels into the reconstruction (its coords come from the cube's)
    cube = cube.assign_coords(slc_off=slc_off_dates(cube))
    return add_slc_off_gaps(add_cloud_mask(cube))
