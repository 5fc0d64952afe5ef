"""What a reconstruction reads: its options and input checked, the network's input, the input's fingerprint."""

from __future__ import annotations

import hashlib
import warnings

import dask
import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS
from cmsn_cube.exceptions import ArgumentError, CMSNCubeWarning, NoDataError, check_non_negative, check_positive
from cmsn_cube.inference.tiling import model_channels


def check_tiling(*, tile: int, overlap: int, batch_size: int, chunk: int, method: str) -> None:
    """Refuse a tiling, batch size or method that :func:`cmsn_cube.inference.reconstruct` cannot run.

    Raises
    ------
    ArgumentError
        A size or count out of range (``overlap`` at least half a tile, ``chunk`` less than a tile), or an
        unknown ``method``.
    """
    from cmsn_cube.selfcheck import METHODS

    check_positive(tile=tile, batch_size=batch_size, chunk=chunk)
    if method not in ("auto", *METHODS):
        raise ArgumentError(f"method must be 'auto' or one of {list(METHODS)}, got {method!r}")
    check_non_negative(overlap=overlap)
    if not 2 * overlap < tile:
        raise ArgumentError(f"overlap must be less than half a tile, got overlap={overlap}, tile={tile}")
    if chunk < tile:
        raise ArgumentError(f"chunk ({chunk} px) must be at least one tile ({tile} px)")


def model_inputs(cube: xr.Dataset) -> tuple[xr.DataArray, xr.DataArray]:
    """Return :func:`model_channels` of a cube (computes): ``(time, band, y, x)`` with band ``mask`` last, and ``filled``."""
    reflectance = cube["reflectance"].transpose("time", "band", "y", "x")
    channels, to_fill = model_channels(
        np.asarray(reflectance.values), np.asarray(cube["cloud_mask"].transpose("time", "y", "x").values)
    )
    coords = {name: coord for name, coord in reflectance.coords.items() if "band" not in coord.dims}
    return (
        xr.DataArray(channels, dims=reflectance.dims, coords={**coords, "band": [*BANDS, "mask"]}),
        xr.DataArray(to_fill, dims=("time", "y", "x"), coords=coords, name="filled"),
    )


def _clear(cube: xr.Dataset) -> xr.DataArray:
    """Clear observations ``(time, y, x)``: not cloud, no band NaN (lazy; the same graph keys at each call)."""
    return ~cube["cloud_mask"] & cube["reflectance"].notnull().all("band")


def count_observed_dates(cube: xr.Dataset) -> xr.DataArray:
    """Count, per pixel, the dates with a clear observation (not cloud, no band NaN): ``(y, x)`` uint16, lazy."""
    return _clear(cube).sum("time").astype(np.uint16).rename("observed_dates")


def count_gap_pixels(cube: xr.Dataset) -> xr.DataArray:
    """Count, per date, the pixels to fill (cloud or no data): ``(time,)`` int64, lazy.

    Built on the same reads as :func:`count_observed_dates`: computed together, the input is read once.
    """
    return (~_clear(cube)).sum(("y", "x")).astype(np.int64).rename("gap_pixels")


def check_gaps(gap_pixels: np.ndarray, *, what: str, stacklevel: int = 3) -> None:
    """Warn at once when no date of ``what`` has a pixel to fill: the reconstruction is the input, no model runs."""
    if np.asarray(gap_pixels).size and not np.asarray(gap_pixels).any():
        warnings.warn(
            f"nothing to fill in {what}: no date has a cloud or a no-data pixel; the reconstruction is the input "
            "(no model runs). Is the cloud mask right (qa_pixel decoded, or a mask band given)?",
            CMSNCubeWarning,
            stacklevel=stacklevel,
        )


def check_observed(observed_dates: np.ndarray, *, what: str, stacklevel: int = 3) -> None:
    """Raise :class:`NoDataError` when no pixel was ever observed clear; warn with the share never observed.

    ``stacklevel``: of the warning, counted from this function (3: the caller of its caller).

    Raises
    ------
    NoDataError
        ``observed_dates`` (see :func:`count_observed_dates`) is empty or zero everywhere; ``what`` names the input.
    """
    if observed_dates.size == 0 or not observed_dates.any():
        raise NoDataError(f"{what} has no clear pixel on any date (all cloud or no data): nothing to reconstruct from")
    never = int((observed_dates == 0).sum())
    if never > 0:
        warnings.warn(
            f"{never} pixels ({100 * never / observed_dates.size:.2f} %) of {what} are observed on no date: they stay NaN "
            "(flagged 2 in 'filled'), or are the network's guess with fill_unobserved=True (flagged 3)",
            CMSNCubeWarning,
            stacklevel=stacklevel,
        )


def input_fingerprint(cube: xr.Dataset) -> str:
    """Digest what a reconstruction reads, so that a resumed write never mixes inputs.

    The digest covers the data (their content when in memory; for lazy data their graph, which names the
    store and every operation), the store's write id and the state of every file in it (sizes and times: an
    edit in place with zarr or ``to_zarr(region=...)`` changes it, see :func:`cmsn_cube.store.store_state_digest`),
    the times, the grid and the CRS. Any change gives another digest.
    """
    from cmsn_cube.cube import crs_of
    from cmsn_cube.store import WRITE_ID_ATTR, store_state_digest

    source = cube.encoding.get("source")
    parts = (
        dask.base.tokenize(cube["reflectance"].data, cube["cloud_mask"].data),
        cube.attrs.get(WRITE_ID_ATTR),
        store_state_digest(source) if source else None,
        cube["time"].values.astype("datetime64[ns]").astype("int64").tolist(),
        [float(v) for v in (cube.y[0], cube.y[-1], cube.x[0], cube.x[-1])],
        cube.sizes["y"],
        cube.sizes["x"],
        str(crs_of(cube)),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]
