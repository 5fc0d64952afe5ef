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
from typing import TYPE_CHECKING, Any

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
    weighted: np.ndarray | None = None,
) -> np.ndarray:
    """Fill ``windows(batch, dates, bands + mask, y, x)`` as ``(batch, dates, bands, y, x)``.

    ``method`` is the network (``"cmsn"``), the local regression weighted by fit (``"weighted-regression"``:
    the network's prior on its own, :class:`cmsn_cube.model.prior.RegressionFill`) or the classical local
    regression (``"regression"``: :func:`cmsn_cube.baselines.fill_regression` itself, nearest clear date
    first; where it has no answer, the weighted one). ``targets``: the dates wanted (default all; the others
    may be left unfilled); ``weighted``: the weighted regression of these windows when already run.
    """
    from cmsn_cube.baselines import fill_regression

    if method == "regression" and weighted is not None:
        output = weighted.copy()
    else:
        output = _run_model(_filler_on_worker(method, spec, device), windows, device)
        if not np.isfinite(output).all():  # never write NaN or inf as a fill (a region is written whole or not)
            raise ModelOutputError(
                f"the {method} filler of {spec.name} gave {int((~np.isfinite(output)).sum())} non-finite values "
                f"on a batch of {len(windows)} windows; nothing of this region was written"
            )
    if method != "regression":
        return output
    for k, window in enumerate(windows):
        values, gap = window[:, :-1], window[:, -1] > 0.5
        filled = fill_regression(values, gap, np.asarray(days, dtype=np.float64), targets=targets)
        use = gap[:, None] & np.isfinite(filled)
        output[k][use] = filled[use]
    return output


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


def _run_model(model: torch.nn.Module, windows: np.ndarray, device: str) -> np.ndarray:
    """Run ``model`` on a batch of ``windows`` (float16 autocast on CUDA) and return its output as numpy."""
    import torch

    with torch.inference_mode():
        tensor = torch.from_numpy(windows).to(device)
        if device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.float16):
                result = model(tensor).output.float()
        else:
            result = model(tensor).output
        return result.cpu().numpy()
