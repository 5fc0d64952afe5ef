"""A cube from the CBERS-4 AWFI time series GeoTIFFs (one file per band and date, plus a cloud mask).

File names follow ``CBERS-4_AWFI_<BAND>_<YYYY-MM-DD>.tif`` with ``B13`` blue, ``B14`` green, ``B15`` red,
``B16`` NIR (int16 reflectance x 1e4, nodata -9999) and ``CMASK`` (0 clear, 4 cloud), as in e-sensing/sits
``inst/extdata/raster/cbers``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS, make_cube
from cmsn_cube.exceptions import BandMismatchError, GridError, MissingDateError, NoDataError

#: CBERS-4 AWFI band designations for the common names (INPE CBERS-4 AWFI: B13 0.45-0.52 um ... B16 0.77-0.89 um).
CBERS_BANDS: dict[str, str] = {"blue": "B13", "green": "B14", "red": "B15", "nir": "B16"}

#: Digital numbers are reflectance x 1e4; -9999 marks no data (sits' CBERS example metadata).
CBERS_SCALE = 1e-4
CBERS_NODATA = -9999
#: CMASK class that means cloud (0 is clear).
CBERS_CLOUD_CLASS = 4
#: AWFI pixel size of these files (Albers equal-area grid), metres.
CBERS_SCALE_M = 64.0

_NAME = re.compile(r"CBERS-4_AWFI_(?P<band>B1[3-6]|CMASK)_(?P<date>\d{4}-\d{2}-\d{2})\.tif$")


def _read(path: Path) -> xr.DataArray:
    import rioxarray

    raster = rioxarray.open_rasterio(path, masked=False)
    if not isinstance(raster, xr.DataArray):
        raise BandMismatchError(f"{path} holds several subdatasets; expected one single-band CBERS GeoTIFF")
    return raster.squeeze("band", drop=True)


def open_cbers_series(folder: str | os.PathLike[str]) -> xr.Dataset:
    """Build a cube from a folder of CBERS-4 AWFI GeoTIFFs (B13-B16 + CMASK per date).

    Parameters
    ----------
    folder : str or path-like
        Folder holding ``CBERS-4_AWFI_{B13,B14,B15,B16,CMASK}_<date>.tif``.

    Returns
    -------
    xarray.Dataset
        A cube: ``reflectance`` scaled to [0, 1] (NaN where any file says -9999), ``cloud_mask`` from CMASK
        (class 4), sensor ``CBERS_4``, the files' CRS and grid, ``attrs["scale_m"] = 64``.

    Raises
    ------
    NoDataError
        No CBERS files in ``folder``.
    MissingDateError
        A date lacks one of the four bands or its CMASK.
    GridError
        Files of the series are on different grids.
    """
    folder = Path(folder)
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.glob("CBERS-4_AWFI_*.tif")):
        match = _NAME.match(path.name)
        if match:
            found.setdefault(match["date"], {})[match["band"]] = path
    if not found:
        raise NoDataError(f"no CBERS-4_AWFI_<band>_<date>.tif files in {folder}")
    needed = [*CBERS_BANDS.values(), "CMASK"]
    dates = sorted(found)
    for date in dates:
        missing = [b for b in needed if b not in found[date]]
        if missing:
            raise MissingDateError(f"date {date} in {folder} lacks {missing}; every date needs {needed}")
    first = _read(found[dates[0]][CBERS_BANDS["blue"]])
    crs = first.rio.crs
    shape = first.shape
    reflectance = np.empty((len(dates), len(BANDS), *shape), dtype=np.float32)
    cloud = np.empty((len(dates), *shape), dtype=bool)
    for t, date in enumerate(dates):
        for b, name in enumerate(BANDS):
            layer = _read(found[date][CBERS_BANDS[name]])
            if layer.shape != shape or not (
                np.array_equal(layer.x.values, first.x.values) and np.array_equal(layer.y.values, first.y.values)
            ):
                raise GridError(f"{found[date][CBERS_BANDS[name]].name} is not on the grid of the series' first file")
            if not np.issubdtype(layer.dtype, np.integer):
                raise BandMismatchError(f"{found[date][CBERS_BANDS[name]].name} holds {layer.dtype}, expected int16 DN")
            values = layer.values
            reflectance[t, b] = np.where(values == CBERS_NODATA, np.nan, values * CBERS_SCALE)
        cloud[t] = _read(found[date]["CMASK"]).values == CBERS_CLOUD_CLASS
    # a pixel missing in any band is no data in all of them (the schema's NaN rule), never cloud
    nodata = np.asarray(np.isnan(reflectance).any(axis=1))
    reflectance[np.broadcast_to(nodata[:, None], reflectance.shape)] = np.nan
    cloud &= ~nodata
    return make_cube(
        reflectance,
        time=np.array(dates, dtype="datetime64[ns]"),
        y=first.y.values,
        x=first.x.values,
        crs=crs,
        sensor="CBERS_4",
        cloud_mask=cloud,
        source=f"CBERS-4 AWFI GeoTIFFs ({folder.name})",
        attrs={"scale_m": CBERS_SCALE_M, "sensor_bands": ",".join(f"{k}={v}" for k, v in CBERS_BANDS.items())},
    )
