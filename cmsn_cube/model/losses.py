"""The three CMSN losses, scored only where the truth is valid.

- MTGL (multi-temporal global-local): ``Σ_dates [L1 on clear valid pixels + λ · L1 on cloudy valid pixels]``
  of the coarse reconstruction.
- MTFR (multi-temporal frequency reconstruction): ``Σ_dates`` L1 between the 2-D spectra of the coarse
  reconstruction and of the truth (real and imaginary parts), invalid pixels set to 0 in both first.
- Refinement: ``Σ_dates`` L1 of the refined reconstruction against the truth on valid pixels.

``total = MTGL + δ · MTFR + ξ · refinement``. Each term is an average per date (so it does not grow with
the image size) summed over dates, is exactly 0 for a perfect prediction and positive otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["CMSNLoss", "cmsn_loss", "DEFAULT_LOSS_WEIGHTS"]

#: Defaults of the loss weights: λ (cloudy pixels in MTGL), δ (MTFR) and ξ (refinement).
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"lambda_cloudy": 2.0, "delta": 0.1, "xi": 1.0}


def _masked_l1_per_date(error: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the pixels in ``where``, per date, summed over dates.

    ``error`` is ``(B, T, bands, H, W)``, ``where`` is ``(B, T, H, W)`` bool/float. A date with no pixel in
    ``where`` contributes 0.
    """
    weight = where.to(error.dtype).unsqueeze(2)
    total = (error.abs() * weight).sum(dim=(0, 2, 3, 4))
    count = weight.sum(dim=(0, 2, 3, 4)) * error.shape[2]
    return (total / count.clamp(min=1)).sum()


def _spectral_l1_per_date(error: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L1 between spectra of prediction and truth, from their masked difference (the FFT is linear)."""
    masked = error.float() * valid.to(torch.float32).unsqueeze(2)
    # "ortho" keeps Parseval's energy, so the mean over coefficients is on the scale of a per-pixel error
    # whatever the image size.
    spectrum = torch.fft.rfft2(masked, norm="ortho")
    per_date = (spectrum.real.abs() + spectrum.imag.abs()).mean(dim=(0, 2, 3, 4))
    return per_date.sum()


def cmsn_loss(
    prediction: Any,
    batch: Mapping[str, torch.Tensor],
    *,
    lambda_cloudy: float = DEFAULT_LOSS_WEIGHTS["lambda_cloudy"],
    delta: float = DEFAULT_LOSS_WEIGHTS["delta"],
    xi: float = DEFAULT_LOSS_WEIGHTS["xi"],
) -> dict[str, torch.Tensor]:
    """Compute the CMSN losses of one batch.

    Parameters
    ----------
    prediction : CMSNOutput
        Anything with ``coarse`` and ``refined`` tensors ``(B, T, bands, H, W)``.
    batch : mapping
        A batch of the sample stream: ``inputs`` ``(B, T, bands + 1, H, W)`` (last channel = cloud mask),
        ``truth`` ``(B, T, bands, H, W)`` and ``truth_valid`` ``(B, T, H, W)`` bool.
    lambda_cloudy : float
        λ, weight of the cloudy pixels in MTGL relative to clear ones.
    delta : float
        δ, weight of MTFR.
    xi : float
        ξ, weight of the refinement loss.

    Returns
    -------
    dict of str to torch.Tensor
        Scalars ``total``, ``mtgl``, ``mtfr``, ``refine``, ``mtgl_clear`` and ``mtgl_cloudy``.

    Raises
    ------
    KeyError
        If ``batch`` lacks ``inputs``, ``truth`` or ``truth_valid``.
    ValueError
        If shapes disagree.

    Examples
    --------
    >>> from cmsn_cube.model.cmsn import CMSNOutput
    >>> truth = torch.rand(1, 3, 4, 8, 8)
    >>> batch = {"inputs": torch.zeros(1, 3, 5, 8, 8), "truth": truth,
    ...          "truth_valid": torch.ones(1, 3, 8, 8, dtype=torch.bool)}
    >>> float(cmsn_loss(CMSNOutput(truth, truth, truth), batch)["total"])
    0.0
    """
    missing = [key for key in ("inputs", "truth", "truth_valid") if key not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; expected the keys of the sample stream (inputs, truth, truth_valid)")
    truth = batch["truth"]
    coarse = prediction.coarse
    refined = prediction.refined
    if coarse.shape != truth.shape or refined.shape != truth.shape:
        raise ValueError(
            f"prediction shapes coarse {tuple(coarse.shape)} / refined {tuple(refined.shape)} differ from "
            f"truth {tuple(truth.shape)}"
        )
    n_bands = truth.shape[2]
    valid = batch["truth_valid"].to(torch.bool)
    cloudy = batch["inputs"][:, :, n_bands] > 0.5
    truth = truth.to(torch.float32)
    coarse_error = coarse.float() - truth

    mtgl_clear = _masked_l1_per_date(coarse_error, valid & ~cloudy)
    mtgl_cloudy = _masked_l1_per_date(coarse_error, valid & cloudy)
    mtgl = mtgl_clear + lambda_cloudy * mtgl_cloudy
    mtfr = _spectral_l1_per_date(coarse_error, valid)
    refine = _masked_l1_per_date(refined.float() - truth, valid)
    total = mtgl + delta * mtfr + xi * refine
    return {
        "total": total,
        "mtgl": mtgl,
        "mtfr": mtfr,
        "refine": refine,
        "mtgl_clear": mtgl_clear,
        "mtgl_cloudy": mtgl_cloudy,
    }


class CMSNLoss(nn.Module):
    """Module form of :func:`cmsn_loss` holding the weights λ, δ, ξ.

    Parameters
    ----------
    lambda_cloudy, delta, xi : float
        See :func:`cmsn_loss`.
    """

    def __init__(
        self,
        *,
        lambda_cloudy: float = DEFAULT_LOSS_WEIGHTS["lambda_cloudy"],
        delta: float = DEFAULT_LOSS_WEIGHTS["delta"],
        xi: float = DEFAULT_LOSS_WEIGHTS["xi"],
    ) -> None:
        super().__init__()
        for name, value in (("lambda_cloudy", lambda_cloudy), ("delta", delta), ("xi", xi)):
            if value < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {value}")
        self.lambda_cloudy = float(lambda_cloudy)
        self.delta = float(delta)
        self.xi = float(xi)

    @property
    def weights(self) -> dict[str, float]:
        """The weights as a JSON-serialisable dict."""
        return {"lambda_cloudy": self.lambda_cloudy, "delta": self.delta, "xi": self.xi}

    def forward(self, prediction: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """See :func:`cmsn_loss`."""
        return cmsn_loss(prediction, batch, **self.weights)

    def extra_repr(self) -> str:
        """Return the loss weights for ``repr(loss)``."""
        return ", ".join(f"{key}={value}" for key, value in self.weights.items())
