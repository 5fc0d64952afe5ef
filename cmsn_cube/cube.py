"""The cube: one xarray schema for every stage and its validation (Zarr stores: :mod:`cmsn_cube.store`).

A cube is an :class:`xarray.Dataset` with

- ``reflectance(time, band, y, x)`` float32 TOA reflectance in [0, 1], NaN = no data;
- ``qa_pixel(time, y, x)`` uint16 Landsat Collection 2 QA bits (optional);
- ``cloud_mask(time, y, x)`` bool, True = cloud, shadow, cirrus or dilated cloud (optional until decoded);
- coordinates ``time`` (datetime64, strictly increasing), ``band`` = ``blue, green, red, nir``, ``y``/``x`` pixel
  centres on a regular grid in the CRS's units, ``sensor(time)`` (``LANDSAT_5``/``LANDSAT_8``/...), and the
  rioxarray ``spatial_ref`` that carries the CRS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from cmsn_cube.exceptions import (
    BandMismatchError,
    CubeValidationError,
    DimensionError,
    DTypeError,
    GridError,
    MissingCRSError,
    ReflectanceRangeError,
    TimeAxisError,
)

#: Common band names, in the order every array in this package uses.
BANDS: tuple[str, ...] = ("blue", "green", "red", "nir")

Sensor = Literal["LANDSAT_5", "LANDSAT_7", "LANDSAT_8", "LANDSAT_9"]

#: Sensor band designations for the common names. Source: USGS Landsat Collection 2 band designations
#: (Landsat 4-5 TM and Landsat 7 ETM+: B1 blue, B2 green, B3 red, B4 NIR; Landsat 8-9 OLI: B2 blue, B3 green,
#: B4 red, B5 NIR).
SENSOR_BANDS: dict[str, dict[str, str]] = {
    "LANDSAT_5": {"blue": "B1", "green": "B2", "red": "B3", "nir": "B4"},
    "LANDSAT_7": {"blue": "B1", "green": "B2", "red": "B3", "nir": "B4"},
    "LANDSAT_8": {"blue": "B2", "green": "B3", "red": "B4", "nir": "B5"},
    "LANDSAT_9": {"blue": "B2", "green": "B3", "red": "B4", "nir": "B5"},
}

#: Landsat's nominal pixel size for the reflective bands, in metres.
LANDSAT_SCALE_M = 30.0

#: Reflectance beyond these bounds is not TOA reflectance (bright cloud tops reach ~1.5; DN reach 65535).
_REFLECTANCE_BOUNDS = (-0.5, 2.0)

_DIMS = {
    "reflectance": ("time", "band", "y", "x"),
    "qa_pixel": ("time", "y", "x"),
    "cloud_mask": ("time", "y", "x"),
}


def make_cube(
    reflectance: Any,
    *,
    time: Sequence[Any] | np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    crs: Any,
    sensor: str | Sequence[str],
    qa_pixel: Any | None = None,
    cloud_mask: Any | None = None,
    source: str = "",
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Assemble a cube from arrays laid out ``(time, band, y, x)`` and validate it.

    Parameters
    ----------
    reflectance : array-like
        ``(time, 4, y, x)`` reflectance in [0, 1], bands in :data:`BANDS` order; cast to float32.
    time : sequence of datetime-like
        Acquisition times in UTC. Time-zone-aware times (a tz-aware ``pandas.DatetimeIndex``, say) are converted
        to UTC and stored naive, as every cube's times are.
    y, x : numpy.ndarray
        Pixel-centre coordinates in the CRS's units.
    crs : Any
        Anything rioxarray accepts (``"EPSG:32650"``, a WKT string, a ``pyproj.CRS``).
    sensor : str or sequence of str
        One sensor name for all dates or one per date (``LANDSAT_5``, ``LANDSAT_8``, ...).
    qa_pixel, cloud_mask : array-like, optional
        ``(time, y, x)`` Collection 2 QA bits (uint16) and a boolean cloud mask.
    source : str
        Where the data came from (recorded in ``attrs["source"]``).
    attrs : mapping, optional
        Extra dataset attributes.

    Returns
    -------
    xarray.Dataset
        A valid cube.
    """
    times = _naive_utc(time)
    _check_shape("reflectance", reflectance, (len(times), len(BANDS), len(y), len(x)))
    for name, array in (("qa_pixel", qa_pixel), ("cloud_mask", cloud_mask)):
        if array is not None:
            _check_shape(name, array, (len(times), len(y), len(x)))
    sensors = [sensor] * len(times) if isinstance(sensor, str) else list(sensor)
    if len(sensors) != len(times):
        raise CubeValidationError(
            f"sensor has {len(sensors)} entries but there are {len(times)} dates: give one per date or a single name"
        )
    coords = {
        "time": times,
        "band": np.array(BANDS, dtype=object),
        "y": np.asarray(y, dtype="float64"),
        "x": np.asarray(x, dtype="float64"),
        "sensor": ("time", np.array(sensors, dtype=object)),
    }
    data_vars: dict[str, Any] = {"reflectance": (_DIMS["reflectance"], _as_float32(reflectance))}
    if qa_pixel is not None:
        data_vars["qa_pixel"] = (_DIMS["qa_pixel"], qa_pixel)
    if cloud_mask is not None:
        data_vars["cloud_mask"] = (_DIMS["cloud_mask"], cloud_mask)
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update({"source": source, "scale_m": LANDSAT_SCALE_M, **(attrs or {})})
    ds["reflectance"].attrs.update({"long_name": "TOA reflectance", "units": "1"})
    ds = set_crs(ds, crs)
    return validate_cube(ds)


