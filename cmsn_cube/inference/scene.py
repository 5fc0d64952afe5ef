"""The public entry points: :func:`reconstruct` a whole scene lazily, :func:`predict_window` on one window."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from cmsn_cube.device import default_device
from cmsn_cube.exceptions import CubeValidationError
from cmsn_cube.inference.graph import block_graph, output_arrays, self_check
from cmsn_cube.inference.inputs import (
    check_gaps,
    check_observed,
    check_tiling,
    count_gap_pixels,
    count_observed_dates,
    input_fingerprint,
    model_inputs,
)
from cmsn_cube.inference.models import ModelLike, ModelSpec, model_on_worker, model_spec
from cmsn_cube.inference.tiling import FILLED_FLAGS, plan_scene
from cmsn_cube.qa import ensure_cloud_mask

#: The variables of a reconstruction: dims, dtype and attrs.
OUTPUT_VARIABLES: dict[str, tuple[tuple[str, ...], np.dtype, dict[str, Any]]] = {
    "reconstructed": (
        ("time", "band", "y", "x"),
        np.dtype(np.float32),
        {"long_name": "reconstructed TOA reflectance", "units": "1"},
    ),
    "filled": (
        ("time", "y", "x"),
        np.dtype(np.uint8),
        {
            "long_name": "origin of each pixel (0 observed, 1 filled from other dates (the network and the weighted regression: "
            "the date's triplet; the regression: the nearby dates of the series that fit best), "
            "2 observed on no date of the series: NaN, 3 the same, filled by the network, 4 no data (NaN in the "
            "input, not a cloud) filled from other dates, 5 observed on no date of its triplet, "
            "filled by the classical regression from the nearest date of the series that observed it)",
            **FILLED_FLAGS,
        },
    ),
    "ndvi": (("time", "y", "x"), np.dtype(np.float32), {"long_name": "NDVI of the reconstruction", "units": "1"}),
    "uncertainty": (
        ("time", "band", "y", "x"),
        np.dtype(np.float32),
        {
            "long_name": "predicted standard deviation of the error of each filled pixel (NaN where observed or "
            "left unfilled): the filler's raw spread calibrated on the scene's self-check",
            "units": "1",
        },
    ),
    "ndvi_observed": (
        ("time", "y", "x"),
        np.dtype(np.float32),
        {"long_name": "NDVI of the observation (NaN under clouds)", "units": "1"},
    ),
}


def reconstruct(
    cube: xr.Dataset,
    *,
    model: ModelLike = None,
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 4,
    device: str | None = None,
    chunk: int = 1024,
    fill_unobserved: bool = False,
    method: str = "auto",
    check_seed: int = 0,
    adapt: bool = False,
    fit_options: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Reconstruct every cloudy pixel of every date, lazily (nothing runs until you compute or write).

    Parameters
    ----------
    cube : xarray.Dataset
        A cube with ``reflectance`` and ``cloud_mask`` (or ``qa_pixel`` to decode it), at least 3 dates.
    model : None, str, path or CMSN
        ``None`` = the packaged checkpoint :data:`DEFAULT_MODEL`; a packaged name; a checkpoint path; or a model.
    tile, overlap, batch_size : int
        Window size in pixels fed to the network; pixels shared by neighbouring windows, blended with a cosine
        ramp (less than half a tile); windows per forward pass.
    device : str, optional
        ``"cpu"``, ``"cuda"``…; default CUDA when present.
    chunk : int
        Width of the output's Dask chunks along x, at least ``tile``, rounded down to whole strides ``tile -
        overlap`` (1024 -> 896 with the defaults); along y a chunk is one stride, one row of tiles (224 px).
    fill_unobserved : bool
        Also fill the gaps that no date of their triplet observed (the network's guess, flagged 3 in ``filled``);
        by default they stay NaN (flagged 2).
    method : {"auto", "cmsn", "regression", "weighted-regression", "blend"}
        Who fills the gaps: per date, the filler that scored best in the scene self-check (``"auto"``, see
        :mod:`cmsn_cube.selfcheck`; ties go to the classical ones), or one filler forced (see :func:`run_filler`).
    check_seed : int
        Seed of the shapes the self-check pastes.
    adapt : bool
        First fine-tune ``model`` on this cube (:func:`cmsn_cube.adapt.fit` with ``fit_options``, which default
        to this ``model`` and ``device``; that part computes), then reconstruct with the adapted model.
    fit_options : dict, optional
        Keywords of :func:`cmsn_cube.adapt.fit`, with ``adapt``.

    Returns
    -------
    xarray.Dataset
        The :data:`OUTPUT_VARIABLES` (``reconstructed`` with clear pixels bit-identical to the input, ``filled``
        flags, ``ndvi``, ``ndvi_observed``), ``observed_dates(y, x)``, ``method_used(time)`` and, with
        ``method="auto"``, the self-check's ``quality(time, method, metric)`` (see ``ds.cmsn.quality()``); the
        input's coordinates and CRS; attrs naming the checkpoint, its sha256 and the input. Each tile runs once,
        tiles with no pixel to fill not at all; reflectance is checked as it is read (±inf, digital numbers).

    Raises
    ------
    DimensionError
        Fewer than 3 dates.
    BandMismatchError, CubeValidationError
        The cube does not follow the schema.
    ArgumentError
        A size or count out of range.
    NoDataError
        An in-memory cube with no clear pixel on any date (lazy cubes: when written).
    """
    check_tiling(tile=tile, overlap=overlap, batch_size=batch_size, chunk=chunk, method=method)
    checked = ensure_cloud_mask(cube, min_dates=3)
    observed_dates = count_observed_dates(checked)
    gap_pixels = count_gap_pixels(checked)
    if observed_dates.chunks is None:  # in memory: say so now (lazy inputs: when written)
        check_observed(observed_dates.values, what="the cube")
        check_gaps(gap_pixels.values, what="the cube")
    if adapt:
        model = _adapted_model(cube, model, device=device, fit_options=fit_options)
    settings = _Settings(tile, overlap, chunk, fill_unobserved, method, check_seed, batch_size, default_device(device))
    result = _lazy_result(checked, model_spec(model), observed_dates, gap_pixels, settings)
    if cube.encoding.get("source"):
        result.attrs["input_store"] = cube.encoding["source"]
    return result


