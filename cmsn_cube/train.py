"""Training loop for :class:`cmsn_cube.model.CMSN`.

AdamW with warm-up and a cosine (or one-cycle) schedule, gradient clipping, mixed precision on CUDA,
validation each epoch with PSNR/SSIM in the cloudy pixels, early stopping, a wall-clock budget, atomic
checkpoints (``last.pt`` for ``resume``, ``best.pt`` for use) with JSON cards, and the loss history as JSON
and PNG. The same function fine-tunes an existing checkpoint: pass its path (or a loaded model).

Batches follow the sample-stream contract: a dict with ``inputs`` ``(B, 3, 5, H, W)``, ``truth``
``(B, 3, 4, H, W)``, ``truth_valid`` ``(B, 3, H, W)`` bool and ``sim_mask`` ``(B, 3, H, W)`` bool.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from cmsn_cube.device import default_device, leaves_global_state
from cmsn_cube.model.checkpoint import _atomic_write_bytes, build_model, load_checkpoint, load_model, save_checkpoint
from cmsn_cube.model.cmsn import ARCHITECTURE, CMSN
from cmsn_cube.model.losses import DEFAULT_LOSS_WEIGHTS, CMSNLoss

__all__ = [
    "TrainResult",
    "evaluate_batches",
    "plot_history",
    "train",
    "train_on_stores",
    "Schedule",
    "Monitor",
    "StopReason",
]

Schedule = Literal["cosine", "onecycle", "constant"]
Monitor = Literal["psnr_cloudy", "ssim_cloudy", "loss"]
StopReason = Literal["completed", "early_stopping", "time_budget"]

_REQUIRED_KEYS = ("inputs", "truth", "truth_valid", "sim_mask")
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
HISTORY_JSON = "history.json"
HISTORY_PNG = "loss.png"


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model : CMSN
        The trained model (the best validated weights when ``restore_best`` and a validation set were given).
    history : dict
        ``{"train": [{"step", "epoch", "lr", "total", "mtgl", ...}], "val": [{"step", "epoch", "loss",
        "psnr_cloudy", "ssim_cloudy", "mae_cloudy"}]}``.
    best_metrics : dict or None
        Validation record of the best epoch.
    steps, epochs : int
        Optimizer steps and epochs done in total (including resumed ones).
    stop_reason : {"completed", "early_stopping", "time_budget"}
    elapsed_s : float
        Wall-clock seconds of this call.
    device : str
    checkpoint_dir, best_checkpoint, last_checkpoint : pathlib.Path or None
    """

    model: CMSN
    history: dict[str, list[dict[str, float]]]
    best_metrics: dict[str, float] | None
    steps: int
    epochs: int
    stop_reason: StopReason
    elapsed_s: float
    device: str
    checkpoint_dir: Path | None = None
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - samplers may still draw from the legacy global RNG
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _resolve_model(model_or_config: CMSN | Mapping[str, Any] | str | os.PathLike[str] | None) -> CMSN:
    if model_or_config is None:
        return CMSN()
    if isinstance(model_or_config, CMSN):
        return model_or_config
    if isinstance(model_or_config, Mapping):
        return build_model({"architecture": ARCHITECTURE, **model_or_config})
    if isinstance(model_or_config, (str, os.PathLike)):
        # Fine-tuning: start from a checkpoint path or a packaged model name.
        return load_model(model_or_config, bands=None)
    raise TypeError(
        "model_or_config must be a CMSN, a config dict, a checkpoint path / packaged name, or None; "
        f"got {type(model_or_config).__name__}"
    )


def _learning_rate(step: int, *, total_steps: int, peak: float, schedule: Schedule, warmup_steps: int) -> float:
    if schedule == "constant":
        return peak
    if schedule == "onecycle":
        # As torch's OneCycleLR: 30 % rise from peak/25, then cosine down to peak/1e4.
        rise = max(1, int(0.3 * total_steps))
        if step < rise:
            start = peak / 25
            return start + (peak - start) * (1 - math.cos(math.pi * step / rise)) / 2
        progress = (step - rise) / max(1, total_steps - rise)
        return peak / 1e4 + (peak - peak / 1e4) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    floor = peak * 0.01
    return floor + (peak - floor) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    missing = [key for key in _REQUIRED_KEYS if key not in batch]
    if missing:
        raise KeyError(f"training batches need keys {list(_REQUIRED_KEYS)}; this batch lacks {missing}")
    return {key: value.to(device, non_blocking=True) for key, value in batch.items() if isinstance(value, torch.Tensor)}


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    return kernel[:, None] * kernel[None, :]