def _naive_utc(time: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Return ``time`` as naive UTC ``datetime64[ns]``: time-zone-aware times are converted to UTC first."""
    if isinstance(time, pd.DatetimeIndex | pd.Series) or (
        not isinstance(time, np.ndarray) and any(getattr(t, "tzinfo", None) is not None for t in time)
    ):
        try:
            index = pd.DatetimeIndex(time)
        except (TypeError, ValueError) as error:
            raise TimeAxisError(f"times cannot be read as datetimes: {error}") from None
        if index.tz is not None:
            index = index.tz_convert("UTC").tz_localize(None)
        return index.to_numpy(dtype="datetime64[ns]")
    return np.asarray(time, dtype="datetime64[ns]")


def _check_shape(name: str, array: Any, expected: tuple[int, ...]) -> None:
    """Raise an error naming ``name``'s shape and the one the dims, bands and coordinates ask for."""
    shape = tuple(int(n) for n in np.shape(array))
    if shape == expected:
        return
    dims = _DIMS[name]
    wanted = ", ".join(f"{dim}={n}" for n, dim in zip(expected, dims, strict=True))
    if name == "reflectance" and len(shape) == 4 and shape[1] != len(BANDS):
        raise BandMismatchError(
            f"reflectance has {shape[1]} bands (shape {shape}), expected {len(BANDS)}: {', '.join(BANDS)} in that "
            f"order; select them (with cmsn_cube.cube.SENSOR_BANDS) before make_cube"
        )
    raise DimensionError(f"{name} has shape {shape}, expected ({wanted}) from the times, bands, y and x given")


def _as_float32(array: Any) -> Any:
    return array.astype("float32") if getattr(array, "dtype", None) != np.float32 else array


def set_crs(ds: xr.Dataset, crs: Any) -> xr.Dataset:
    """Attach ``crs`` to every variable of ``ds`` the way rioxarray does (``spatial_ref`` + ``grid_mapping``)."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    ds = ds.rio.write_crs(crs)
    for name in ds.data_vars:
        ds[name].attrs.pop("grid_mapping", None)
        ds[name].encoding["grid_mapping"] = "spatial_ref"
    return ds


def crs_of(ds: xr.Dataset | xr.DataArray) -> Any:
    """Return the cube's CRS as a ``rasterio.crs.CRS``, or None."""
    import rioxarray  # noqa: F401

    return ds.rio.crs


def validate_cube(
    ds: xr.Dataset,
    *,
    require: Sequence[str] = ("reflectance",),
    min_dates: int = 1,
    check_values: bool | None = None,
) -> xr.Dataset:
    """Check that ``ds`` follows the cube schema; raise an error naming the problem and the fix.

    Parameters
    ----------
    ds : xarray.Dataset
        The cube.
    require : sequence of str
        Variables that must be present (``reflectance``, ``qa_pixel``, ``cloud_mask``).
    min_dates : int
        Fewest dates the caller can work with.
    check_values : bool, optional
        Look at the reflectance values (range). None: only when the data are already in memory, so a lazy
        (Dask) cube is never computed by validation.

    Returns
    -------
    xarray.Dataset
        ``ds`` itself, so calls can be chained.

    Raises
    ------
    DimensionError, BandMismatchError, DTypeError, ReflectanceRangeError, MissingCRSError, TimeAxisError, GridError
        Each names what is wrong.
    """
    if not isinstance(ds, xr.Dataset):
        raise CubeValidationError(
            f"expected an xarray.Dataset cube, got {type(ds).__name__}; "
            "build one with cmsn_cube.make_cube(...) or open one with cmsn_cube.open_cube(path)"
        )
    for name in require:
        if name not in ds.data_vars:
            hint = (
                " (decode it from qa_pixel with cmsn_cube.qa.add_cloud_mask(ds), or, for a cube without QA bands, "
                "add your own boolean cloud_mask(time, y, x): True = cloud)"
                if name == "cloud_mask"
                else ""
            )
            raise CubeValidationError(
                f"cube has no variable {name!r}{hint}; it has {sorted(str(v) for v in ds.data_vars)}"
            )
    for name, dims in _DIMS.items():
        if name in ds.data_vars and ds[name].dims != dims:
            found = ds[name].dims
            if set(found) == set(dims):
                raise DimensionError(f"{name} has dims {found} in the wrong order; use ds[{name!r}].transpose{dims}")
            raise DimensionError(f"{name} must have dims {dims}, found {found}")
    _check_bands(ds)
    _check_dtypes(ds)
    if ds.sizes.get("time", 0) < min_dates:
        raise DimensionError(f"cube has {ds.sizes.get('time', 0)} date(s); at least {min_dates} are needed")
    _check_time(ds)
    _check_grid(ds)
    if crs_of(ds) is None:
        raise MissingCRSError(
            "cube has no CRS; attach one with cmsn_cube.cube.set_crs(ds, 'EPSG:326NN') "
            "or open stores with cmsn_cube.open_cube (xr.open_zarr drops it unless decode_coords='all')"
        )
    in_memory = not _is_lazy(ds["reflectance"]) if "reflectance" in ds else False
    if check_values or (check_values is None and in_memory):
        _check_reflectance_range(ds["reflectance"])
    return ds


def _is_lazy(da: xr.DataArray) -> bool:
    return da.chunks is not None


def _check_bands(ds: xr.Dataset) -> None:
    if "band" not in ds.coords:
        if "reflectance" in ds:
            raise BandMismatchError(f"reflectance has no 'band' coordinate; expected band = {list(BANDS)}")
        return
    bands = [str(b) for b in ds["band"].values]
    if bands != list(BANDS):
        raise BandMismatchError(
            f"band coordinate is {bands}, expected {list(BANDS)}; rename sensor bands with "
            f"cmsn_cube.cube.SENSOR_BANDS and reorder with ds.sel(band={list(BANDS)})"
        )


def _check_dtypes(ds: xr.Dataset) -> None:
    if "reflectance" in ds and ds["reflectance"].dtype != np.float32:
        kind = ds["reflectance"].dtype
        fix = "scale digital numbers to reflectance first, then " if np.issubdtype(kind, np.integer) else ""
        raise DTypeError(f"reflectance must be float32, got {kind}; {fix}use .astype('float32')")
    if "qa_pixel" in ds and ds["qa_pixel"].dtype != np.uint16:
        raise DTypeError(f"qa_pixel must be uint16 Collection 2 QA bits, got {ds['qa_pixel'].dtype}")
    if "cloud_mask" in ds and ds["cloud_mask"].dtype != bool:
        raise DTypeError(f"cloud_mask must be bool, got {ds['cloud_mask'].dtype}")


def _check_time(ds: xr.Dataset) -> None:
    if "time" not in ds.coords:
        raise DimensionError("cube has no 'time' coordinate")
    zone = getattr(ds.indexes.get("time"), "tz", None)
    if zone is not None:
        raise TimeAxisError(
            f"times must be naive UTC; got tz-aware times ({zone}): convert them with "
            "ds.assign_coords(time=ds.indexes['time'].tz_convert('UTC').tz_localize(None)) "
            "(cmsn_cube.make_cube does this itself)"
        )
    times = ds["time"].values
    if not np.issubdtype(times.dtype, np.datetime64):
        raise TimeAxisError(f"time must be datetime64, got {times.dtype}")
    steps = np.diff(times.astype("datetime64[ns]").astype("int64"))
    if np.any(steps == 0):
        raise TimeAxisError(f"duplicate times {sorted(set(times[1:][steps == 0].astype(str)))}; drop or mosaic them")
    if np.any(steps < 0):
        raise TimeAxisError("times are not increasing; sort them with ds.sortby('time')")


def _check_grid(ds: xr.Dataset) -> None:
    for axis in ("y", "x"):
        if axis not in ds.coords:
            raise DimensionError(f"cube has no {axis!r} coordinate (pixel centres in the CRS's units)")
        values = np.asarray(ds[axis].values, dtype="float64")
        if values.size < 2:
            continue
        steps = np.diff(values)
        if steps[0] == 0 or not np.allclose(steps, steps[0], rtol=1e-6, atol=1e-6 * abs(steps[0])):
            raise GridError(
                f"{axis} is not a regular grid (spacing ranges from {steps.min():g} to {steps.max():g}); "
                "reproject or resample onto a regular grid first (e.g. ds.rio.reproject)"
            )


def _check_reflectance_range(reflectance: xr.DataArray) -> None:
    check_reflectance_values(np.asarray(reflectance.values), where="reflectance")


def check_reflectance_values(values: np.ndarray, *, where: str) -> None:
    """Raise :class:`ReflectanceRangeError` if ``values`` hold ±inf or lie far outside [0, 1] (digital numbers).

    ``where`` names the variable and part of the scene in the message (``"reflectance"``, or a chunk's
    dates and pixel rows/columns when lazy blocks are checked as they are read). NaN is no data and allowed.
    """
    infinite = np.isinf(values)
    if infinite.any():
        raise ReflectanceRangeError(
            f"{where} holds {int(infinite.sum())} infinite value(s); mark no data as NaN, not ±inf"
        )
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return  # all NaN: an empty cube is reported by the stage that needs data
    low, high = float(finite.min()), float(finite.max())
    if low < _REFLECTANCE_BOUNDS[0] or high > _REFLECTANCE_BOUNDS[1]:
        raise ReflectanceRangeError(
            f"{where} ranges {low:g}..{high:g}, far outside [0, 1]: these look like unscaled digital numbers; "
            "apply the product's scale and offset (Collection 2 L2: DN * 2.75e-5 - 0.2; TOA is already scaled)"
        )


def grid_of(ds: xr.Dataset) -> dict[str, Any]:
    """Return the spatial grid of a cube: CRS, shape and the first and step of ``y``/``x`` (for mismatch checks)."""
    y, x = ds["y"].values, ds["x"].values
    return {
        "crs": crs_of(ds),
        "shape": (y.size, x.size),
        "y0": float(y[0]),
        "x0": float(x[0]),
        "dy": float(y[1] - y[0]) if y.size > 1 else None,
        "dx": float(x[1] - x[0]) if x.size > 1 else None,
    }


def check_same_grid(a: xr.Dataset, b: xr.Dataset, *, what: str = "the two cubes") -> None:
    """Raise :class:`GridError` unless ``a`` and ``b`` share CRS and pixel grid."""
    grid_a, grid_b = grid_of(a), grid_of(b)
    if grid_a != grid_b:
        diff = {k: (grid_a[k], grid_b[k]) for k in grid_a if grid_a[k] != grid_b[k]}
        raise GridError(f"{what} are on different grids: {diff}")


def date_triplets(times: xr.Dataset | xr.DataArray | Sequence[Any] | np.ndarray) -> list[tuple[int, int, int]]:
    """Pair every date with its two nearest dates in time: one triplet of positions per date, sorted in time.

    Parameters
    ----------
    times : cube, DataArray or sequence of datetime-like
        A cube (its ``time``) or the times themselves, increasing.

    Returns
    -------
    list of tuple of int
        Entry ``i`` is the triplet used to reconstruct date ``i``; ``i`` is one of its three positions.
        Ties in distance go to the earlier date.

    Raises
    ------
    DimensionError
        Fewer than three dates.

    Examples
    --------
    >>> import numpy as np
    >>> date_triplets(np.array(["2020-01-01", "2020-01-17", "2020-02-02", "2020-04-01"], dtype="datetime64[D]"))
    [(0, 1, 2), (0, 1, 2), (0, 1, 2), (1, 2, 3)]
    """
    if isinstance(times, xr.Dataset | xr.DataArray):
        times = times["time"].values
    stamps = np.asarray(times, dtype="datetime64[ns]").astype("int64")
    if stamps.size < 3:
        raise DimensionError(f"three dates are needed to form a triplet; the cube has {stamps.size}")
    triplets = []
    for i, stamp in enumerate(stamps):
        others = sorted((abs(int(s) - int(stamp)), j) for j, s in enumerate(stamps) if j != i)
        triplets.append(tuple(sorted((i, others[0][1], others[1][1]))))
    return triplets  # type: ignore[return-value]