@dataclass(frozen=True)
class _Settings:
    """How :func:`reconstruct` runs; all but ``batch_size`` and ``device`` are recorded in the result."""

    tile: int
    overlap: int
    chunk: int
    fill_unobserved: bool
    method: str
    check_seed: int
    batch_size: int
    device: str

    def recorded(self) -> str:
        """Return the result's ``tiling`` attribute: what a resumed write must find the same."""
        keys = ("tile", "overlap", "chunk", "fill_unobserved", "method", "check_seed")
        return json.dumps({key: getattr(self, key) for key in keys})


def _adapted_model(
    cube: xr.Dataset, model: ModelLike, *, device: str | None, fit_options: dict[str, Any] | None
) -> Any:
    """Fine-tune ``model`` on ``cube`` with :func:`cmsn_cube.adapt.fit` (computes) and return the adapted model."""
    from cmsn_cube.adapt import fit

    return fit(cube, **{"model": model, "device": device, **(fit_options or {})}).model


def _lazy_result(
    cube: xr.Dataset, spec: ModelSpec, observed_dates: xr.DataArray, gap_pixels: xr.DataArray, settings: _Settings
) -> xr.Dataset:
    """Return the graph of the reconstruction of a checked ``cube`` as a dataset (see :func:`reconstruct`)."""
    from cmsn_cube.baselines import days_of
    from cmsn_cube.cube import date_triplets  # each date with its two nearest dates
    from cmsn_cube.selfcheck import METHODS, METRICS

    tilings = plan_scene(
        cube.sizes["y"], cube.sizes["x"], tile=settings.tile, overlap=settings.overlap, chunk=settings.chunk
    )
    triplets = tuple(date_triplets(cube))
    days = tuple(days_of(cube).tolist())  # the regression takes helper dates nearest first
    check = None
    if settings.method == "auto":
        check = self_check(
            cube,
            spec,
            triplets,
            gap_pixels=gap_pixels.data,
            days=days,
            device=settings.device,
            seed=settings.check_seed,
        )
    methods = check.methods if check else np.full(cube.sizes["time"], METHODS.index(settings.method), dtype=np.uint8)
    blocks = block_graph(
        cube,
        spec,
        tilings,
        triplets,
        batch_size=settings.batch_size,
        device=settings.device,
        fill_unobserved=settings.fill_unobserved,
        methods=methods,
        days=days,
        quality=check.scores if check else None,
    )
    variables = {name: (dims, dtype) for name, (dims, dtype, _) in OUTPUT_VARIABLES.items()}
    result = _assemble(cube, output_arrays(blocks, tilings, cube.sizes["time"], variables), spec)
    result["observed_dates"] = observed_dates.chunk(
        {"y": tilings[0].output_chunks, "x": tilings[1].output_chunks}
    ).assign_attrs(long_name="dates with a clear observation of the pixel", units="1")
    result["gap_pixels"] = gap_pixels.assign_attrs(long_name="pixels to fill per date (cloud or no data)", units="1")
    result["method_used"] = xr.DataArray(
        check.method_used if check else methods,
        dims="time",
        attrs={
            "long_name": "filler of each date's gaps",
            "flag_values": list(range(len(METHODS))),
            "flag_meanings": " ".join(METHODS),
        },
    )
    if check:
        result["quality"] = xr.DataArray(
            check.quality,
            dims=("time", "method", "metric"),
            coords={"method": list(METHODS), "metric": list(METRICS)},
            attrs={"long_name": "scene self-check: hidden clear pixels filled by each method, scored"},
        )
    result.attrs.update(input_fingerprint=input_fingerprint(cube), tiling=settings.recorded())
    return result


