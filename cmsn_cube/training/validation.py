"""Validation metrics of a model over held-out batches: losses, and PSNR, SSIM and MAE in the cloudy pixels.

SSIM is :func:`cmsn_cube.metrics.ssim_sum`, the definition evaluation uses too, so a validation SSIM and an
evaluation SSIM of the same images are the same number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from cmsn_cube.metrics import ssim_sum
from cmsn_cube.model.cmsn import CMSN
from cmsn_cube.model.losses import DEFAULT_LOSS_WEIGHTS, CMSNLoss
from cmsn_cube.training.loaders import batch_to_device

__all__ = ["Monitor", "evaluate_batches", "improved"]

Monitor = Literal["psnr_cloudy", "ssim_cloudy", "loss"]
MONITORS: tuple[Monitor, ...] = ("psnr_cloudy", "ssim_cloudy", "loss")


class _CloudyTotals:
    """Sums over batches of the losses and of the errors and SSIM in the scored (cloudy) pixels."""

    def __init__(self) -> None:
        self.losses: dict[str, float] = {}
        self.batches = 0
        self.squared_error = self.absolute_error = self.ssim = 0.0
        self.values = self.pixels = self.ssim_values = 0

    def add(self, terms: Mapping[str, torch.Tensor], output: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        for key in ("total", "mtgl", "mtfr", "refine"):
            self.losses[key] = self.losses.get(key, 0.0) + float(terms[key])
        self.batches += 1
        truth = batch["truth"].float()
        scored = (batch["sim_mask"] & batch["truth_valid"]).unsqueeze(2)  # (B, T, 1, H, W)
        error = (output - truth) * scored
        self.squared_error += float((error**2).sum())
        self.absolute_error += float(error.abs().sum())
        self.values += int(scored.sum()) * truth.shape[2]
        self.pixels += int(scored.sum())
        # SSIM needs whole images: pixels without truth are set to 0 in both so they do not count as errors.
        valid = batch["truth_valid"].unsqueeze(2).float()
        total, count = ssim_sum(
            (output * valid).cpu().numpy(), (truth * valid).cpu().numpy(), mask=scored.cpu().numpy()
        )
        self.ssim += total
        self.ssim_values += count

    def metrics(self) -> dict[str, float]:
        metrics = {("loss" if key == "total" else key): value / self.batches for key, value in self.losses.items()}
        if self.values:
            mse = self.squared_error / self.values
            metrics["psnr_cloudy"] = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
            metrics["ssim_cloudy"] = self.ssim / self.ssim_values if self.ssim_values else float("nan")
            metrics["mae_cloudy"] = self.absolute_error / self.values
        else:
            metrics.update(psnr_cloudy=float("nan"), ssim_cloudy=float("nan"), mae_cloudy=float("nan"))
        metrics["cloudy_pixels"] = float(self.pixels)
        return metrics


@torch.inference_mode()
def evaluate_batches(
    model: CMSN,
    batches: Iterable[Mapping[str, Any]],
    *,
    loss_weights: Mapping[str, float] | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = None,
) -> dict[str, float]:
    """Compute validation metrics of ``model`` over ``batches``.

    PSNR, SSIM (:func:`cmsn_cube.metrics.ssim_sum`) and MAE are computed on the model's ``output`` in the
    cloudy pixels that have truth (``sim_mask & truth_valid``), data range 1; each pools all batches (PSNR
    from their pooled squared error).

    Parameters
    ----------
    model : CMSN
        Evaluated in eval mode (its mode is restored afterwards).
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

    Raises
    ------
    ValueError
        ``batches`` yielded no batch.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    use_amp = (device.type == "cuda") if amp is None else (amp and device.type == "cuda")
    loss_fn = CMSNLoss(**{**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})})
    was_training = model.training
    model.eval()
    totals = _CloudyTotals()
    for raw_batch in batches:
        batch = batch_to_device(raw_batch, device)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            prediction = model(batch["inputs"])
        totals.add(loss_fn(prediction, batch), prediction.output.float(), batch)
    model.train(was_training)
    if totals.batches == 0:
        raise ValueError("validation loader yielded no batch")
    return totals.metrics()


def improved(value: float, best: float | None, *, monitor: Monitor, min_delta: float) -> bool:
    """Whether ``value`` of ``monitor`` beats ``best`` by more than ``min_delta`` (NaN never does).

    Examples
    --------
    >>> improved(31.0, 30.0, monitor="psnr_cloudy", min_delta=0.5), improved(0.2, 0.1, monitor="loss", min_delta=0)
    (True, False)
    """
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if monitor == "loss" else value > best + min_delta
