"""Classical first guesses the network refines: a temporal mean fill and a local radiometric regression.

The regression prior is the differentiable twin of :func:`cmsn_cube.baselines.regression`: for every cloudy pixel
of a date, each other date predicts it through a gain and an offset fitted per band in a window around the pixel
(on pixels clear in both dates); the predictions are averaged, weighted by how well each fit explains its window.
Starting the coarse decoder from it lets the network spend its capacity on what a linear fit cannot do (field
boundaries, phenology that differs field by field) instead of re-learning radiometric matching.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: Half width of the regression window in pixels (31 px = 930 m at 30 m, as the classical baseline).
DEFAULT_RADIUS = 15
#: Ridge term pulling gains towards 1 in normalised units: windows with little contrast keep their offset only.
_RIDGE = 0.1
#: Residual variance floor, in normalised units, so one perfect window does not take all the weight.
_RESIDUAL_FLOOR = 0.01


def box_sum(images: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over a (2r+1)² window at every pixel (zero outside): O(1) per pixel, one axis at a time.

    Running sums along one axis at a time keep their magnitude to one row of the image, not the whole image
    as a 2-D integral image does; in float32 the 2-D version lost enough to moves fills by up to 4e-4 with the
    batch size (the cumulative sum's order changes with the tensor's shape).
    """
    size = 2 * radius + 1
    padded = F.pad(images, (radius + 1, radius, radius + 1, radius))
    along_rows = padded.cumsum(-1)
    along_rows = along_rows[..., size:] - along_rows[..., :-size]
    # cumsum over the last axis of a transposed view is 2.5x faster than over axis -2 on CPU (same sums, same order)
    both = along_rows.transpose(-1, -2).cumsum(-1)
    return (both[..., size:] - both[..., :-size]).transpose(-1, -2)


#: Fewest clear pixels a date needs for its own statistics; below it the sample's pooled ones stand in.
_MIN_CLEAR_PIXELS = 16
#: Spread floor (reflectance): a uniform date (water, a small tile) is not amplified into noise.
_MIN_SPREAD = 0.01


