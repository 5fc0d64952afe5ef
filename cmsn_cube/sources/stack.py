"""A cube from any four-band time stack on disk: GeoTIFF or NetCDF, one multi-band file or one file per date.

Most users' own imagery is not in Earth Engine: a Sentinel-2 or CBERS series exported as one GeoTIFF with the
dates' bands one after the other, a folder of per-date GeoTIFFs, a NetCDF from a data cube. This reader takes
what it cannot guess as arguments (which band is blue, green, red, NIR; how digital numbers become
reflectance; the dates; an optional cloud-mask band) and refuses a file that does not fit them, with the reason.

>>> cube = open_stack(  # doctest: +SKIP
...     "2018_3A_Theia_Bouconne.tif", bands_per_date=10, bands={"blue": 1, "green": 2, "red": 3, "nir": 4},
...     scale=1e-4, nodata=-10000, dates=["2018-04-29", "2018-05-13", "2018-07-08"])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS, make_cube
from cmsn_cube.exceptions import BandMismatchError, CubeValidationError, MissingCRSError, MissingDateError

__all__ = ["open_stack"]

PathLike = str | os.PathLike[str]


def _read(path: Path, variable: str | None) -> xr.DataArray:
    """Read one raster file as ``(band, y, x)`` digital numbers with its CRS (GeoTIFF, or NetCDF through GDAL)."""
    import rioxarray

    if not path.exists():
        raise MissingDateError(f"{path} does not exist")
    try:
        raster = rioxarray.open_rasterio(path, masked=False, variable=variable)
    except Exception as error:  # rasterio raises its own errors for files that are not rasters
        raise CubeValidationError(f"{path.name} is not a raster GDAL can read: {error}") from None
    if isinstance(raster, list) or isinstance(raster, xr.Dataset):
        names = list(raster.data_vars) if isinstance(raster, xr.Dataset) else "several groups"
        raise BandMismatchError(f"{path.name} holds several variables ({names}); pass variable=<name>")
    if raster.rio.crs is None:
        raise MissingCRSError(f"{path.name} has no CRS: georeference it (e.g. gdal_edit.py -a_srs) first")
    if "band" not in raster.dims:
        raster = raster.expand_dims(band=[1])
    return raster


def _scaled(raster: xr.DataArray, path: Path, scale: float | None, offset: float, nodata: float | None) -> np.ndarray:
    """Return reflectance from digital numbers: ``DN * scale + offset``, NaN at ``nodata`` (default: the file's)."""
    values = np.asarray(raster.values)
    missing = ~np.isfinite(values) if values.dtype.kind == "f" else np.zeros(values.shape, dtype=bool)
    nodata = raster.rio.nodata if nodata is None else nodata
    if nodata is not None and np.isfinite(nodata):
        missing |= values == nodata
    if scale is None:
        # only float reflectance needs no scale; integers are scaled digital numbers of some product
        finite = values[~missing]
        if values.dtype.kind != "f" or (finite.size and (finite.min() < -0.5 or finite.max() > 2.0)):
            raise CubeValidationError(
                f"{path.name} holds {values.dtype} values in [{finite.min() if finite.size else 'n/a'}, "
                f"{finite.max() if finite.size else 'n/a'}], not reflectance: give scale= and offset= "
                "(e.g. scale=1e-4 for reflectance x 10^4; scale=2.75e-5, offset=-0.2 for Landsat Collection 2 "
                "surface reflectance; scale=1/255 for 8-bit imagery)"
            )
        scale = 1.0
    reflectance = values.astype(np.float64) * scale + offset
    return np.where(missing, np.nan, reflectance).astype(np.float32)


def open_stack(
    paths: PathLike | Sequence[PathLike],
    *,
    dates: Sequence[Any],
    bands: Mapping[str, int],
    bands_per_date: int | None = None,
    scale: float | None = None,
    offset: float = 0.0,
    nodata: float | None = None,
    mask_band: int | None = None,
    cloud_values: Sequence[int] = (),
    variable: str | None = None,
    sensor: str = "OTHER",
    source: str | None = None,
    crop_to_common: bool = False,
) -> xr.Dataset:
    """Read a GeoTIFF/NetCDF time stack into a validated cube.

    Parameters
    ----------
    paths : path or sequence of paths
        One file holding every date (its bands date-major: date 1's bands, then date 2's...), or one file per
        date, in date order. GeoTIFF or NetCDF (anything GDAL reads, with a CRS).
    dates : sequence of datetime-like
        Acquisition date of each date (files rarely carry them).
    bands : mapping
        Position (1-based, within one date's bands) of ``blue``, ``green``, ``red`` and ``nir``.
    bands_per_date : int, optional
        Bands per date in a single-file stack (required there); default the file's band count for one file
        per date.
    scale, offset : float
        Reflectance = digital number * ``scale`` + ``offset``. ``scale`` may be left out only for files that
        already hold float reflectance.
    nodata : float, optional
        Digital number of missing pixels; default the file's nodata value. Missing pixels become NaN.
    mask_band : int, optional
        Position (1-based, within one date's bands) of a cloud-mask band; pixels whose value is in
        ``cloud_values`` are cloud (``cloud_mask``). Without it the cube has an all-clear ``cloud_mask``.
    cloud_values : sequence of int
        Values of ``mask_band`` that mean cloud (or cloud shadow).
    variable : str, optional
        The variable of a NetCDF file that holds the bands.
    sensor : str
        Sensor name recorded per date.
    source : str, optional
        Recorded in ``attrs["source"]``; default the file names.
    crop_to_common : bool
        Per-date files of different sizes that share CRS, pixel size and upper-left corner are cropped to
        their common extent (else refused as on different grids).

    Returns
    -------
    xarray.Dataset
        A cube (:func:`cmsn_cube.cube.make_cube`) with the file's grid and CRS.

    Raises
    ------
    BandMismatchError
        The band map is incomplete or points past a date's bands; the band count does not match the dates.
    MissingCRSError
        A file has no CRS.
    CubeValidationError
        Integer digital numbers without ``scale``; a file GDAL cannot read; dates on different grids.
    MissingDateError
        A file is missing, or the number of dates does not match the files.
    """
    files = _file_list(paths)
    _check_band_map(bands)
    per_date, names = _read_dates(files, len(dates), bands_per_date, variable=variable, crop_to_common=crop_to_common)
    _check_positions(bands, mask_band, count=per_date[0].sizes["band"])
    return make_cube(
        _reflectance(per_date, names, bands, scale=scale, offset=offset, nodata=nodata),
        time=list(dates),
        y=per_date[0]["y"].values,
        x=per_date[0]["x"].values,
        crs=per_date[0].rio.crs,
        sensor=sensor,
        cloud_mask=_cloud_mask(per_date, mask_band, cloud_values),
        source=source or ", ".join(sorted({p.name for p in names})),
    )


def _file_list(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """Return ``paths`` as a list of paths (one path or several), or raise when there is none."""
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not files:
        raise MissingDateError("no file given")
    return files


def _check_band_map(bands: Mapping[str, int]) -> None:
    """Raise unless ``bands`` maps each of :data:`BANDS`, and nothing else, to a band position."""
    if sorted(bands) != sorted(BANDS):
        raise BandMismatchError(f"bands must map each of {list(BANDS)} to a band position, got {dict(bands)}")


def _read_dates(
    files: list[Path], n_dates: int, bands_per_date: int | None, *, variable: str | None, crop_to_common: bool
) -> tuple[list[xr.DataArray], list[Path]]:
    """Read the files and return each date's ``(band, y, x)`` raster and file, the dates checked to share a grid."""
    rasters = [_read(path, variable) for path in files]
    if len(files) == 1:
        if bands_per_date is None:
            raise BandMismatchError(f"{files[0].name} is one file: give bands_per_date (its bands per date)")
        total = rasters[0].sizes["band"]
        if total != bands_per_date * n_dates:
            raise BandMismatchError(
                f"{files[0].name} has {total} bands, but {n_dates} dates x {bands_per_date} bands per date = "
                f"{bands_per_date * n_dates}"
            )
        per_date = [rasters[0].isel(band=slice(t * bands_per_date, (t + 1) * bands_per_date)) for t in range(n_dates)]
        names = [files[0]] * n_dates
    else:
        if len(files) != n_dates:
            raise MissingDateError(f"{len(files)} files for {n_dates} dates: give one date per file")
        per_date, names = rasters, files
    if crop_to_common:
        height, width = (min(r.sizes[dim] for r in per_date) for dim in ("y", "x"))
        per_date = [r.isel(y=slice(0, height), x=slice(0, width)) for r in per_date]
    _check_one_grid(per_date, names, bands_per_date)
    return per_date, names


def _check_one_grid(per_date: list[xr.DataArray], names: list[Path], bands_per_date: int | None) -> None:
    """Raise unless every date has the first date's band count, CRS, size and transform."""
    first = per_date[0]
    for path, raster in zip(names, per_date, strict=True):
        if raster.sizes["band"] != (bands_per_date or first.sizes["band"]):
            raise BandMismatchError(f"{path.name} has {raster.sizes['band']} bands, {first.sizes['band']} expected")
        on_grid = (
            raster.rio.crs == first.rio.crs
            and raster.shape[1:] == first.shape[1:]
            and np.allclose(raster.rio.transform(), first.rio.transform())
        )
        if not on_grid:
            raise CubeValidationError(f"{path.name} is on another grid (CRS, size or transform) than {names[0].name}")


def _check_positions(bands: Mapping[str, int], mask_band: int | None, *, count: int) -> None:
    """Raise unless the band map and the mask band point at bands 1..``count`` of one date."""
    positions = [bands[band] for band in BANDS] + ([mask_band] if mask_band is not None else [])
    if any(not 1 <= int(p) <= count for p in positions):
        raise BandMismatchError(f"band positions {positions} must lie in 1..{count} (the bands of one date)")


def _reflectance(
    per_date: list[xr.DataArray],
    names: list[Path],
    bands: Mapping[str, int],
    *,
    scale: float | None,
    offset: float,
    nodata: float | None,
) -> np.ndarray:
    """Return the ``(time, band, y, x)`` reflectance of the four bands in :data:`BANDS` order."""
    return np.stack(
        [
            _scaled(raster.isel(band=[bands[band] - 1 for band in BANDS]), path, scale, offset, nodata)
            for path, raster in zip(names, per_date, strict=True)
        ]
    )


def _cloud_mask(per_date: list[xr.DataArray], mask_band: int | None, cloud_values: Sequence[int]) -> np.ndarray:
    """Return the ``(time, y, x)`` cloud mask: ``mask_band`` in ``cloud_values``, all clear without a mask band."""
    if mask_band is None:
        return np.zeros((len(per_date), *per_date[0].shape[1:]), dtype=bool)
    return np.stack([np.isin(r.isel(band=mask_band - 1).values, list(cloud_values)) for r in per_date])
