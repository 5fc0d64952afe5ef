"""Seed-style GeoTIFF import: ``Region_T{1,2,3}_Patch{i}.tif`` files (B2, B3, B4, B5 [, QA_PIXEL]) into a cube.

The seed exported Earth Engine patches to Google Drive as loose GeoTIFFs, one per date. This reader keeps NaN
as no data (the seed zeroed it with ``np.nan_to_num``, which the network then learnt as black ground).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS, SENSOR_BANDS, make_cube
from cmsn_cube.exceptions import BandMismatchError, MissingDateError
from cmsn_cube.sources.stack import check_one_grid, read_raster

QA_BAND = "QA_PIXEL"


def seed_patch_paths(folder: str | os.PathLike[str], region: str, patch: int, *, n_dates: int = 3) -> list[Path]:
    """Return the files ``{region}_T{t}_Patch{patch}.tif`` for t = 1..n_dates; raise if any is missing."""
    paths = [Path(folder) / f"{region}_T{t}_Patch{patch}.tif" for t in range(1, n_dates + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise MissingDateError(f"missing date file(s) {missing} in {folder}; each patch needs T1..T{n_dates}")
    return paths


def _band_names(da: xr.DataArray) -> list[str]:
    names = da.attrs.get("long_name")
    if isinstance(names, str):
        names = [names]
    if names is None or len(names) != da.sizes["band"]:
        return []
    return [str(n) for n in names]


def _read_date(path: Path, sensor: str) -> tuple[xr.DataArray, xr.DataArray | None]:
    """Reflectance (band, y, x) in common band order and QA (y, x) of one file."""
    raster = read_raster(path, masked=True)
    names = _band_names(raster)
    wanted = [SENSOR_BANDS[sensor][band] for band in BANDS]
    if names and all(name in names for name in wanted):
        reflectance = raster.isel(band=[names.index(name) for name in wanted])
        qa = raster.isel(band=names.index(QA_BAND)) if QA_BAND in names else None
    elif raster.sizes["band"] in (4, 5):
        # no band descriptions: the seed's export order, B2, B3, B4, B5 [, QA_PIXEL]
        reflectance = raster.isel(band=slice(0, 4))
        qa = raster.isel(band=4) if raster.sizes["band"] == 5 else None
    else:
        raise BandMismatchError(
            f"{path.name} has bands {names or raster.sizes['band']}; expected {wanted} (+ optional {QA_BAND})"
        )
    return reflectance.drop_vars("band"), qa


def _qa_to_uint16(qa: xr.DataArray) -> np.ndarray:
    """Return QA words as uint16: Earth Engine exports QA_PIXEL as float beside float reflectance; NaN -> fill bit."""
    values = np.asarray(qa.values, dtype="float64")
    return np.where(np.isfinite(values), values, 1).astype(np.uint16)


def open_seed_patches(
    folder: str | os.PathLike[str],
    *,
    region: str,
    patch: int,
    dates: Sequence[Any] | None = None,
    sensor: str = "LANDSAT_8",
    n_dates: int = 3,
) -> xr.Dataset:
    """Read one patch of the seed's export (``{region}_T{t}_Patch{patch}.tif``) into a cube.

    Parameters
    ----------
    folder : path-like
        Folder holding the GeoTIFFs.
    region : str
        File name prefix, e.g. ``"Wuhan"``.
    patch : int
        Patch number in the file names.
    dates : sequence of datetime-like, optional
        Acquisition date of T1..Tn (the files do not carry it). Default: placeholder days 1..n of 2000, with a
        warning.
    sensor : str
        ``LANDSAT_5`` or ``LANDSAT_8``; selects which band names mean blue/green/red/NIR.
    n_dates : int
        Number of dates per patch.

    Returns
    -------
    xarray.Dataset
        A cube with ``reflectance`` (NaN kept as no data) and, when the files have QA_PIXEL, ``qa_pixel`` and the
        decoded ``cloud_mask``.

    Raises
    ------
    MissingDateError
        A date file is missing.
    GridError
        The dates are not on one grid (CRS or size differ, or pixels lie more than 1e-3 px apart).
    CubeValidationError, MissingCRSError
        A file GDAL cannot open or read (truncated, corrupt); a file without CRS or georeferencing.
    """
    if sensor not in SENSOR_BANDS:
        raise BandMismatchError(f"unknown sensor {sensor!r}; choose from {sorted(SENSOR_BANDS)}")
    paths = seed_patch_paths(folder, region, patch, n_dates=n_dates)
    layers = [_read_date(path, sensor) for path in paths]
    check_one_grid([reflectance for reflectance, _ in layers], paths)
    dates = _dates_or_placeholders(dates, n_dates)
    first = layers[0][0]
    qas = [qa for _, qa in layers]
    has_qa = all(qa is not None for qa in qas)
    cube = make_cube(
        np.stack([np.asarray(r.values, dtype=np.float32) for r, _ in layers]),
        time=dates,
        y=first["y"].values,
        x=first["x"].values,
        crs=first.rio.crs,
        sensor=sensor,
        qa_pixel=np.stack([_qa_to_uint16(qa) for qa in qas]) if has_qa else None,  # type: ignore[arg-type]
        source=f"seed GeoTIFFs {region} patch {patch} in {folder}",
    )
    if has_qa:
        from cmsn_cube.qa import add_cloud_mask

        cube = add_cloud_mask(cube)
    return cube


def _dates_or_placeholders(dates: Sequence[Any] | None, n_dates: int) -> Sequence[Any]:
    """Return ``dates`` (one per file), or placeholder days 2000-01-01.. with a warning when none are given."""
    if dates is None:
        warnings.warn(
            "the GeoTIFFs carry no acquisition dates; using placeholder dates 2000-01-01.. (pass dates=[...])",
            stacklevel=3,  # the caller of open_seed_patches
        )
        dates = [np.datetime64("2000-01-01") + np.timedelta64(i, "D") for i in range(n_dates)]
    if len(dates) != n_dates:
        raise MissingDateError(f"{len(dates)} dates given for {n_dates} files")
    return dates