def clear_pixel_statistics(
    bands: torch.Tensor, clear: torch.Tensor, *, fallback_mean: torch.Tensor, fallback_std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, date and band: mean and spread of the clear pixels, each ``(B, T, C, 1, 1)``.

    Normalising each date by its own clear pixels takes out what differs between TOA and surface reflectance,
    sensors, and hazy dates (a gain and an offset per band), so the network sees the same numbers for all of
    them. A date with fewer than 16 clear pixels takes the statistics of the sample's clear pixels of all
    dates; a sample with none takes ``fallback_mean`` / ``fallback_std``.

    Parameters
    ----------
    bands : torch.Tensor
        ``(B, T, C, H, W)`` reflectance (any value at cloudy pixels).
    clear : torch.Tensor
        ``(B, T, 1, H, W)`` 1 where the date is clear.
    fallback_mean, fallback_std : torch.Tensor
        Broadcastable to ``(B, T, C, 1, 1)``.
    """
    # float64 sums: in float32 their rounding follows the memory layout, and the network amplifies it (a tile
    # cut from a mirrored scene filled up to 3e-4 apart from the same tile copied)
    values, weights = bands.double() * clear, clear.double()
    count = weights.sum(dim=(-2, -1), keepdim=True)
    total = values.sum(dim=(-2, -1), keepdim=True)
    squares = (values * values).sum(dim=(-2, -1), keepdim=True)
    pooled_count, pooled_total = count.sum(dim=1, keepdim=True), total.sum(dim=1, keepdim=True)
    pooled_squares = squares.sum(dim=1, keepdim=True)
    own = count >= _MIN_CLEAR_PIXELS
    pooled = pooled_count >= _MIN_CLEAR_PIXELS
    count = torch.where(own, count, pooled_count).clamp(min=1)
    total = torch.where(own, total, pooled_total)
    squares = torch.where(own, squares, pooled_squares)
    mean = total / count
    spread = (squares / count - mean * mean).clamp(min=0).sqrt().clamp(min=_MIN_SPREAD)
    usable = own | pooled
    mean = torch.where(usable, mean, fallback_mean.double())
    spread = torch.where(usable, spread, fallback_std.double())
    return mean.float(), spread.float()


def normalising_statistics(
    bands: torch.Tensor, clear: torch.Tensor, *, normalisation: str, band_mean: torch.Tensor, band_std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the ``(mean, std)`` that normalise ``bands``.

    ``"fixed"``: ``band_mean``/``band_std``; ``"clear-pixels"``: each date's own clear pixels, with them as the
    fallback (:func:`clear_pixel_statistics`).
    """
    if normalisation == "fixed":
        return band_mean, band_std
    return clear_pixel_statistics(bands, clear, fallback_mean=band_mean, fallback_std=band_std)


def temporal_mean_fill(normalised: torch.Tensor, clear: torch.Tensor) -> torch.Tensor:
    """Own value where clear, else the mean of the other dates clear there (else 0 = the band mean).

    ``normalised`` is ``(B, T, C, H, W)`` (0 at cloudy pixels), ``clear`` ``(B, T, 1, H, W)``.
    """
    total = (normalised * clear).sum(dim=1, keepdim=True)
    count = clear.sum(dim=1, keepdim=True)
    others = (total - normalised * clear) / (count - clear).clamp(min=1)
    return normalised * clear + others * (1 - clear)


def local_regression_fill(
    normalised: torch.Tensor, clear: torch.Tensor, *, radius: int = DEFAULT_RADIUS, factor: int = 4
) -> torch.Tensor:
    """Own value where clear, else the weighted local-regression prediction from the other dates.

    :func:`local_regression_spread` gives the same fill and the variance of its error the fits predict.
    """
    return local_regression_spread(normalised, clear, radius=radius, factor=factor, spread=False)[0]


def local_regression_spread(
    normalised: torch.Tensor, clear: torch.Tensor, *, radius: int = DEFAULT_RADIUS, factor: int = 4, spread: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return :func:`local_regression_fill` and, with ``spread``, the predicted variance of its error.

    The fit runs on a grid ``factor`` times coarser (block means of the clear pixels, windows of about
    ``2 * radius + 1`` full-resolution pixels) and the fitted gains and offsets are interpolated back and applied
    to the full-resolution helper dates: the fit is smooth in space anyway, and this costs ~1/factor² of a
    full-resolution fit.

    Parameters
    ----------
    normalised : torch.Tensor
        ``(B, T, C, H, W)`` normalised bands, 0 at cloudy pixels.
    clear : torch.Tensor
        ``(B, T, 1, H, W)`` 1 where the date is clear.
    radius : int
        Half width of the fitting window, in full-resolution pixels.
    factor : int
        Coarsening of the statistics grid.

    Returns
    -------
    tuple
        The fill ``(B, T, C, H, W)`` (where no other date is clear, the temporal mean fill: the band mean) and,
        with ``spread``, the variance of its error in normalised units², the same shape: the trust-weighted mean
        of the helpers' residual variances per band plus the weighted variance of their predictions; 1 (the
        date's own spread) where no window around the pixel holds a pixel clear in both dates, NaN where no other
        date is clear; else None.
    """
    batch, dates, channels, height, width = normalised.shape
    values, masks = normalised.float(), clear.float()
    clear_fraction, block_means = _coarse_grid(values, masks, factor)
    # both directions of a pair of dates share their window sums: box-sum each unordered pair once
    unordered = [(first, second) for first in range(dates) for second in range(first + 1, dates)]
    first = torch.tensor([a for a, _ in unordered], device=values.device)
    second = torch.tensor([b for _, b in unordered], device=values.device)
    a, b = block_means[:, first], block_means[:, second]  # (B, P, C, h, w)
    both = clear_fraction[:, first] * clear_fraction[:, second]  # (B, P, 1, h, w)
    # the window statistics written straight into one tensor (a concatenation would copy them once more)
    stats = both.new_empty(both.shape[:2] + (1 + 5 * channels,) + both.shape[3:])
    stats[:, :, :1] = both
    both_a = torch.mul(both, a, out=stats[:, :, 1 : 1 + channels])
    both_b = torch.mul(both, b, out=stats[:, :, 1 + channels : 1 + 2 * channels])
    torch.mul(both_a, a, out=stats[:, :, 1 + 2 * channels : 1 + 3 * channels])
    torch.mul(both_a, b, out=stats[:, :, 1 + 3 * channels : 1 + 4 * channels])
    torch.mul(both_b, b, out=stats[:, :, 1 + 4 * channels :])
    sums = box_sum(stats.flatten(0, 1), max(1, round(radius / factor))).unflatten(0, (batch, len(unordered)))
    clear_count = sums[:, :, :1]
    count = clear_count.clamp(min=1)
    # window means of a, b, a², ab, b² in one division; the second moments become (co)variances in place
    mean_a, mean_b, var_a, cov, var_b = (sums[:, :, 1:] / count).split(channels, dim=2)
    var_a.sub_(mean_a.square()).clamp_(min=0)
    var_b.sub_(mean_b.square()).clamp_(min=0)
    cov.sub_(mean_a * mean_b)
    # more clear blocks, better fit: more trust (20 px of full resolution count as much as the fit's spread)
    count_trust = clear_count / (clear_count + 20.0 / factor**2)
    predictions, weights = torch.zeros_like(values), torch.zeros_like(masks)
    residuals, squares = (torch.zeros_like(values), torch.zeros_like(values)) if spread else (None, None)
    # each unordered pair both ways: a predicts b (target b, helper a), then b predicts a
    for helpers, targets, mean_x, mean_y, var_x, var_y in (
        (first, second, mean_a, mean_b, var_a, var_b),
        (second, first, mean_b, mean_a, var_b, var_a),
    ):
        gain = (cov + _RIDGE) / (var_x + _RIDGE)
        offset = mean_y - gain * mean_x
        band_residual = (var_y - gain * cov).clamp(min=0)
        confidence = count_trust / (band_residual.mean(dim=2, keepdim=True) + _RESIDUAL_FLOOR)
        if factor > 1:
            gain, offset, confidence, band_residual = (
                _to_full_resolution(part, factor, height, width) for part in (gain, offset, confidence, band_residual)
            )
        trust = masks[:, helpers] * confidence.clamp(min=0)  # a helper counts only where it is clear itself
        prediction = gain * values[:, helpers] + offset
        predictions.index_add_(1, targets, trust * prediction)
        weights.index_add_(1, targets, trust)
        if residuals is not None and squares is not None:
            residuals.index_add_(1, targets, trust * band_residual)
            squares.index_add_(1, targets, trust * prediction.square())
    helped = weights > 0
    regressed = torch.where(helped, predictions / weights.clamp(min=1e-12), temporal_mean_fill(values, masks))
    filled = (values * masks + regressed * (1 - masks)).to(normalised.dtype)
    if residuals is None or squares is None:
        return filled, None
    total = weights.clamp(min=1e-12)
    variance = residuals / total + (squares / total - regressed.square()).clamp(min=0)
    # no window to fit (inside a large cloud): the temporal mean fill, as uncertain as the date's own spread (1)
    seen = (masks.sum(dim=1, keepdim=True) - masks) > 0
    fallback = torch.where(seen, torch.ones_like(variance), torch.full_like(variance, float("nan")))
    return filled, torch.where(helped, variance, fallback)


def _to_full_resolution(coarse: torch.Tensor, factor: int, height: int, width: int) -> torch.Tensor:
    """Bilinearly upsample a ``(B, P, C, h, w)`` statistics grid by ``factor`` and crop it to ``height × width``."""
    upsampled = F.interpolate(coarse.flatten(0, 1), scale_factor=factor, mode="bilinear", align_corners=False)
    return upsampled[..., :height, :width].unflatten(0, coarse.shape[:2])


def _coarse_grid(values: torch.Tensor, masks: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the clear fraction and the mean of the clear pixels of each ``factor``² block (``factor`` 1: as is)."""
    if factor == 1:
        return masks, values * masks
    batch, dates = values.shape[:2]
    pad = (0, (-values.shape[-1]) % factor, 0, (-values.shape[-2]) % factor)
    clear_fraction = F.avg_pool2d(F.pad(masks.flatten(0, 1), pad), factor)
    block_means = F.avg_pool2d(F.pad((values * masks).flatten(0, 1), pad), factor) / clear_fraction.clamp(min=1e-6)
    return clear_fraction.unflatten(0, (batch, dates)), block_means.unflatten(0, (batch, dates))


class RegressionFill(torch.nn.Module):
    """The classical local regression (:func:`local_regression_fill`) as a model: the CMSN's input and output.

    It is the first guess inside every CMSN, here on its own, with the band statistics of ``network`` (the ridge
    and the residual floor are in those normalised units). The scene self-check and ``method="regression"`` of
    :func:`cmsn_cube.inference.reconstruct` run it on the same tiles as the network.
    """

    def __init__(
        self,
        band_mean: torch.Tensor,
        band_std: torch.Tensor,
        *,
        radius: int = DEFAULT_RADIUS,
        factor: int = 1,
        normalisation: str = "clear-pixels",
    ) -> None:
        super().__init__()
        self.register_buffer("band_mean", band_mean.detach().clone())
        self.register_buffer("band_std", band_std.detach().clone())
        self.radius, self.factor, self.normalisation = radius, factor, normalisation

    @classmethod
    def like(cls, network: torch.nn.Module) -> RegressionFill:
        """Build the regression with ``network``'s fallback band statistics (a CMSN's ``band_mean``/``band_std``)."""
        return cls(network.band_mean, network.band_std)  # type: ignore[arg-type]

    def forward(self, inputs: torch.Tensor, *, spread: bool = False) -> Any:
        """``(B, T, bands + 1, H, W)`` (bands 0 where masked, then the mask) -> ``CMSNOutput`` (``spread`` as CMSN's)."""
        from cmsn_cube.model.cmsn import CMSNOutput

        bands, mask = inputs[:, :, :-1], inputs[:, :, -1:].clamp(0, 1)
        clear = 1 - mask
        mean, std = normalising_statistics(
            bands,
            clear,
            normalisation=self.normalisation,
            band_mean=torch.as_tensor(self.band_mean),
            band_std=torch.as_tensor(self.band_std),
        )
        normalised = (bands - mean) / std * clear
        fill, variance = local_regression_spread(
            normalised, clear, radius=self.radius, factor=self.factor, spread=spread
        )
        filled = fill.float() * std + mean
        output = torch.where(mask > 0.5, filled, bands.to(filled.dtype))
        stated = None if variance is None else variance.float().sqrt() * std
        return CMSNOutput(coarse=filled, refined=filled, output=output, spread=stated)