def _ssim_map(prediction: torch.Tensor, truth: torch.Tensor, *, window_size: int = 11) -> torch.Tensor:
    """Per-pixel SSIM (data range 1, Gaussian window σ=1.5) of ``(N, C, H, W)`` images, same shape out."""
    channels = prediction.shape[1]
    window = _gaussian_window(window_size, 1.5, prediction.device).expand(channels, 1, -1, -1).contiguous()
    half = window_size // 2
    mode = "reflect" if min(prediction.shape[-2:]) > half else "replicate"

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(image, (half, half, half, half), mode=mode), window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mean_p, mean_t = blur(prediction), blur(truth)
    var_p = blur(prediction * prediction) - mean_p**2
    var_t = blur(truth * truth) - mean_t**2
    covariance = blur(prediction * truth) - mean_p * mean_t
    return ((2 * mean_p * mean_t + c1) * (2 * covariance + c2)) / ((mean_p**2 + mean_t**2 + c1) * (var_p + var_t + c2))


@torch.inference_mode()
def evaluate_batches(
    model: CMSN,
    batches: Iterable[Mapping[str, Any]],
    *,
    loss_weights: Mapping[str, float] | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = None,
) -> dict[str, float]:
    """Validation metrics of ``model`` over ``batches``.

    PSNR, SSIM and MAE are computed on the model's ``output`` in the cloudy pixels that have truth
    (``sim_mask & truth_valid``), data range 1; PSNR comes from the pooled squared error of all batches.

    Parameters
    ----------
    model : CMSN
    batches : iterable of dict
        Batches of the sample stream.
    loss_weights : mapping, optional
        λ, δ, ξ for the ``loss`` entry (defaults of :data:`DEFAULT_LOSS_WEIGHTS`).
    device : str or torch.device, optional
        Default: the model's device.
    amp : bool, optional
        Autocast on CUDA (default: on when the device is CUDA).

    Returns
    -------
    dict of str to float
        ``loss``, ``mtgl``, ``mtfr``, ``refine``, ``psnr_cloudy`` (dB), ``ssim_cloudy``, ``mae_cloudy``,
        ``cloudy_pixels`` (NaN metrics when there is no cloudy pixel).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    use_amp = (device.type == "cuda") if amp is None else (amp and device.type == "cuda")
    loss_fn = CMSNLoss(**{**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})})
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n_batches = 0
    squared_error = absolute_error = ssim_total = 0.0
    cloudy_values = cloudy_pixels = 0
    for raw_batch in batches:
        batch = _to_device(raw_batch, device)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            prediction = model(batch["inputs"])
        terms = loss_fn(prediction, batch)
        for key in ("total", "mtgl", "mtfr", "refine"):
            sums[key] = sums.get(key, 0.0) + float(terms[key])
        n_batches += 1
        truth = batch["truth"].float()
        output = prediction.output.float()
        scored = (batch["sim_mask"] & batch["truth_valid"]).unsqueeze(2)  # (B, T, 1, H, W)
        valid = batch["truth_valid"].unsqueeze(2).float()
        error = (output - truth) * scored
        squared_error += float((error**2).sum())
        absolute_error += float(error.abs().sum())
        n_bands = truth.shape[2]
        cloudy_values += int(scored.sum()) * n_bands
        cloudy_pixels += int(scored.sum())
        # SSIM needs whole images: invalid pixels are set to 0 in both so they do not count as errors.
        ssim = _ssim_map((output * valid).flatten(0, 1), (truth * valid).flatten(0, 1))
        ssim_total += float((ssim.reshape(truth.shape) * scored).sum())
    model.train(was_training)
    if n_batches == 0:
        raise ValueError("validation loader yielded no batch")
    metrics = {("loss" if key == "total" else key): value / n_batches for key, value in sums.items()}
    if cloudy_values:
        mse = squared_error / cloudy_values
        metrics["psnr_cloudy"] = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
        metrics["ssim_cloudy"] = ssim_total / cloudy_values
        metrics["mae_cloudy"] = absolute_error / cloudy_values
    else:
        metrics.update(psnr_cloudy=float("nan"), ssim_cloudy=float("nan"), mae_cloudy=float("nan"))
    metrics["cloudy_pixels"] = float(cloudy_pixels)
    return metrics


def plot_history(history: Mapping[str, list[Mapping[str, float]]], path: str | os.PathLike[str]) -> Path:
    """Plot training (and validation) loss against steps, and validation PSNR, to a PNG.

    Uses matplotlib's Agg canvas directly, so the caller's backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, psnr_axes = figure.subplots(1, 2)
    train_records = history.get("train", [])
    val_records = history.get("val", [])
    if train_records:
        steps = [record["step"] for record in train_records]
        for key, style in (("total", "-"), ("mtgl", "--"), ("mtfr", ":"), ("refine", "-.")):
            loss_axes.plot(steps, [record[key] for record in train_records], style, label=f"train {key}")
    if val_records:
        loss_axes.plot([r["step"] for r in val_records], [r["loss"] for r in val_records], "o-", label="val total")
        psnr_axes.plot([r["step"] for r in val_records], [r["psnr_cloudy"] for r in val_records], "o-")
    loss_axes.set(xlabel="step", ylabel="loss (reflectance L1 units)", yscale="log", title="losses")
    if train_records or val_records:
        loss_axes.legend(fontsize=7)
    psnr_axes.set(xlabel="step", ylabel="PSNR in cloudy pixels (dB)", title="validation")
    figure.tight_layout()
    path = Path(path)
    _atomic_write_bytes(path, lambda stream: figure.savefig(stream, format="png"))
    return path


