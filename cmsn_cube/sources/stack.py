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
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS, make_cube
from cmsn_cube.exceptions import (
    BandMismatchError,
    CubeValidationError,
    GridError,
    MissingCRSError,
    MissingDateError,
    ReflectanceRangeError,
)

__all__ = ["QA_KINDS", "check_one_grid", "grid_mismatch", "open_stack", "pixel_size_m", "read_raster"]

PathLike = str | os.PathLike[str]

#: Two rasters are on one grid when every corner of one lies within this fraction of a pixel of the other's: float
#: noise passes, a shift does not (a relative tolerance on coordinates let 34 m through at y = 3.4e6 m).
GRID_TOLERANCE_PX = 1e-3

#: The brightest scaled value of a whole stack (four bands, every date) must reach this: land, cloud and haze all
#: do, while a wrong scale stays below (uint8 DN x 1e-4 reach 0.0255, float reflectance x 1e-4 reach 1e-4).
MIN_BRIGHTEST_REFLECTANCE = 0.05

#: Beyond these, scaled values are no reflectance (bright cloud tops reach ~1.5): the cube's own bounds.
REFLECTANCE_LIMITS = (-0.5, 2.0)

#: 1-D coordinate variables looked for, in this order, in a NetCDF file whose x/y GDAL does not recognise.
NETCDF_AXES = (("x", "y"), ("lon", "lat"), ("longitude", "latitude"))


def read_raster(
    path: PathLike, *, variable: str | None = None, masked: bool = False, chunks: int | None = None
) -> xr.DataArray:
    """Read one raster file, in memory or lazily, as ``(band, y, x)`` with its CRS and grid; refuse it otherwise.

    GeoTIFF, or NetCDF through GDAL. A NetCDF whose x/y lack the CF attributes GDAL looks for is put on the grid
    of its own 1-D ``x``/``y`` (or ``lon``/``lat``) variables, its rows in the file's order; a file without such
    variables is refused, never given an invented grid. The scale and offset the file declares per band (GDAL's:
    GeoTIFF scale/offset tags, NetCDF ``scale_factor``/``add_offset``; 1 and 0 where none) come along as the
    band coordinates ``declared_scale`` and ``declared_offset``.

    Parameters
    ----------
    path : path-like
        The file.
    variable : str, optional
        The variable of a NetCDF file that holds the bands.
    masked : bool
        No data as NaN (rioxarray's ``masked``); digital numbers as stored otherwise.
    chunks : int, optional
        Read lazily: a Dask array of ``chunks`` x ``chunks`` px tiles, each read from the file when computed (only
        its header is read here); a tile that fails to read raises a CubeValidationError naming the file. Not
        with ``masked``. Default: read the whole file now.

    Returns
    -------
    xarray.DataArray
        ``(band, y, x)``, loaded (or lazy, with ``chunks``).

    Raises
    ------
    MissingDateError
        The file does not exist.
    CubeValidationError
        GDAL cannot open the file or read its pixels (not a raster, truncated, corrupt).
    BandMismatchError
        A NetCDF file of several variables and no ``variable``.
    MissingCRSError
        The file has no CRS.
    GridError
        The file has no georeferencing, or NetCDF coordinates that are not a regular grid.
    """
    path = Path(path)
    if not path.exists():
        raise MissingDateError(f"{path} does not exist")
    raster = _open(path, variable=variable, masked=masked, lazy=chunks is not None)
    if raster.rio.crs is None:
        raise MissingCRSError(f"{path.name} has no CRS: georeference it (e.g. gdal_edit.py -a_srs) first")
    if tuple(raster.rio.transform())[:6] == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
        # GDAL found no georeferencing and numbered the pixels 0.5, 1.5, ... instead
        # (read whole: GDAL reads such a file's rows in the file's order only inside the options set here)
        raster = _on_file_coordinates(path, raster, variable=variable, masked=masked)
    elif chunks is not None:
        raster = _lazily(path, raster, variable=variable, chunks=chunks)
    if "band" not in raster.dims:
        raster = raster.expand_dims(band=[1])
    return _with_declared_scaling(raster)


class _TileReader:
    """The pixels of one raster file, read window by window when indexed: the source of a lazy raster's Dask array.

    Each read opens the file anew (no handle is held between tiles); an error names the file, in one line.
    """

    def __init__(self, source: str, name: str, shape: tuple[int, int, int], dtype: np.dtype) -> None:
        self.source, self.name, self.shape, self.dtype, self.ndim = source, name, shape, np.dtype(dtype), 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        import rasterio
        from rasterio.windows import Window

        (b0, b1, _), (r0, r1, _), (c0, c1, _) = (k.indices(n) for k, n in zip(key, self.shape, strict=True))
        if b1 <= b0 or r1 <= r0 or c1 <= c0:
            return np.empty((max(b1 - b0, 0), max(r1 - r0, 0), max(c1 - c0, 0)), dtype=self.dtype)
        try:
            with warnings.catch_warnings(), rasterio.open(self.source) as file:
                warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
                window = Window(c0, r0, c1 - c0, r1 - r0)
                return file.read(list(range(b0 + 1, b1 + 1)), window=window, out_dtype=self.dtype)
        except Exception as error:  # a truncated or corrupt tile, a file removed since it was opened
            raise CubeValidationError(f"{self.name} cannot be read, truncated or corrupt: {_one_line(error)}") from None


