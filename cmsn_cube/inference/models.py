"""Models as they travel to workers, and the fillers that run on tiles there.

A model reaches workers as one graph key holding its weights (a :class:`ModelSpec`, a few MB), and is built
once per worker process and cached there (:func:`model_on_worker`), not once per chunk.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from cmsn_cube.cube import BANDS
from cmsn_cube.exceptions import ModelOutputError

if TYPE_CHECKING:  # torch loads only when a model runs
    import torch

#: Name of the packaged checkpoint used when ``model=None``.
DEFAULT_MODEL = "cmsn-small"

ModelLike = Any  # None | packaged name | checkpoint path | torch.nn.Module (a CMSN)


@dataclass(frozen=True)
class ModelSpec:
    """A model as it travels to workers: its weights as bytes and their digest (the cache key)."""

    name: str
    sha256: str
    payload: bytes

    def __repr__(self) -> str:  # keep graph reprs short
        return f"ModelSpec({self.name!r}, sha256={self.sha256[:12]}…)"

    def __dask_tokenize__(self) -> tuple[str, str, str]:
        """Dask's token of the spec: its digest stands for the weights.

        Dask tokenizes every literal of a graph it is handed; hashing the ~1 MB payload took 15 ms each time,
        and the streamed write hands the scheduler one graph per region, each holding the spec.
        """
        return ("cmsn-cube-ModelSpec", self.name, self.sha256)


def model_spec(model: ModelLike = None) -> ModelSpec:
    """Turn ``None`` (packaged default), a name, a checkpoint path or a CMSN module into a :class:`ModelSpec`.

    A checkpoint is verified (digest, architecture) here, on the client, before any worker sees it.
    """
    import torch

    from cmsn_cube.model.checkpoint import check_finite_weights, load_model

    if isinstance(model, torch.nn.Module):
        config, state, name = dict(model.config), model.state_dict(), "in-memory model"  # type: ignore[arg-type]
        check_finite_weights(state, name)
    else:
        source = DEFAULT_MODEL if model is None else model
        loaded = load_model(source, bands=BANDS)  # verified: digest, architecture, band order, weights fit
        config, state, name = dict(loaded.config), loaded.state_dict(), os.fspath(source)
    buffer = io.BytesIO()
    torch.save({"config": config, "state_dict": {k: v.detach().cpu() for k, v in state.items()}}, buffer)
    data = buffer.getvalue()
    return ModelSpec(name=name, sha256=hashlib.sha256(data).hexdigest(), payload=data)


_MODEL_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _load_spec(sha256: str, payload: bytes, device: str) -> torch.nn.Module:
    """Build the model of ``payload`` on ``device`` (cached per digest: once per process)."""
    import torch

    from cmsn_cube.model.checkpoint import build_model

    content = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    model = build_model(content["config"])
    model.load_state_dict(content["state_dict"])
    return model.to(device).eval()


def model_on_worker(spec: ModelSpec, device: str) -> torch.nn.Module:
    """Return the model of ``spec`` in this process, built once and reused by every chunk."""
    with _MODEL_LOCK:
        return _load_spec(spec.sha256, spec.payload, device)


def run_filler(
    method: str,
    windows: np.ndarray,
    *,
    spec: ModelSpec,
    device: str,
    days: list[float],
    targets: list[int] | None = None,
) -> np.ndarray:
    """Fill ``windows(batch, dates, bands + mask, y, x)`` as ``(batch, dates, bands, y, x)``.

    ``method`` is the network (``"cmsn"``), the local regression weighted by fit (``"weighted-regression"``:
    the network's prior on its own, :class:`cmsn_cube.model.prior.RegressionFill`), the classical local
    regression (``"regression"``: :func:`cmsn_cube.baselines.regress` over the windows' dates; where no date
    observes a pixel, the weighted one) or the mean of the network and the regression (``"blend"``); the
    windows' dates are the network's (three for a CMSN). ``targets``: the dates wanted (default all); the
    regression and the blend leave the others NaN. :func:`fill_windows` also gives the raw spread.
    """
    every_date = list(range(windows.shape[1]))
    served = every_date if targets is None or method in ("cmsn", "weighted-regression") else list(targets)
    options = {"spec": spec, "device": device, "days": days}
    filled = fill_windows(method, windows, triplet=tuple(every_date), served=served, **options)  # type: ignore[arg-type]
    output = np.full(windows[:, :, :-1].shape, np.nan, dtype=filled.values.dtype)
    output[:, served] = filled.values
    return output


class WindowFill(NamedTuple):
    """A filler's output on a batch of windows, for the dates it serves: values and raw spread of the error."""

    #: ``(batch, served dates, bands, y, x)``
    values: np.ndarray
    #: the same shape: the raw spread of :func:`cmsn_cube.baselines.regress` (NaN where no date observes the
    #: pixel), to be scaled by the scene's calibration (:mod:`cmsn_cube.uncertainty`)
    sigma: np.ndarray


def fill_windows(
    method: str,
    windows: np.ndarray,
    *,
    triplet: tuple[int, ...],
    served: list[int],
    spec: ModelSpec,
    device: str,
    days: list[float],
) -> WindowFill:
    """Fill the ``served`` dates of ``windows(batch, every date, bands + mask, y, x)`` and give their raw spread.

    ``"blend"`` is the mean of the regression's and the network's (:func:`blend_fills`).
    The network and the weighted regression see the dates of ``triplet`` (which holds the served ones); their
    raw spread is the one their regression prior predicts (:func:`cmsn_cube.model.prior.local_regression_spread`).
    The classical regression (:func:`cmsn_cube.baselines.regress`) sees every date: per pixel it takes the best
    fitting of the nearest dates that observed it, and gives its own spread; where no date observes a pixel,
    its fill is the weighted regression's (the band mean). A network without a regression prior has no spread
    of its own: the classical regression's stands in.
    """
    from cmsn_cube.baselines import regress

    if method == "blend":
        options = {"served": served, "spec": spec, "device": device, "days": days}
        regressed = fill_windows("regression", windows, triplet=tuple(range(windows.shape[1])), **options)  # type: ignore[arg-type]
        network = fill_windows("cmsn", windows, triplet=triplet, **options)  # type: ignore[arg-type]
        return blend_fills(regressed, network)
    if method == "regression":
        fits = [regress(w[:, :-1], w[:, -1] > 0.5, np.asarray(days, dtype=np.float64), targets=served) for w in windows]
        values = np.stack([fit.values[served] for fit in fits])
        if np.isnan(values).any():  # pixels no date observes: the weighted regression's guess (the band mean)
            guess = fill_windows("weighted-regression", windows, triplet=triplet, served=served, spec=spec,
                                 device=device, days=days).values  # fmt: skip
            np.copyto(values, guess, where=np.isnan(values))
        return WindowFill(values, np.stack([fit.sigma[served] for fit in fits]))
    inputs = windows if len(triplet) == windows.shape[1] else np.ascontiguousarray(windows[:, list(triplet)])
    output, spread = _fill_with_spread(method, inputs, spec=spec, device=device)
    position = [triplet.index(d) for d in served]
    if spread is None:
        spread = fill_windows("regression", windows, triplet=triplet, served=served, spec=spec, device=device,
                              days=days).sigma  # fmt: skip
    else:
        spread = spread[:, position]
    return WindowFill(output[:, position], spread)


def blend_fills(regressed: WindowFill, network: WindowFill) -> WindowFill:
    """Return the mean of the regression's and the network's fills, and of their raw spreads.

    Where the network's triplet saw nothing (its spread is NaN), the regression's fill alone.
    """
    alone = np.isnan(network.sigma)
    values = np.where(alone, regressed.values, (regressed.values + network.values) / 2)
    sigma = np.where(alone, regressed.sigma, (regressed.sigma + network.sigma) / 2)
    return WindowFill(values.astype(regressed.values.dtype), sigma.astype(regressed.sigma.dtype))


def _fill_with_spread(
    method: str, windows: np.ndarray, *, spec: ModelSpec, device: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the network or the weighted regression on ``windows``: the output and the prior's spread (or None)."""
    output, spread = _run_model(_filler_on_worker(method, spec, device), windows, device)
    if not np.isfinite(output).all():  # never write NaN or inf as a fill (a region is written whole or not)
        raise ModelOutputError(
            f"the {method} filler of {spec.name} gave {int((~np.isfinite(output)).sum())} non-finite values "
            f"on a batch of {len(windows)} windows; nothing of this region was written"
        )
    return output, spread


def _filler_on_worker(method: str, spec: ModelSpec, device: str) -> torch.nn.Module:
    """Return the network (``"cmsn"``), or the weighted local regression with its band statistics (the others)."""
    network = model_on_worker(spec, device)
    if method == "cmsn":
        return network
    with _MODEL_LOCK:
        return _regression_like(network)


@functools.lru_cache(maxsize=4)
def _regression_like(network: torch.nn.Module) -> torch.nn.Module:
    """Build the weighted local regression with the band statistics of ``network`` (cached per network)."""
    import torch

    from cmsn_cube.model.prior import RegressionFill

    return RegressionFill.like(network).to(torch.as_tensor(network.band_mean).device).eval()


def _run_model(model: torch.nn.Module, windows: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``model`` on a batch of ``windows`` (float16 autocast on CUDA): its output and spread, as numpy."""
    import torch

    with torch.inference_mode():
        tensor = torch.from_numpy(windows).to(device)
        if device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.float16):
                result = model(tensor, spread=True)
        else:
            result = model(tensor, spread=True)
        spread = None if result.spread is None else result.spread.float().cpu().numpy()
        return result.output.float().cpu().numpy(), spread