def _write_history(history: Mapping[str, Any], directory: Path) -> None:
    text = json.dumps(history, indent=1, allow_nan=True) + "\n"
    _atomic_write_bytes(directory / HISTORY_JSON, lambda stream: stream.write(text.encode()))
    plot_history(history, directory / HISTORY_PNG)


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a (DataLoader-like) loader shuffles with: its own, its sampler's."""
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and not any(generator is other for other in found):
            found.append(generator)
    return found


def _set_epoch(loader: Any, epoch: int) -> None:
    """Tell a loader (or its sampler, e.g. a ``DistributedSampler``) which epoch it is about to give."""
    for owner in (loader, getattr(loader, "sampler", None)):
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return


def _rng_states(*, device: torch.device, loader: Any) -> dict[str, Any]:
    """Every RNG state that decides what comes next (data order, clouds, augmentation), as plain data."""
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()  # noqa: NPY002
    states: dict[str, Any] = {
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": {
            "name": str(numpy_name),
            "keys": torch.from_numpy(np.asarray(numpy_keys, dtype=np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(numpy_has_gauss),
            "cached_gaussian": float(numpy_gauss),
        },
        "loader_rng": [generator.get_state() for generator in _loader_generators(loader)],
    }
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng_states(state: Mapping[str, Any], *, device: torch.device, loader: Any) -> None:
    """Put back what :func:`_rng_states` saved (whatever of it a checkpoint holds)."""
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"].cpu())
    if "python_rng" in state:
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy_rng" in state:
        saved = state["numpy_rng"]
        keys = saved["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state(  # noqa: NPY002
            (saved["name"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
        )
    generators = _loader_generators(loader)
    if len(state.get("loader_rng", ())) == len(generators):
        for generator, generator_state in zip(generators, state["loader_rng"], strict=True):
            generator.set_state(generator_state.cpu())
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)


def _improved(value: float, best: float | None, *, monitor: Monitor, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if monitor == "loss" else value > best + min_delta


@leaves_global_state
def train(
    model_or_config: CMSN | Mapping[str, Any] | str | os.PathLike[str] | None,
    train_loader: Iterable[Mapping[str, Any]],
    val_loader: Iterable[Mapping[str, Any]] | None = None,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    schedule: Schedule = "cosine",
    warmup_steps: int | None = None,
    loss_weights: Mapping[str, float] | None = None,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    time_budget: float | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    monitor: Monitor = "psnr_cloudy",
    restore_best: bool = True,
    log_every: int = 10,
    training_data: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or fine-tune) a CMSN.

    Parameters
    ----------
    model_or_config : CMSN, dict, str, path-like or None
        A model (trained in place), a config dict for :class:`CMSN` (built after seeding, so the
        initialisation is reproducible), a checkpoint path or packaged model name to fine-tune, or ``None``
        for the default CMSN.
    train_loader : iterable of dict
        Batches of the sample stream (e.g. a ``torch.utils.data.DataLoader``); re-iterated every epoch.
    val_loader : iterable of dict, optional
        Held-out batches, evaluated after each epoch (PSNR/SSIM in cloudy pixels).
    epochs : int, optional
        Passes over ``train_loader``.
    steps : int, optional
        Optimizer steps in total; training stops at this count even mid-epoch (then validates once more).
        At least one of ``epochs`` and ``steps`` is needed; with only ``steps``, epochs repeat as needed.
    lr : float
        Peak learning rate of AdamW.
    weight_decay : float
        AdamW weight decay, applied to convolution kernels only (not biases or scales).
    schedule : {"cosine", "onecycle", "constant"}
        Learning-rate schedule over the total number of steps.
    warmup_steps : int, optional
        Linear warm-up of the cosine schedule (default: 5 % of the steps, at most 200).
    loss_weights : mapping, optional
        Overrides of ``lambda_cloudy``, ``delta``, ``xi`` (see :func:`cmsn_cube.model.cmsn_loss`).
    grad_clip : float or None
        Maximum global gradient norm; ``None`` disables clipping.
    seed : int
        Seeds Python, NumPy and torch (including a DataLoader's default shuffling generator).
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    amp : bool, optional
        Mixed precision (bfloat16 where supported, else float16 with loss scaling) on CUDA; default on for
        CUDA, always off on CPU.
    checkpoint_dir : str or path-like, optional
        Where ``last.pt`` (resumable), ``best.pt`` (best validation), their ``.json`` cards,
        ``history.json`` and ``loss.png`` are written (atomically).
    resume : bool
        Continue from ``checkpoint_dir/last.pt`` (weights, optimizer, step, epoch, history, best validation,
        RNG states) if present. ``last.pt`` is written at the end of every epoch, so a killed run continues
        from the start of the epoch it was killed in; with the same arguments and loader it then ends with the
        same weights as a run that was never stopped (on CPU bit for bit), because the data order is restored
        too: torch's, Python's and NumPy's global RNGs and the state of the loader's own shuffling generator
        (``train_loader.generator``, or its sampler's) are saved with the epoch, and a loader (or sampler)
        with a ``set_epoch(epoch)`` method is told each epoch's number before it is iterated. A run that
        stopped mid-epoch on ``steps`` or ``time_budget`` has counted that epoch as done: resuming it starts
        the next one (and a schedule over more ``steps`` is another schedule).
    time_budget : float, optional
        Seconds of wall clock for this call; training stops cleanly (validating and saving) when exceeded.
        The schedule then advances with whichever is further along, steps or time, so a run cut by the
        budget still ends at a low learning rate.
    patience : int, optional
        Early stopping: stop after this many validations without improvement of ``monitor``.
    min_delta : float
        Smallest change of ``monitor`` counted as an improvement.
    monitor : {"psnr_cloudy", "ssim_cloudy", "loss"}
        Validation quantity for best checkpoint and early stopping.
    restore_best : bool
        Return the model with the best validated weights (when a validation loader was given, also when the
        best epoch was before a resume); otherwise, or without validation, the final weights.
    log_every : int
        Steps between entries of the training history (each the mean over those steps).
    training_data : mapping, optional
        JSON-serialisable description of the training data, written into the checkpoint cards.
    progress : bool
        Show a tqdm progress bar with the running loss.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        If neither ``epochs`` nor ``steps`` is given, or an option is out of range.
    KeyError
        If a batch lacks a key of the sample-stream contract.
    FloatingPointError
        If the loss becomes NaN or infinite.
    CheckpointError
        If ``resume`` finds a checkpoint that is not a cmsn-cube checkpoint.
    """
    from tqdm.auto import tqdm

    if epochs is None and steps is None:
        raise ValueError("give epochs=..., steps=... or both")
    if (epochs is not None and epochs < 1) or (steps is not None and steps < 1):
        raise ValueError(f"epochs and steps must be >= 1, got epochs={epochs}, steps={steps}")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    if schedule not in ("cosine", "onecycle", "constant"):
        raise ValueError(f"schedule must be 'cosine', 'onecycle' or 'constant', got {schedule!r}")
    if monitor not in ("psnr_cloudy", "ssim_cloudy", "loss"):
        raise ValueError(f"monitor must be 'psnr_cloudy', 'ssim_cloudy' or 'loss', got {monitor!r}")
    unknown_weights = sorted(set(loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS))
    if unknown_weights:
        raise ValueError(f"unknown loss weights {unknown_weights}; known: {sorted(DEFAULT_LOSS_WEIGHTS)}")
    weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}

    started = time.monotonic()
    _seed_everything(seed)
    model = _resolve_model(model_or_config)
    device = torch.device(default_device(None if device is None else str(device)))
    model.to(device)
    use_amp = (device.type == "cuda") if amp is None else (amp and device.type == "cuda")
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = CMSNLoss(**weights)

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 4]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 4]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )

    try:
        batches_per_epoch: int | None = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        batches_per_epoch = None
    if steps is not None:
        total_steps = steps
    elif batches_per_epoch is not None:
        total_steps = epochs * batches_per_epoch  # type: ignore[operator]
    else:
        raise ValueError("train_loader has no len(); give steps=... so the schedule knows its length")
    max_epochs = epochs if epochs is not None else math.inf
    if warmup_steps is None:
        warmup_steps = min(200, max(1, total_steps // 20))

    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    step = epoch = 0
    best_value: float | None = None
    best_metrics: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    validations_without_improvement = 0
    if resume:
        if directory is None:
            raise ValueError("resume=True needs checkpoint_dir")
        resume_path = directory / LAST_CHECKPOINT
        if resume_path.is_file():
            payload = load_checkpoint(resume_path, map_location=device)
            model.load_state_dict(payload["state_dict"])
            state = payload.get("training_state") or {}
            if "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
            step = int(state.get("step", 0))
            epoch = int(state.get("epoch", 0))
            history = json.loads(state.get("history_json", '{"train": [], "val": []}'))
            best_value = state.get("best_value")
            best_metrics = json.loads(state["best_metrics_json"]) if state.get("best_metrics_json") else None
            validations_without_improvement = int(state.get("validations_without_improvement", 0))
            _restore_rng_states(state, device=device, loader=train_loader)
            if "grad_scaler" in state and scaler.is_enabled():
                scaler.load_state_dict(state["grad_scaler"])
            # best.pt holds the best validated weights only when there was a validation; without one it
            # holds the final weights of the earlier call, which must not come back at the end of this one.
            resume_best_path = directory / BEST_CHECKPOINT
            if val_loader is not None and best_value is not None and resume_best_path.is_file():
                best_state = load_checkpoint(resume_best_path)["state_dict"]

    run_facts = {
        "seed": seed,
        "lr": lr,
        "weight_decay": weight_decay,
        "schedule": schedule,
        "grad_clip": grad_clip,
        "loss_weights": weights,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "amp": str(amp_dtype).removeprefix("torch.") if use_amp else "off",
        "torch": str(torch.__version__),
        "training_data": dict(training_data or {}),
    }

    def card_metadata(elapsed: float) -> dict[str, Any]:
        return {
            "training": {**run_facts, "steps": step, "epochs": epoch, "train_seconds": round(elapsed, 1)},
            "metrics": best_metrics or {},
        }

    def save_last(elapsed: float) -> Path | None:
        if directory is None:
            return None
        training_state = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "epoch": epoch,
            "history_json": json.dumps(history),
            "best_value": best_value,
            "best_metrics_json": json.dumps(best_metrics) if best_metrics else "",
            "validations_without_improvement": validations_without_improvement,
            "grad_scaler": scaler.state_dict(),
            **_rng_states(device=device, loader=train_loader),
        }
        path = save_checkpoint(
            directory / LAST_CHECKPOINT, model, metadata=card_metadata(elapsed), training_state=training_state
        )
        _write_history(history, directory)
        return path

    stop_reason: StopReason = "completed"
    window: dict[str, float] = {}
    window_count = 0
    running_loss: float | None = None
    current_lr = lr
    saved_at_step = -1
    last_path: Path | None = None
    model.train()
    while epoch < max_epochs and step < total_steps and stop_reason == "completed":
        epoch_batches = batches_per_epoch if batches_per_epoch is not None else total_steps - step
        bar = tqdm(
            total=min(epoch_batches, total_steps - step),
            desc=f"epoch {epoch + 1}",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        _set_epoch(train_loader, epoch)
        for raw_batch in train_loader:
            if step >= total_steps:
                break
            if time_budget is not None and time.monotonic() - started > time_budget:
                stop_reason = "time_budget"
                break
            # With a time budget the schedule follows whichever runs out first, steps or time, so the
            # learning rate has decayed when the budget stops training.
            schedule_step = step
            if time_budget is not None:
                spent = (time.monotonic() - started) / time_budget
                schedule_step = max(step, min(total_steps, int(spent * total_steps)))
            current_lr = _learning_rate(
                schedule_step, total_steps=total_steps, peak=lr, schedule=schedule, warmup_steps=warmup_steps
            )
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            batch = _to_device(raw_batch, device)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                prediction = model(batch["inputs"])
            terms = loss_fn(prediction, batch)
            if not torch.isfinite(terms["total"]):
                raise FloatingPointError(
                    f"loss became {float(terms['total'])} at step {step}; lower lr (now {current_lr:.2e}) "
                    "or check the batch for NaN reflectance"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["total"]).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1

            loss_value = float(terms["total"].detach())
            running_loss = loss_value if running_loss is None else 0.9 * running_loss + 0.1 * loss_value
            for key, value in terms.items():
                window[key] = window.get(key, 0.0) + float(value.detach())
            window_count += 1
            if window_count >= log_every or step == total_steps:
                history["train"].append(
                    {"step": step, "epoch": epoch + 1, "lr": current_lr}
                    | {key: value / window_count for key, value in window.items()}
                )
                window, window_count = {}, 0
            bar.set_postfix(loss=f"{running_loss:.4f}", lr=f"{current_lr:.1e}")
            bar.update()
        bar.close()
        epoch += 1

        if val_loader is not None:
            metrics = evaluate_batches(model, val_loader, loss_weights=weights, device=device, amp=use_amp)
            record = {"step": step, "epoch": epoch, **metrics}
            history["val"].append(record)
            value = metrics[monitor]
            if _improved(value, best_value, monitor=monitor, min_delta=min_delta):
                best_value, best_metrics = value, record
                validations_without_improvement = 0
                best_state = {key: tensor.detach().cpu().clone() for key, tensor in model.state_dict().items()}
                if directory is not None:
                    save_checkpoint(
                        directory / BEST_CHECKPOINT, model, metadata=card_metadata(time.monotonic() - started)
                    )
            else:
                validations_without_improvement += 1
            if progress:
                tqdm.write(
                    f"epoch {epoch} step {step}: val loss {metrics['loss']:.4f}, "
                    f"PSNR cloudy {metrics['psnr_cloudy']:.2f} dB, SSIM cloudy {metrics['ssim_cloudy']:.4f}"
                )
            if patience is not None and validations_without_improvement >= patience:
                stop_reason = "early_stopping"
        last_path = save_last(time.monotonic() - started)
        saved_at_step = step
        if time_budget is not None and time.monotonic() - started > time_budget and step < total_steps:
            stop_reason = "time_budget"

    if window_count:
        history["train"].append(
            {"step": step, "epoch": epoch, "lr": current_lr}
            | {key: value / window_count for key, value in window.items()}
        )
        window_count = 0
        saved_at_step = -1  # the history changed since the last save
    if saved_at_step != step:
        last_path = save_last(time.monotonic() - started)
    if val_loader is None and directory is not None:
        # Without validation the final weights are the ones to use (no validation metrics describe them,
        # even when a resumed earlier call had some).
        metadata = card_metadata(time.monotonic() - started) | {"metrics": {}}
        save_checkpoint(directory / BEST_CHECKPOINT, model, metadata=metadata)
    best_path: Path | None = None
    if directory is not None and (directory / BEST_CHECKPOINT).is_file():
        best_path = directory / BEST_CHECKPOINT
    if restore_best and best_state is not None:  # only ever set by a validation
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model,
        history=copy.deepcopy(history),
        best_metrics=best_metrics,
        steps=step,
        epochs=epoch,
        stop_reason=stop_reason,
        elapsed_s=time.monotonic() - started,
        device=str(device),
        checkpoint_dir=directory,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        extra={"run": run_facts},
    )


# ------------------------------------------------------------------------------------ training from stores


class _EpochLoader:
    """A DataLoader wrapper that draws fresh clouds every epoch and augments batches with flips/quarter turns.

    The datasets seed their clouds by ``(seed, epoch, index)``; :func:`train` calls ``set_epoch`` before
    each epoch, so every epoch gets new cloud shapes over the same windows. The shuffle (the DataLoader's
    generator, which also seeds its workers) and the augmentation are reseeded from ``(seed, epoch)`` too, so
    an epoch gives the same batches whatever came before it: a resumed run sees the data of a straight one.
    Iterating without ``set_epoch`` goes on to the next epoch. The same flip/rotation is applied to all dates
    and all tensors of a batch (geometry must stay aligned).
    """

    def __init__(
        self, loader: Any, datasets: Iterable[Any], *, augment: bool, seed: int, radiometric: bool = False
    ) -> None:
        self.loader, self.datasets, self.augment, self.seed = loader, list(datasets), augment, seed
        self.radiometric = radiometric
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration give epoch ``epoch`` (counted from 0)."""
        self.epoch = int(epoch)

    def _epoch_seeds(self, epoch: int) -> tuple[int, int]:
        shuffle, augmentation = np.random.SeedSequence([self.seed % 2**64, epoch]).generate_state(2, np.uint64)
        return int(shuffle), int(augmentation)

    def __iter__(self) -> Any:
        epoch = self.epoch
        self.epoch += 1
        for dataset in self.datasets:
            dataset.set_epoch(epoch)
        shuffle_seed, augmentation_seed = self._epoch_seeds(epoch)
        if isinstance(getattr(self.loader, "generator", None), torch.Generator):
            self.loader.generator.manual_seed(shuffle_seed)
        generator = torch.Generator().manual_seed(augmentation_seed)
        for batch in self.loader:
            yield self._augment(batch, generator) if self.augment or self.radiometric else batch

    def _augment(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        turns, flip = (int(v) for v in torch.randint(0, 4, (2,), generator=generator))
        out = dict(batch)
        for key, value in batch.items() if self.augment else ():
            value = torch.rot90(value, turns, dims=(-2, -1)) if turns else value
            out[key] = torch.flip(value, dims=(-1,)) if flip % 2 else value
        if self.radiometric:
            out = radiometric_augmentation(out, generator)
        return {key: value.contiguous() for key, value in out.items()}


#: Per-date, per-band gain range of :func:`radiometric_augmentation` (TOA vs surface reflectance, sensors).
GAIN_RANGE = (0.8, 1.25)
#: Per-date, per-band offset range (reflectance).
OFFSET_RANGE = (-0.03, 0.03)
#: Haze: a veil ``h * (1 - x)`` strongest in blue, weakest in NIR, on a third of the dates, h up to 0.08.
HAZE_MAX, HAZE_SHARE, HAZE_BY_BAND = 0.08, 1 / 3, (1.0, 0.75, 0.5, 0.2)


def radiometric_augmentation(batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Change each date's radiometry as another product, sensor or a hazy day would, in inputs and truth alike.

    Per sample, date and band: ``x * gain + offset`` (gain log-uniform in :data:`GAIN_RANGE`, offset in
    :data:`OFFSET_RANGE`), and on a third of the dates a haze veil; clipped to [0, 1]. Masked input pixels stay 0.
    """
    inputs, truth = batch["inputs"], batch["truth"]
    batch_size, dates, channels = inputs.shape[:3]
    bands = channels - 1
    shape = (batch_size, dates, bands, 1, 1)
    low, high = np.log(GAIN_RANGE[0]), np.log(GAIN_RANGE[1])
    gain = torch.exp(low + (high - low) * torch.rand(shape, generator=generator))
    offset = OFFSET_RANGE[0] + (OFFSET_RANGE[1] - OFFSET_RANGE[0]) * torch.rand(shape, generator=generator)
    hazy = torch.rand((batch_size, dates, 1, 1, 1), generator=generator) < HAZE_SHARE
    haze = hazy * HAZE_MAX * torch.rand((batch_size, dates, 1, 1, 1), generator=generator)
    veil = haze * torch.tensor(HAZE_BY_BAND[:bands] + (0.2,) * (bands - len(HAZE_BY_BAND))).view(1, 1, -1, 1, 1)

    def change(values: torch.Tensor) -> torch.Tensor:
        return ((values * gain + offset) * (1 - veil) + veil).clamp(0, 1)

    clear = 1 - inputs[:, :, bands:]
    out = dict(batch)
    out["inputs"] = torch.cat([change(inputs[:, :, :bands]) * clear, inputs[:, :, bands:]], dim=2)
    out["truth"] = change(truth) * batch["truth_valid"].unsqueeze(2).to(truth.dtype)
    return out


def epoch_loader(
    datasets: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    augment: bool = True,
    radiometric: bool = False,
    balance: bool = False,
    num_workers: int = 0,
) -> _EpochLoader:
    """The training batches of one or more window datasets, new clouds and augmentation every epoch.

    Parameters
    ----------
    datasets : sequence of TripletWindowDataset
        Pooled into one epoch.
    batch_size, num_workers : int
        As :class:`torch.utils.data.DataLoader`.
    seed : int
        Seeds the shuffle, the clouds and the augmentation of every epoch.
    augment : bool
        Random flips and quarter turns (the same for every tensor of a batch).
    radiometric : bool
        Also :func:`radiometric_augmentation`.
    balance : bool
        Every dataset gives the same share of an epoch's windows (drawn with replacement), however many
        windows it has; an epoch keeps the pooled length.
    """
    from torch.utils.data import ConcatDataset, DataLoader, WeightedRandomSampler

    pooled: ConcatDataset[Any] = ConcatDataset(datasets)
    generator = torch.Generator().manual_seed(seed)
    drop_last = len(pooled) > batch_size  # no tiny last batch, unless that is all there is
    sampler = None
    if balance:
        shares = [1.0 / len(d) for d in datasets for _ in range(len(d))]
        # the sampler shares the loader's generator, so reseeding it per epoch reseeds the draw
        sampler = WeightedRandomSampler(shares, num_samples=len(pooled), generator=generator)
    loader = DataLoader(
        pooled, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, num_workers=num_workers,
        generator=generator, drop_last=drop_last,
    )  # fmt: skip
    return _EpochLoader(loader, datasets, augment=augment, radiometric=radiometric, seed=seed)


def _describe_store(store: Any) -> str:
    return (
        os.fspath(store) if isinstance(store, (str, os.PathLike)) else str(store.attrs.get("title", "in-memory cube"))
    )


@leaves_global_state
def train_on_stores(
    stores: Any,
    *,
    out: str | os.PathLike[str],
    init: str | os.PathLike[str] | None = None,
    width: int | None = None,
    depth: int | None = None,
    fusion_depth: int | None = None,
    skip_width: int | None = None,
    patch_size: int = 128,
    overlap: int = 32,
    batch_size: int = 8,
    val_fraction: float = 0.2,
    truth: Literal["auto", "cube", "observed"] = "auto",
    levels: Sequence[float] | None = None,
    reference_masks: str | os.PathLike[str] | None = "auto",
    augment: bool = True,
    radiometric: bool = False,
    balance: bool = False,
    in_memory: bool = True,
    num_workers: int = 0,
    threads: int | None = None,
    seed: int = 0,
    training_data: Mapping[str, Any] | None = None,
    **train_options: Any,
) -> TrainResult:
    """Train (or fine-tune) a CMSN on windows of one or more cube stores, writing checkpoints to ``out``.

    Builds a training and a validation loader per store with :func:`cmsn_cube.samples.make_dataloaders`
    (validation on the last rows of each store, spatially held out), pools them, and calls :func:`train`.
    Each epoch draws new simulated clouds and (with ``augment``) random flips and quarter turns.

    Parameters
    ----------
    stores : str, path-like, xarray.Dataset or a sequence of them
        Zarr stores written by :func:`cmsn_cube.store.write_cube` (or cubes), each with at least three dates.
    out : str or path-like
        Checkpoint folder: ``best.pt``, ``last.pt``, their cards, ``history.json`` and ``loss.png``.
    init : str or path-like, optional
        Checkpoint path or packaged model name to fine-tune; default a new CMSN.
    width, depth, fusion_depth, skip_width : int, optional
        Architecture of a new CMSN (defaults of :class:`cmsn_cube.model.CMSN`); not allowed with ``init``.
    patch_size, overlap : int
        Window side and overlap in pixels.
    batch_size : int
        Windows per optimizer step.
    val_fraction : float
        Share of each store's rows held out for validation.
    truth : {"auto", "cube", "observed"}
        Training truth: the store's ``truth`` variable (``cube``; the embedded scene has one), the clear
        observations (``observed``), or ``auto``: ``cube`` for stores that have one, else ``observed``.
    levels : sequence of float, optional
        Masked fraction (real + pasted clouds) for T1, T2, T3; default :data:`cmsn_cube.qa.DEFAULT_CLOUD_LEVELS`.
    reference_masks : path, "auto" or None
        UKIS reference cloud masks used as pasted shapes ("auto": $CMSN_SHARED_DATA/cloud_masks_ukis when set).
    augment : bool
        Random flips and quarter turns of the training batches.
    radiometric : bool
        Per-date, per-band gain, offset and haze changes (:func:`radiometric_augmentation`).
    balance : bool
        Every store gives the same share of each epoch's windows, however large it is.
    in_memory : bool
        Load each store into memory first (fast window reads; the embedded scene is a few tens of MB).
    num_workers : int
        DataLoader worker processes.
    threads : int, optional
        Torch intra-op threads (``torch.set_num_threads``). On a CPU shared with other jobs, 1 thread plus
        one DataLoader worker is often faster than 2 threads, which stall waiting for each other.
    seed : int
        Seeds the clouds, the shuffle, the augmentation and :func:`train`.
    training_data : mapping, optional
        Extra facts about the data for the checkpoint card (merged into the generated description).
    **train_options
        Passed to :func:`train`: ``epochs``, ``steps``, ``lr``, ``schedule``, ``loss_weights``, ``time_budget``,
        ``patience``, ``device``, ``resume``, ``progress``...

    Returns
    -------
    TrainResult

    Raises
    ------
    CubeValidationError
        If a store is not a valid cube or architecture options are combined with ``init``.
    NoDataError
        If a store has no usable window.
    """
    from torch.utils.data import ConcatDataset, DataLoader

    from cmsn_cube.exceptions import CubeValidationError
    from cmsn_cube.qa import DEFAULT_CLOUD_LEVELS
    from cmsn_cube.samples import make_dataloaders
    from cmsn_cube.store import open_cube

    if isinstance(stores, (str, os.PathLike)) or not isinstance(stores, Sequence):
        stores = [stores]
    if not stores:
        raise CubeValidationError("give at least one store to train on")
    architecture = {
        key: value
        for key, value in {
            "width": width,
            "depth": depth,
            "fusion_depth": fusion_depth,
            "skip_width": skip_width,
        }.items()
        if value is not None
    }
    if init is not None and architecture:
        raise CubeValidationError(
            f"architecture options {sorted(architecture)} cannot change a checkpoint given with init={init!r}"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    levels = tuple(levels) if levels is not None else tuple(DEFAULT_CLOUD_LEVELS)
    train_sets, val_sets, described = [], [], []
    for index, store in enumerate(stores):
        cube = store if not isinstance(store, (str, os.PathLike)) else open_cube(store)
        source = "cube" if truth == "cube" or (truth == "auto" and "truth" in cube.data_vars) else "observed"
        data = cube.load() if in_memory else (store if isinstance(store, (str, os.PathLike)) else cube)
        store_train, store_val = make_dataloaders(
            data,
            size=patch_size,
            overlap=overlap,
            val_fraction=val_fraction,
            batch_size=batch_size,
            seed=seed + 1000 * index,  # different clouds per store
            truth=source,
            levels=levels,
            reference_masks=reference_masks,
        )
        train_sets.append(store_train.dataset)
        val_sets.append(store_val.dataset)
        described.append(
            {
                "store": _describe_store(store),
                "truth": source,
                "size": [int(cube.sizes["y"]), int(cube.sizes["x"])],
                "dates": int(cube.sizes["time"]),
                "train_windows": len(store_train.dataset),  # type: ignore[arg-type]
                "val_windows": len(store_val.dataset),  # type: ignore[arg-type]
                **{key: cube.attrs[key] for key in ("seed", "sensor", "scale_m") if key in cube.attrs},
            }
        )
    train_loader = epoch_loader(
        train_sets,
        batch_size=batch_size,
        seed=seed,
        augment=augment,
        radiometric=radiometric,
        balance=balance,
        num_workers=num_workers,
    )
    val_loader: DataLoader[Any] = DataLoader(
        ConcatDataset(val_sets), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    description = {
        "stores": described,
        "patch_size": patch_size,
        "overlap": overlap,
        "batch_size": batch_size,
        "val_fraction": val_fraction,
        "levels": list(levels),
        "reference_masks": None if reference_masks is None else os.fspath(reference_masks),
        "augment": augment,
        "radiometric": radiometric,
        "balance": balance,
        "torch_threads": torch.get_num_threads(),
        **dict(training_data or {}),
    }
    model: Any = init if init is not None else (architecture or None)
    return train(
        model,
        train_loader,
        val_loader,
        seed=seed,
        checkpoint_dir=out,
        training_data=description,
        **train_options,
    )