def _lazily(path: Path, raster: xr.DataArray, *, variable: str | None, chunks: int) -> xr.DataArray:
    """Return ``raster`` (opened, not loaded) on a Dask array of :class:`_TileReader` tiles of ``chunks`` px."""
    import dask.array as da

    source = f'NETCDF:"{path}":{variable}' if variable is not None and _is_netcdf(path) else str(path)
    shape = (raster.sizes.get("band", 1), raster.sizes["y"], raster.sizes["x"])
    reader = _TileReader(source, path.name, shape, raster.dtype)
    data = da.from_array(reader, chunks=(shape[0], chunks, chunks), meta=np.empty((0, 0, 0), raster.dtype))
    if "band" not in raster.dims:
        return raster.expand_dims(band=[1]).copy(data=data)
    return raster.copy(data=data)


def _open(
    path: Path, *, variable: str | None, masked: bool, gdal: Mapping[str, str] | None = None, lazy: bool = False
) -> xr.DataArray:
    """Open and load one raster with rioxarray (GDAL options ``gdal``); what GDAL raises becomes one line.

    ``lazy``: open it only (its header is read, so a file that is no raster is refused all the same).
    """
    import rasterio
    import rioxarray

    with warnings.catch_warnings(), rasterio.Env(**(gdal or {})):
        # read_raster checks the georeferencing and reads per-band scales itself
        warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
        warnings.filterwarnings("ignore", message=r"(Scales|Offsets) differ across bands")
        try:
            # the dates are arguments: a NetCDF's time axis is only the order of its bands, and need not decode
            raster = rioxarray.open_rasterio(path, masked=masked, variable=variable, decode_times=False)
        except Exception as error:  # rasterio raises its own errors for files that are not rasters
            raise CubeValidationError(f"{path.name} is not a raster GDAL can read: {_one_line(error)}") from None
        if isinstance(raster, xr.Dataset) and len(raster.data_vars) == 1:
            raster = next(iter(raster.data_vars.values()))  # the one variable asked for, of a file of several
        if isinstance(raster, list) or isinstance(raster, xr.Dataset):
            names = list(raster.data_vars) if isinstance(raster, xr.Dataset) else "several groups"
            raise BandMismatchError(f"{path.name} holds several variables ({names}); pass variable=<name>")
        if raster.ndim == 3 and "band" not in raster.dims:
            # a NetCDF variable (time, y, x): its extra axis holds the bands
            extra = raster.dims[0]
            raster = raster.drop_vars([extra], errors="ignore").rename({extra: "band"})
            raster = raster.assign_coords(band=np.arange(1, raster.sizes["band"] + 1))
        if lazy:
            return raster
        try:
            return raster.load()
        except Exception as error:  # the header opened but the pixels did not: a truncated or corrupt file
            raise CubeValidationError(f"{path.name} cannot be read, truncated or corrupt: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    """Return an error's message on one line (GDAL's span several)."""
    return " ".join(str(error).split())


def _on_file_coordinates(path: Path, raster: xr.DataArray, *, variable: str | None, masked: bool) -> xr.DataArray:
    """Return ``raster`` re-read on the grid of the NetCDF file's own 1-D x/y variables, or raise a GridError."""
    axes = _netcdf_axes(path, width=raster.sizes["x"], height=raster.sizes["y"]) if _is_netcdf(path) else None
    if axes is None:
        where = (
            " and no 1-D x/y (or lon/lat) variables of its width and height; give x/y the CF attributes "
            "(standard_name projection_x_coordinate / projection_y_coordinate, units)"
            if _is_netcdf(path)
            else "; georeference it (e.g. gdal_edit.py -a_ullr ulx uly lrx lry)"
        )
        raise GridError(f"{path.name} has no georeferencing: GDAL finds no geotransform{where}")
    for name, values in zip(("x", "y"), axes, strict=True):
        steps = np.diff(values)
        irregular = not np.isfinite(values).all() or (
            steps.size > 0 and (steps[0] == 0 or np.abs(steps - steps[0]).max() > GRID_TOLERANCE_PX * abs(steps[0]))
        )
        if irregular:
            raise GridError(
                f"{path.name} has no georeferencing: its {name} variable is not a regular grid "
                f"(steps {np.nanmin(steps):g} .. {np.nanmax(steps):g}, or missing values)"
            )
    # without coordinates GDAL turns the rows upside down (it assumes south-up files): read them as stored
    stored = _open(path, variable=variable, masked=masked, gdal={"GDAL_NETCDF_BOTTOMUP": "NO"})
    on_grid = stored.assign_coords(x=axes[0], y=axes[1])
    return on_grid.rio.write_transform(on_grid.rio.transform(recalc=True))


def _is_netcdf(path: Path) -> bool:
    """Tell a NetCDF file (classic ``CDF``, or NetCDF-4's HDF5) by its first bytes."""
    with path.open("rb") as file:
        head = file.read(4)
    return head[:3] == b"CDF" or head == b"\x89HDF"


