"""GeoTIFF/COG export of a reconstruction: what users hand on to QGIS, GDAL and colleagues.

One cloud-optimised GeoTIFF per date and layer: ``<date>_reflectance.tif`` (the four reconstructed bands, named
``blue, green, red, nir``, NaN = no data), ``<date>_ndvi.tif``, ``<date>_filled.tif`` (the ``filled`` flags,
their meanings in the file's tags, with the input store's name, never its path) and ``<date>_uncertainty.tif``
(the predicted standard deviation of each filled pixel's error per band, NaN where observed; reconstructions
written before it have none). Each has the reconstruction's
CRS and grid, internal overviews and DEFLATE compression. Dates are computed and written one at a time (a full
scene's date at a time in memory), each file to a temporary name first and moved in, so an interrupted export
leaves no half-written file under a final name.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS, crs_of
from cmsn_cube.exceptions import CubeValidationError, MissingCRSError
from cmsn_cube.outputs import claim_folder, claimed_output

#: The layers written per date: variable, band descriptions, nodata.
LAYERS: dict[str, tuple[str, tuple[str, ...], float | None]] = {
    "reflectance": ("reconstructed", BANDS, float("nan")),
    "ndvi": ("ndvi", ("ndvi",), float("nan")),
    "filled": ("filled", ("filled",), None),
    "uncertainty": ("uncertainty", BANDS, float("nan")),
}
#: Layers a reconstruction written by an earlier release may lack: skipped, not refused.
OPTIONAL_LAYERS = ("uncertainty",)


def to_cogs(
    result: xr.Dataset, folder: str | os.PathLike[str], *, overwrite: bool = False, progress: bool = True
) -> list[str]:
    """Write every date of a reconstruction as COGs into ``folder``; returns the paths written.

    Parameters
    ----------
    result : xarray.Dataset
        A reconstruction (:func:`cmsn_cube.inference.reconstruct`, or :func:`cmsn_cube.open_reconstruction`).
    folder : path
        Local folder (created if missing).
    overwrite : bool
        Replace files of the same names; without it an existing file is an error and nothing is written.
    progress : bool
        A progress bar over dates.

    Raises
    ------
    CubeValidationError, MissingCRSError
        ``result`` is not a reconstruction, or has no CRS.
    OutputExistsError
        A file to write exists and ``overwrite`` is not set.
    StoreError
        ``folder`` is, or lies inside, a Zarr store.
    OutputLockedError
        Another export into ``folder`` is running.
    """
    missing = [variable for layer, (variable, _, _) in LAYERS.items() if variable not in result]
    if set(missing) - set(OPTIONAL_LAYERS):
        raise CubeValidationError(f"not a reconstruction: no {missing}; export the output of reconstruct()")
    layers = [layer for layer, (variable, _, _) in LAYERS.items() if variable in result]
    crs = crs_of(result)
    if crs is None:
        raise MissingCRSError("the reconstruction has no CRS; GeoTIFFs need one (cmsn_cube.cube.set_crs)")
    days = [str(np.datetime_as_string(t, unit="D")) for t in result["time"].values]
    names = {(day, layer): f"{day}_{layer}.tif" for day in days for layer in layers}
    folder = Path(os.path.expanduser(os.fspath(folder)))
    with claimed_output(
        folder, lambda: claim_folder(folder, names.values(), overwrite=overwrite, what="export folder")
    ):
        folder.mkdir(parents=True, exist_ok=True)
        paths = {key: folder / name for key, name in names.items()}
        return _write_dates(result, days, paths, crs=crs, progress=progress)


def _write_dates(
    result: xr.Dataset, days: list[str], paths: dict[tuple[str, str], Path], *, crs: Any, progress: bool
) -> list[str]:
    from tqdm import tqdm

    profile = _profile(result, crs)
    tags = {key: str(result.attrs[key]) for key in ("model", "model_sha256") if key in result.attrs}
    if "input_store" in result.attrs:  # the store's name only: files handed on must not carry the user's paths
        tags["input_store"] = _store_name(str(result.attrs["input_store"]))
    written = []
    for index, day in enumerate(tqdm(days, desc="exporting", unit="date", disable=not progress)):
        for layer, (variable, names, nodata) in LAYERS.items():
            if (day, layer) not in paths:
                continue
            data = result[variable].isel(time=index)
            values = np.asarray(data.transpose(..., "y", "x").values)
            values = values[None] if values.ndim == 2 else values
            layer_tags = {**tags, "date": day, **_flag_tags(result[variable])}
            written.append(_write_cog(values, paths[day, layer], profile, names, nodata, layer_tags))
    return written


def _profile(result: xr.Dataset, crs: Any) -> dict[str, Any]:
    from rasterio.transform import from_origin

    x, y = result["x"].values, result["y"].values
    dx = float(x[1] - x[0]) if x.size > 1 else float(result.attrs.get("scale_m", 30.0))
    dy = float(y[0] - y[1]) if y.size > 1 else dx
    if dy <= 0:
        raise CubeValidationError("y must decrease (north up) for a GeoTIFF; use result.sortby('y', ascending=False)")
    return {
        "driver": "COG",
        "width": x.size,
        "height": y.size,
        "crs": crs,
        "transform": from_origin(float(x[0]) - dx / 2, float(y[0]) + dy / 2, dx, dy),
        "compress": "deflate",
        "blocksize": 256,
        "overview_resampling": "average",
    }


def _store_name(path: str) -> str:
    """Return the last part of a store's path or URL (``/data/scene.zarr/``, ``s3://b/scene.zarr``: ``scene.zarr``)."""
    return path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]


def _flag_tags(variable: xr.DataArray) -> dict[str, str]:
    """Return the layer's description and, for ``filled``, its CF flags."""
    keys = ("long_name", "flag_values", "flag_meanings")
    return {key: str(variable.attrs[key]) for key in keys if key in variable.attrs}


def _write_cog(
    values: np.ndarray,
    path: Path,
    profile: dict[str, Any],
    names: tuple[str, ...],
    nodata: float | None,
    tags: dict[str, str],
) -> str:
    import rasterio

    staging = path.with_name(f".{path.name}.writing-{uuid.uuid4().hex[:8]}")
    try:
        options = {**profile, "count": values.shape[0], "dtype": values.dtype.name, "nodata": nodata}
        with rasterio.open(staging, "w", **options) as dataset:
            dataset.write(values)
            for band, name in enumerate(names, start=1):
                dataset.set_band_description(band, name)
            dataset.update_tags(**tags)
        os.replace(staging, path)
    finally:
        if staging.exists():
            staging.unlink()
    return str(path)