def _assemble(cube: xr.Dataset, arrays: dict[str, Any], spec: ModelSpec) -> xr.Dataset:
    """Return the output ``arrays`` as a dataset with the cube's coordinates, attrs and CRS, naming the model."""
    from cmsn_cube.cube import crs_of, set_crs

    coords = cube["reflectance"].coords
    out = xr.Dataset(
        {
            name: xr.DataArray(
                data,
                dims=OUTPUT_VARIABLES[name][0],
                coords={k: v for k, v in coords.items() if set(v.dims) <= set(OUTPUT_VARIABLES[name][0])},
                attrs=OUTPUT_VARIABLES[name][2],
            )
            for name, data in arrays.items()
        },
        attrs={**cube.attrs, "model": spec.name, "model_sha256": spec.sha256},
    )
    return set_crs(out, crs_of(cube))


def predict_window(cube: xr.Dataset, *, model: ModelLike = None, device: str | None = None) -> xr.Dataset:
    """Run the network once on a small three-date cube (a window) and keep every stage of its output.

    For figures and inspection: ``coarse``, ``refined`` and ``output`` (time, band, y, x); for whole scenes use
    :func:`reconstruct`. Computes.
    """
    import torch

    cube = ensure_cloud_mask(cube, min_dates=3)
    if cube.sizes["time"] != 3:
        raise CubeValidationError(
            f"predict_window takes exactly 3 dates, got {cube.sizes['time']}; select them with .isel(time=[...])"
        )
    spec = model_spec(model)
    device = default_device(device)
    channels, _ = model_inputs(cube)
    with torch.inference_mode():
        prediction = model_on_worker(spec, device)(torch.from_numpy(np.asarray(channels.values)[None]).to(device))
    coords = cube["reflectance"].coords
    stages = {
        name: xr.DataArray(
            getattr(prediction, name)[0].float().cpu().numpy(), dims=("time", "band", "y", "x"), coords=coords
        )
        for name in ("coarse", "refined", "output")
    }
    return xr.Dataset(stages, attrs={"model": spec.name, "model_sha256": spec.sha256})