def _netcdf_axes(path: Path, *, width: int, height: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Return the first pair of :data:`NETCDF_AXES` whose 1-D variables have lengths ``width``, ``height``."""
    for x_name, y_name in NETCDF_AXES:
        x, y = _netcdf_vector(path, x_name), _netcdf_vector(path, y_name)
        if x is not None and y is not None and (x.size, y.size) == (width, height):
            return x, y
    return None


def _netcdf_vector(path: Path, name: str) -> np.ndarray | None:
    """Return the 1-D variable ``name`` of a NetCDF file read through GDAL, or None where there is none."""
    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(f'NETCDF:"{path}":{name}') as vector:
                values = vector.read(1) if vector.count == 1 and vector.height == 1 else None
    except rasterio.errors.RasterioError:
        return None
    return None if values is None else values.astype("float64").ravel()


def _with_declared_scaling(raster: xr.DataArray) -> xr.DataArray:
    """Add the file's own per-band scale and offset (1 and 0 where it declares none) as band coordinates."""
    count = raster.sizes["band"]
    scales = raster.attrs.get("scales", [raster.attrs.get("scale_factor", 1.0)] * count)
    offsets = raster.attrs.get("offsets", [raster.attrs.get("add_offset", 0.0)] * count)
    return raster.assign_coords(
        declared_scale=("band", np.asarray(scales, dtype="float64")),
        declared_offset=("band", np.asarray(offsets, dtype="float64")),
    )


def grid_mismatch(transform: Sequence[float], other: Sequence[float], shape: tuple[int, int]) -> str | None:
    """Say how the grid of transform ``other`` differs from that of ``transform``, or None when they are one.

    Both grids have ``shape`` (rows, columns); transforms are affine, in GDAL/rasterio order ``a, b, c, d, e, f``.
    They are one when every corner of the ``other`` grid lies within :data:`GRID_TOLERANCE_PX` of a pixel of the
    same corner of the first: origins, pixel sizes and rotations alike, compared in pixels, not with a tolerance
    relative to the coordinates (which let a 30 m shift pass at y = 3.4e6 m and refused it in x).

    Examples
    --------
    >>> from affine import Affine
    >>> grid_mismatch(Affine(30, 0, 5e5, 0, -30, 3.4e6), Affine(30, 0, 5e5, 0, -30, 3.4e6 + 30), (10, 10))
    'its pixels lie up to 1 px off (origin moved by +0, +30 in x, y; pixel size 30 x -30 vs 30 x -30)'
    >>> grid_mismatch(Affine(30, 0, 5e5, 0, -30, 3.4e6), Affine(30, 0, 5e5 + 1e-6, 0, -30, 3.4e6), (10, 10)) is None
    True
    """
    from affine import Affine

    first, second = Affine(*tuple(transform)[:6]), Affine(*tuple(other)[:6])
    to_first_pixels = ~first
    height, width = shape
    worst = 0.0
    for corner in ((0, 0), (width, 0), (0, height), (width, height)):
        col, row = to_first_pixels * (second * corner)
        worst = max(worst, abs(col - corner[0]), abs(row - corner[1]))
    if worst <= GRID_TOLERANCE_PX:
        return None
    return (
        f"its pixels lie up to {worst:.3g} px off (origin moved by {second.c - first.c:+g}, {second.f - first.f:+g} "
        f"in x, y; pixel size {second.a:g} x {second.e:g} vs {first.a:g} x {first.e:g})"
    )


def check_one_grid(rasters: Sequence[xr.DataArray], names: Sequence[Path]) -> None:
    """Raise a GridError naming the first raster whose CRS, size or pixels (see :func:`grid_mismatch`) differ.

    ``rasters`` are ``(..., y, x)`` with a CRS, ``names`` their files; each is compared with the first.
    """
    first = rasters[0]
    first_shape = first.shape[-2], first.shape[-1]
    for path, raster in zip(names[1:], rasters[1:], strict=True):
        shape = raster.shape[-2], raster.shape[-1]
        if raster.rio.crs != first.rio.crs:
            reason: str | None = f"CRS {raster.rio.crs} vs {first.rio.crs}"
        elif shape != first_shape:
            reason = f"size {shape[1]} x {shape[0]} vs {first_shape[1]} x {first_shape[0]} px"
        else:
            reason = grid_mismatch(first.rio.transform(), raster.rio.transform(), first_shape)
        if reason:
            raise GridError(f"{path.name} is on another grid than {names[0].name}: {reason}")


def open_stack(
    paths: PathLike | Sequence[PathLike | Sequence[PathLike]],
    *,
    dates: Sequence[Any],
    bands: Mapping[str, int],
    bands_per_date: int | None = None,
    scale: float | None = None,
    offset: float | None = None,
    nodata: float | None = None,
    mask_band: int | None = None,
    cloud_values: Sequence[int] = (),
    variable: str | Sequence[str] | None = None,
    sensor: str | Sequence[str] = "OTHER",
    source: str | None = None,
    crop_to_common: bool = False,
    qa_band: int | None = None,
    qa: str = "landsat-c2",
    chunks: int | None = None,
    align: str | None = None,
) -> xr.Dataset:
    """Read a GeoTIFF/NetCDF time stack into a validated cube.

    Parameters
    ----------
    paths : path or sequence of paths
        One file holding every date (its bands date-major: date 1's bands, then date 2's...), or one file per
        date, in date order; or, per date, a list of files whose bands are that date's bands one after the other
        (one file per band, as Landsat Collection 2 ships them: ``[SR_B2, SR_B3, SR_B4, SR_B5, QA_PIXEL]``). GeoTIFF or NetCDF (anything GDAL reads, with a CRS and a grid: a NetCDF file's own
        1-D ``x``/``y`` variables where GDAL does not recognise them).
    dates : sequence of datetime-like
        Acquisition date of each date (files rarely carry them).
    bands : mapping
        Position (1-based, within one date's bands) of ``blue``, ``green``, ``red`` and ``nir``.
    bands_per_date : int, optional
        Bands per date in a single-file stack (required there, unless it holds one date); default the file's
        band count for one file per date.
    scale, offset : float, optional
        Reflectance = digital number * ``scale`` + ``offset``. Default: the scale and offset the files declare
        (GeoTIFF scale/offset tags, NetCDF ``scale_factor``/``add_offset``); for files that declare none,
        ``scale`` may be left out only where they already hold float reflectance. Given ones must agree with
        the files' own. The scaled stack must look like reflectance (within [-0.5, 2], its brightest value
        at least 0.05), or the scale is refused with the reason.
    nodata : float, optional
        Digital number of missing pixels; default the file's nodata value. Missing pixels become NaN.
    mask_band : int, optional
        Position (1-based, within one date's bands) of a cloud-mask band; pixels whose value is in
        ``cloud_values`` are cloud (``cloud_mask``). Without it the cube has an all-clear ``cloud_mask``.
    cloud_values : sequence of int
        Values of ``mask_band`` that mean cloud (or cloud shadow).
    variable : str or sequence of str, optional
        The variable of a NetCDF file that holds the bands; or, for one NetCDF file of one variable per band
        (``B2``, ``B3``, ``B4``, ``B8``, ``SCL``, each ``(time, y, x)``), the variables, in order: each date's
        bands are then these variables at that date (``bands`` and ``qa_band`` count within them).
    sensor : str or sequence of str
        Sensor name recorded for every date, or one per date.
    source : str, optional
        Recorded in ``attrs["source"]``; default the file names.
    crop_to_common : bool
        Per-date files of different sizes that share CRS, pixel size and upper-left corner are cropped to
        their common extent (else refused as on different grids).
    qa_band : int, optional
        Position (1-based, within one date's bands) of a quality band decoded as ``qa`` into ``cloud_mask``
        (instead of ``mask_band``).
    qa : str
        ``landsat-c2`` (Collection 2 ``QA_PIXEL`` bits, :func:`cmsn_cube.qa.cloud_mask_from_qa`; the band is
        also kept as ``qa_pixel``), ``landsat-c1`` (Collection 1 ``BQA``: cloud bit 4, high-confidence cloud
        shadow or cirrus) or ``scl`` (Sentinel-2 scene classes 3 shadow, 8, 9 cloud, 10 cirrus).
    chunks : int, optional
        Read lazily in tiles of ``chunks`` x ``chunks`` px (:func:`read_raster`): the cube is Dask-backed and
        :func:`cmsn_cube.store.write_cube` streams it; the files are read once more to check the reflectance
        range. Default: read everything into memory.
    align : {None, "first"}
        ``"first"``: dates on different grids (origins or pixel sizes apart, even another CRS) are resampled onto
        the first date's grid (rioxarray ``reproject_match``: bilinear for reflectance, nearest for ``mask_band``
        and ``qa_band``), then cropped to the pixels every date covers. Each date is read into memory to be
        resampled. Default: dates on different grids are refused.

    Returns
    -------
    xarray.Dataset
        A cube (:func:`cmsn_cube.cube.make_cube`) with the file's grid and CRS, ``attrs["scale_m"]`` the files'
        pixel size.

    Raises
    ------
    BandMismatchError
        The band map is incomplete or points past a date's bands; the band count does not match the dates.
    MissingCRSError
        A file has no CRS.
    GridError
        A file has no georeferencing; dates on different grids (CRS, size, or pixels more than 1e-3 px apart).
    ReflectanceRangeError
        The scaled values cannot be reflectance (a wrong ``scale`` or ``offset``).
    CubeValidationError
        Integer digital numbers without ``scale``; a scale unlike the one the file declares; a file GDAL cannot
        open or read (not a raster, truncated, corrupt).
    MissingDateError
        A file is missing, or the number of dates does not match the files.
    """
    files = _file_list(paths)
    _check_band_map(bands)
    if mask_band is not None and qa_band is not None:
        raise BandMismatchError("give mask_band (with cloud_values) or qa_band (with qa), not both")
    if qa not in QA_KINDS:
        raise BandMismatchError(f"qa must be one of {list(QA_KINDS)}, got {qa!r}")
    if align not in (None, "first"):
        raise GridError(f"align must be None or 'first', got {align!r}")
    categorical = {p for p in (mask_band, qa_band) if p is not None}
    per_date, names = _read_dates(
        files,
        len(dates),
        bands_per_date,
        variable=variable,
        crop_to_common=crop_to_common,
        chunks=chunks,
        align=align,
        categorical=categorical,
        nodata=nodata,
    )
    _check_positions(bands, mask_band if qa_band is None else qa_band, count=per_date[0].sizes["band"])
    qa_pixel, cloud_mask = (
        _cloud_mask(per_date, mask_band, cloud_values) if qa_band is None else _decoded_qa(per_date, qa_band, qa)
    )
    return make_cube(
        _reflectance(per_date, names, bands, scale=scale, offset=offset, nodata=nodata),
        time=list(dates),
        y=per_date[0]["y"].values,
        x=per_date[0]["x"].values,
        crs=per_date[0].rio.crs,
        sensor=sensor if isinstance(sensor, str) else list(sensor),
        qa_pixel=qa_pixel,
        cloud_mask=cloud_mask,
        source=source or ", ".join(sorted({p.name for group in files for p in group})),
        attrs={"scale_m": pixel_size_m(per_date[0])},
    )


def pixel_size_m(raster: xr.DataArray) -> float:
    """Return the side in metres of a square of the pixel's area, from the raster's transform.

    Metres of a projected CRS as they are; degrees of a geographic one as metres at the raster's centre
    (1 degree of latitude = 111,320 m).
    """
    transform = raster.rio.transform()
    width, height = abs(transform.a), abs(transform.e)
    crs = raster.rio.crs
    if crs is not None and crs.is_geographic:
        latitude = float(np.asarray(raster["y"]).mean()) if raster.sizes.get("y") else 0.0
        width, height = width * 111_320.0 * np.cos(np.radians(latitude)), height * 111_320.0
    return float(np.sqrt(width * height))


def _file_list(paths: PathLike | Sequence[PathLike | Sequence[PathLike]]) -> list[list[Path]]:
    """Return ``paths`` as a list of file groups (one file per group, or each date's list), or raise when empty."""
    if isinstance(paths, (str, os.PathLike)):
        return [[Path(paths)]]
    groups = [[Path(p)] if isinstance(p, (str, os.PathLike)) else [Path(q) for q in p] for p in paths]
    if not groups or not all(groups):
        raise MissingDateError("no file given" if not groups else "a date has an empty list of files")
    return groups


def _check_band_map(bands: Mapping[str, int]) -> None:
    """Raise unless ``bands`` maps each of :data:`BANDS`, and nothing else, to a band position."""
    if sorted(bands) != sorted(BANDS):
        raise BandMismatchError(f"bands must map each of {list(BANDS)} to a band position, got {dict(bands)}")


def _read_dates(
    groups: list[list[Path]],
    n_dates: int,
    bands_per_date: int | None,
    *,
    variable: str | Sequence[str] | None,
    crop_to_common: bool,
    chunks: int | None = None,
    align: str | None = None,
    categorical: set[int] | None = None,
    nodata: float | None = None,
) -> tuple[list[xr.DataArray], list[Path]]:
    """Read the files and return each date's ``(band, y, x)`` raster and file, the dates checked to share a grid.

    A date of several files is named by its first. ``align="first"``: resampled onto the first date's grid
    (:func:`_aligned`), ``categorical`` band positions by nearest neighbour.
    """
    if variable is not None and not isinstance(variable, str):
        per_date, names = _read_variables(groups, list(variable), n_dates)
    else:
        per_date, names = _read_per_date(groups, n_dates, bands_per_date, variable=variable, chunks=chunks)
    if align == "first":
        per_date = _aligned(per_date, names, categorical or set(), nodata=nodata)
    if crop_to_common:
        height, width = (min(r.sizes[dim] for r in per_date) for dim in ("y", "x"))
        per_date = [r.isel(y=slice(0, height), x=slice(0, width)) for r in per_date]
    _check_one_grid(per_date, names, bands_per_date if variable is None or isinstance(variable, str) else None)
    return per_date, names


def _read_variables(
    groups: list[list[Path]], variables: list[str], n_dates: int
) -> tuple[list[xr.DataArray], list[Path]]:
    """Read one NetCDF file of one ``(time, y, x)`` variable per band; return each date's ``(band, y, x)`` raster."""
    if len(groups) != 1 or len(groups[0]) != 1:
        raise BandMismatchError("several variables (one per band) are read from one NetCDF file, not several files")
    path = groups[0][0]
    layers = [read_raster(path, variable=name) for name in variables]
    check_one_grid(layers, [path] * len(layers))
    for name, layer in zip(variables, layers, strict=True):
        if layer.sizes["band"] != n_dates:
            raise MissingDateError(f"{path.name}: variable {name} has {layer.sizes['band']} dates, {n_dates} given")
    first = layers[0]
    on_first = [layer.assign_coords(x=first["x"], y=first["y"]) for layer in layers]
    per_date = []
    for t in range(n_dates):
        joined = xr.concat(
            [layer.isel(band=[t]) for layer in on_first], dim="band", coords="minimal", compat="override",
            combine_attrs="override",
        )  # fmt: skip
        per_date.append(joined.assign_coords(band=np.arange(1, len(variables) + 1)))
    return per_date, [path] * n_dates


def _aligned(
    per_date: list[xr.DataArray], names: list[Path], categorical: set[int], *, nodata: float | None
) -> list[xr.DataArray]:
    """Return every date resampled onto the first date's grid and cropped to the pixels every date covers.

    Reflectance bands become float64 (no data NaN, bilinear); ``categorical`` positions (masks, QA) keep their
    values (nearest) as float64; ``attrs["source_dtype"]`` keeps the files' type for the later checks.
    """
    from rasterio.enums import Resampling

    first = per_date[0]
    crs = first.rio.crs
    if crs is None:
        raise MissingCRSError(f"{names[0].name} has no CRS")
    transform = first.rio.transform()
    height, width = first.sizes["y"], first.sizes["x"]
    rows, cols = [0, height], [0, width]
    aligned = []
    for raster in per_date:
        dtype = np.dtype(raster.attrs.get("source_dtype", raster.dtype))
        scales, offsets = raster["declared_scale"].values, raster["declared_offset"].values
        raster = raster.load()
        same = (
            raster.rio.crs == crs
            and raster.shape[-2:] == first.shape[-2:]
            and grid_mismatch(transform, raster.rio.transform(), (height, width)) is None
        )
        left, bottom, right, top = raster.rio.transform_bounds(crs) if raster.rio.crs != crs else raster.rio.bounds()
        inverse = ~transform
        (c0, r0), (c1, r1) = inverse * (left, top), inverse * (right, bottom)
        c0, c1, r0, r1 = min(c0, c1), max(c0, c1), min(r0, r1), max(r0, r1)
        cols = [max(cols[0], int(np.ceil(c0 - GRID_TOLERANCE_PX))), min(cols[1], int(np.floor(c1 + GRID_TOLERANCE_PX)))]
        rows = [max(rows[0], int(np.ceil(r0 - GRID_TOLERANCE_PX))), min(rows[1], int(np.floor(r1 + GRID_TOLERANCE_PX)))]
        missing = raster.rio.nodata if nodata is None else nodata
        bands = []
        for position in range(1, raster.sizes["band"] + 1):
            band = raster.isel(band=[position - 1]).drop_vars(["declared_scale", "declared_offset"], errors="ignore")
            values = band.astype("float64")
            if position not in categorical and missing is not None and np.isfinite(missing):
                values = values.where(band != missing)
            values = values.rio.write_nodata(np.nan, encoded=False).rio.write_crs(raster.rio.crs)
            if same:
                values = values.assign_coords(x=first["x"], y=first["y"])
            else:
                resampling = Resampling.nearest if position in categorical else Resampling.bilinear
                values = values.rio.reproject_match(first, resampling=resampling, nodata=np.nan)
            bands.append(values)
        joined = xr.concat(bands, dim="band", coords="minimal", compat="override", combine_attrs="override")
        joined = joined.assign_coords(
            band=np.arange(1, len(bands) + 1), declared_scale=("band", scales), declared_offset=("band", offsets)
        )
        joined.attrs["source_dtype"] = str(dtype)
        aligned.append(joined.rio.write_nodata(np.nan, encoded=False))
    if rows[1] <= rows[0] or cols[1] <= cols[0]:
        raise GridError(f"the dates of {names[0].name} ... {names[-1].name} have no pixel in common")
    return [r.isel(y=slice(*rows), x=slice(*cols)) for r in aligned]


def _read_per_date(
    groups: list[list[Path]], n_dates: int, bands_per_date: int | None, *, variable: str | None, chunks: int | None
) -> tuple[list[xr.DataArray], list[Path]]:
    """Read one file of every date, or one file (or group of files) per date; return each date's raster."""
    rasters = [_read_group(group, variable=variable, chunks=chunks) for group in groups]
    files = [group[0] for group in groups]
    if len(files) == 1 and len(groups[0]) == 1:
        total = rasters[0].sizes["band"]
        if bands_per_date is None and n_dates == 1:
            bands_per_date = total  # one file of one date: its bands are that date's
        if bands_per_date is None:
            raise BandMismatchError(f"{files[0].name} is one file: give bands_per_date (its bands per date)")
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
    return per_date, names


def _read_group(group: list[Path], *, variable: str | None, chunks: int | None) -> xr.DataArray:
    """Read one date's files, checked to share a grid, as one raster of their bands one after the other."""
    rasters = [read_raster(path, variable=variable, chunks=chunks) for path in group]
    if len(rasters) == 1:
        return rasters[0]
    check_one_grid(rasters, group)
    first = rasters[0]
    on_first = [r.assign_coords(x=first["x"], y=first["y"]) for r in rasters]
    joined = xr.concat(on_first, dim="band", coords="minimal", compat="override", combine_attrs="override")
    return joined.assign_coords(band=np.arange(1, joined.sizes["band"] + 1))


def _check_one_grid(per_date: list[xr.DataArray], names: list[Path], bands_per_date: int | None) -> None:
    """Raise unless every date has the first date's band count and grid (:func:`check_one_grid`)."""
    first = per_date[0]
    for path, raster in zip(names, per_date, strict=True):
        if raster.sizes["band"] != (bands_per_date or first.sizes["band"]):
            raise BandMismatchError(f"{path.name} has {raster.sizes['band']} bands, {first.sizes['band']} expected")
    check_one_grid(per_date, names)


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
    offset: float | None,
    nodata: float | None,
) -> Any:
    """Return the ``(time, band, y, x)`` reflectance of the four bands in :data:`BANDS` order, checked to be one.

    Lazy (Dask) when the rasters are: their ranges are then computed in one pass over the files.
    """
    scaled = [
        _scaled(raster.isel(band=[bands[band] - 1 for band in BANDS]), path, scale=scale, offset=offset, nodata=nodata)
        for path, raster in zip(names, per_date, strict=True)
    ]
    arrays = [values for values, _, _ in scaled]
    ranges = _finite_ranges(arrays)
    for (_, _, unscaled_offset), path, raster, span in zip(scaled, names, per_date, ranges, strict=True):
        if unscaled_offset is not None and span is not None:
            # float values taken as reflectance (no scale anywhere): the file's own values must be reflectance
            low, high = span[0] - unscaled_offset, span[1] - unscaled_offset
            if low < -0.5 or high > 2.0:
                _refuse_unscaled(path, raster.dtype, (low, high))
    spans = [span for span in ranges if span is not None]
    span = (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None
    _check_reflectance(span, names, dtype=_dn_dtype(per_date[0]), formula=scaled[0][1])
    if any(_is_dask(a) for a in arrays):
        import dask.array as da

        return da.stack(arrays)
    return np.stack(arrays)


def _dn_dtype(raster: xr.DataArray) -> np.dtype:
    """Return the type of the files' values (a resampled raster's ``attrs["source_dtype"]``, else its own)."""
    return np.dtype(raster.attrs.get("source_dtype", raster.dtype))


def _is_dask(array: Any) -> bool:
    return type(array).__module__.startswith("dask")


def _finite_ranges(arrays: list[Any]) -> list[tuple[float, float] | None]:
    """Return each array's smallest and largest finite value (None where it has none); one pass for Dask arrays."""
    if not any(_is_dask(a) for a in arrays):
        return [_finite_range(np.asarray(a)) for a in arrays]
    import dask
    import dask.array as da

    bounds = []
    for array in arrays:
        finite = da.where(da.isfinite(array), array, np.nan)
        bounds.append((da.nanmin(finite), da.nanmax(finite)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All-NaN", category=RuntimeWarning)
        computed = dask.compute(*bounds)
    return [None if np.isnan(low) else (float(low), float(high)) for low, high in computed]


def _finite_range(values: np.ndarray) -> tuple[float, float] | None:
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    return (float(finite.min()), float(finite.max())) if finite.size else None


def _refuse_unscaled(path: Path, dtype: np.dtype, span: tuple[float, float] | None) -> None:
    low, high = ("n/a", "n/a") if span is None else (_number(span[0]), _number(span[1]))
    raise CubeValidationError(
        f"{path.name} holds {dtype} values in [{low}, {high}], not reflectance, and declares no scale: give scale= "
        "and offset= (e.g. scale=1e-4 for reflectance x 10^4; scale=2.75e-5, offset=-0.2 for Landsat "
        "Collection 2 surface reflectance; scale=1/255 for 8-bit imagery)"
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _scaled(
    raster: xr.DataArray, path: Path, *, scale: float | None, offset: float | None, nodata: float | None
) -> tuple[Any, str, float | None]:
    """Return reflectance from digital numbers (``DN * scale + offset`` per band, NaN at ``nodata``) and the formula.

    ``nodata`` defaults to the file's; ``scale`` and ``offset`` to the file's own (:func:`_scaling`). The third
    item is the offset of float values taken as reflectance without any scale (to be checked), else None.
    Lazy where ``raster`` is.
    """
    values = raster.data
    xp: Any = np  # numpy, or dask.array for a lazy raster
    if _is_dask(values):
        import dask.array

        xp = dask.array
    else:
        values = np.asarray(values)
    missing = ~xp.isfinite(values) if values.dtype.kind == "f" else xp.zeros(values.shape, dtype=bool)
    nodata = raster.rio.nodata if nodata is None else nodata
    if nodata is not None and np.isfinite(nodata):
        missing = missing | (values == nodata)
    factors = _scaling(raster, path, scale=scale, offset=offset)
    unscaled_offset = None
    if factors is None:
        # only float reflectance needs no scale; integers are scaled digital numbers of some product
        if _dn_dtype(raster).kind != "f":
            kept = xp.where(missing, np.nan, values.astype(np.float64))
            _refuse_unscaled(path, _dn_dtype(raster), _finite_ranges([kept])[0])
        factors = np.ones(raster.sizes["band"]), np.full(raster.sizes["band"], float(offset or 0.0))
        unscaled_offset = float(offset or 0.0)
    scales, offsets = factors
    # float64 for the affine step, then float32: DN x 2.75e-5 - 0.2 exact before the cast
    reflectance = values.astype(np.float64) * scales[:, None, None] + offsets[:, None, None]
    return xp.where(missing, np.nan, reflectance).astype(np.float32), _formula(scales, offsets), unscaled_offset


def _scaling(
    raster: xr.DataArray, path: Path, *, scale: float | None, offset: float | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Return each band's scale and offset: the file's own where it declares them, else the given ones.

    None where the file declares none and no ``scale`` is given. A scale or offset given for a file
    that declares other ones is refused: one of the two is wrong, and which one cannot be told from here.
    """
    declared = raster["declared_scale"].values, raster["declared_offset"].values
    if not ((declared[0] != 1).any() or (declared[1] != 0).any()):
        count = raster.sizes["band"]
        return None if scale is None else (np.full(count, float(scale)), np.full(count, float(offset or 0.0)))
    disagree = (scale is not None and not np.allclose(declared[0], scale, rtol=1e-6, atol=0)) or (
        offset is not None and not np.allclose(declared[1], offset)
    )
    if disagree:
        raise CubeValidationError(
            f"{path.name} declares reflectance = {_formula(*declared)} in its metadata, but scale={scale}, "
            f"offset={offset} were given: leave scale and offset out to use the file's, or remove its own"
        )
    return declared


def _formula(scales: np.ndarray, offsets: np.ndarray) -> str:
    """Write ``DN x scale + offset`` (one value for all bands where they agree).

    Examples
    --------
    >>> import numpy as np
    >>> _formula(np.full(4, 2.75e-5), np.full(4, -0.2)), _formula(np.array([1e-4, 2e-4]), np.zeros(2))
    ('DN x 2.75e-05 - 0.2', 'DN x (0.0001, 0.0002)')
    """

    def written(values: np.ndarray) -> str:
        return f"{abs(values[0]):g}" if (values == values[0]).all() else f"({', '.join(f'{v:g}' for v in values)})"

    if not offsets.any():
        return f"DN x {written(scales)}"
    sign = "-" if (offsets == offsets[0]).all() and offsets[0] < 0 else "+"
    return f"DN x {written(scales)} {sign} {written(offsets)}"


def _check_reflectance(span: tuple[float, float] | None, names: list[Path], *, dtype: np.dtype, formula: str) -> None:
    """Raise a ReflectanceRangeError naming the files when their scaled values cannot be surface reflectance.

    ``span`` is the smallest and largest finite scaled value of the stack (None: all no data). Too bright or too
    negative: beyond :data:`REFLECTANCE_LIMITS`. Too dark: the brightest value of the whole stack below
    :data:`MIN_BRIGHTEST_REFLECTANCE`, which no scene of land, cloud or haze stays under.
    """
    if span is None:
        return  # all no data: the cube's own checks and later stages report an empty cube
    low, high = span
    files = sorted({path.name for path in names})
    where = files[0] if len(files) == 1 else f"{files[0]} and {len(files) - 1} other files"
    values = f"values of {where} ({dtype}) scaled as {formula}"
    products = (
        "reflectance x 10^4 needs scale=1e-4; Landsat Collection 2 surface reflectance scale=2.75e-5, offset=-0.2"
    )
    if low < REFLECTANCE_LIMITS[0] or high > REFLECTANCE_LIMITS[1]:
        raise ReflectanceRangeError(
            f"{values} range {low:.4g} .. {high:.4g}: this is not reflectance (about 0 .. 1.5); {products}"
        )
    if high < MIN_BRIGHTEST_REFLECTANCE:
        if np.dtype(dtype) == np.uint8:
            hint = "uint8 data need scale=1/255 (or their product's own scale)"
        elif np.dtype(dtype).kind == "f":
            hint = f"float files that already hold reflectance need no scale: leave scale out (else {products})"
        else:
            hint = products
        raise ReflectanceRangeError(
            f"{values} reach at most {high:.4g}: this is not surface reflectance (land, cloud and haze reach "
            f"{MIN_BRIGHTEST_REFLECTANCE:g}); {hint}"
        )


def _cloud_mask(per_date: list[xr.DataArray], mask_band: int | None, cloud_values: Sequence[int]) -> tuple[None, Any]:
    """Return no QA and the ``(time, y, x)`` cloud mask: ``mask_band`` in ``cloud_values``, all clear without one."""
    if mask_band is None:
        return None, np.zeros((len(per_date), *per_date[0].shape[1:]), dtype=bool)
    masks = [r.isel(band=mask_band - 1).isin(list(cloud_values)).data for r in per_date]
    return None, _stacked(masks)


#: What each ``qa`` kind of :func:`open_stack` reads from its band.
QA_KINDS = {
    "landsat-c2": "Landsat Collection 2 QA_PIXEL bits (cloud, shadow, cirrus, dilated cloud)",
    "landsat-c1": "Landsat Collection 1 BQA (cloud bit 4; high-confidence cloud shadow or cirrus)",
    "scl": "Sentinel-2 scene classes (3 cloud shadow, 8 and 9 cloud, 10 cirrus)",
}


def _decoded_qa(per_date: list[xr.DataArray], qa_band: int, kind: str) -> tuple[Any, Any]:
    """Return the ``(time, y, x)`` ``qa_pixel`` (Collection 2 only, else None) and cloud mask decoded from ``qa_band``."""
    from cmsn_cube.qa import cloud_mask_from_bqa_collection1, cloud_mask_from_qa, cloud_mask_from_scl

    words = [
        r.isel(band=qa_band - 1).drop_vars(["declared_scale", "declared_offset"], errors="ignore") for r in per_date
    ]
    if any(_dn_dtype(w).kind not in "iu" for w in words):
        raise BandMismatchError(f"band {qa_band} holds {words[0].dtype} values, not {kind} quality codes")
    # resampled (align="first") codes are float64 holding the file's integers, NaN outside: back to integers
    words = [w if w.dtype.kind in "iu" else w.fillna(0).astype(_dn_dtype(w)) for w in words]
    if kind == "landsat-c2":
        qa_pixel = [w.astype("uint16") for w in words]
        return _stacked([w.data for w in qa_pixel]), _stacked([cloud_mask_from_qa(w).data for w in qa_pixel])
    if kind == "landsat-c1":
        return None, _stacked([cloud_mask_from_bqa_collection1(w).data for w in words])
    return None, _stacked([cloud_mask_from_scl(w).data for w in words])


def _stacked(arrays: list[Any]) -> Any:
    """Stack ``(y, x)`` arrays along a new first axis, lazily where any is a Dask array."""
    if any(_is_dask(a) for a in arrays):
        import dask.array as da

        return da.stack(arrays)
    return np.stack([np.asarray(a) for a in arrays])
