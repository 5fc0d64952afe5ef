"""Classical gap-fillers, the yardstick for the network: same cube in, same layout out.

Each baseline takes a cube and returns ``reconstructed(time, band, y, x)`` float32 in which every clear pixel
is the observation, bit for bit, and every gap (cloud mask or no data) is filled from other dates where any
date is clear there; gaps no date can fill stay NaN. They compute the cube (their job is to compute).

- ``nearest``: the clear observation of the nearest date in time (ties: the earlier date);
- ``linear``: linear interpolation in time between the nearest clear dates before and after (only one side
  clear: that side's value);
- ``median``: the per-pixel temporal median of the clear observations;
- ``regression``: local linear regressions of the target date on helper dates, fit per band in a window
  around each pixel on the pixels clear in both dates (the "neighbourhood similar pixel"/regression idea,
  e.g. Zeng et al. 2013 WLR, computed with box filters), the best-fitting of the nearest clear dates averaged
  (:func:`regress`, which also gives the predicted spread of the error).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import xarray as xr
from scipy import ndimage

from cmsn_cube.exceptions import CubeValidationError
from cmsn_cube.qa import ensure_cloud_mask

BaselineName = Literal["nearest", "linear", "median", "regression"]
Filler = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

#: Local regression: window side (px), fewest pixels clear in both dates for a local fit (fewer: the scene's),
#: helper dates considered per pixel (the nearest in time that are clear there) and how many of them, those
#: whose fits explain the window best, are averaged. Chosen on the real stacks of ../shared/data (pasted real
#: cloud shapes, PSNR pooled over the bands): the best 3 of the 6 nearest gained 0.3-1.5 dB over the nearest
#: clear date alone (the previous regression; measured while choosing, with a script not kept) and
#: 0.09-1.86 dB over averaging every helper (``reference`` in ``benchmarks/bench_quality.py``).
REGRESSION_WINDOW = 31
REGRESSION_MIN_PIXELS = 50
REGRESSION_HELPERS = 6
REGRESSION_BEST = 3
#: Added to a helper's residual variance (reflectance²) before weighting by its inverse square: a perfect fit
#: does not take all the weight.
_MISFIT_FLOOR = 1e-6


def gaps_of(cube: xr.Dataset) -> xr.DataArray:
    """Pixels to fill, ``(time, y, x)``: the cloud mask or no data (NaN in any band)."""
    cube = ensure_cloud_mask(cube)
    return (cube["cloud_mask"] | cube["reflectance"].isnull().any("band")).rename("gap")


def days_of(cube: xr.Dataset) -> np.ndarray:
    """Each date's day from the first (what the fillers order helper dates by)."""
    stamps = cube["time"].values.astype("datetime64[s]").astype("int64")
    return (stamps - stamps[0]) / 86400.0


def _by_distance(days: np.ndarray, t: int) -> list[int]:
    """Other dates, nearest in time first (ties: the earlier one)."""
    return sorted((s for s in range(days.size) if s != t), key=lambda s: (abs(days[s] - days[t]), s))


def fill_nearest(values: np.ndarray, gap: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Fill values ``(time, band, y, x)`` from the nearest clear date in time (NaN where none is clear)."""
    out = np.full_like(values, np.nan)
    for t in range(values.shape[0]):
        remaining = gap[t].copy()
        for s in _by_distance(days, t):
            take = remaining & ~gap[s]
            out[t][:, take] = values[s][:, take]
            remaining &= ~take
            if not remaining.any():
                break
    return out


def fill_linear(values: np.ndarray, gap: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Fill by linear interpolation in time between the nearest clear dates before and after."""
    n_dates = values.shape[0]
    out = np.full_like(values, np.nan)
    for t in range(n_dates):
        sides = []
        for order in (range(t - 1, -1, -1), range(t + 1, n_dates)):
            value = np.full(values.shape[1:], np.nan, dtype=np.float64)
            day = np.full(values.shape[2:], np.nan)
            for s in order:
                take = np.isnan(day) & ~gap[s]
                value[:, take], day[take] = values[s][:, take], days[s]
            sides.append((value, day))
        (before, day_before), (after, day_after) = sides
        with np.errstate(invalid="ignore", divide="ignore"):
            weight = (days[t] - day_before) / (day_after - day_before)
        both = np.isfinite(weight)
        filled = np.where(
            both[None], before + weight[None] * (after - before), np.where(np.isnan(day_before)[None], after, before)
        )
        out[t] = filled.astype(values.dtype)
    return out


def fill_median(values: np.ndarray, gap: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Fill with the per-pixel temporal median of the clear observations."""
    clear = np.where(gap[:, None], np.nan, values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN: that is the answer
        median = np.nanmedian(clear, axis=0).astype(values.dtype)
    return np.broadcast_to(median, values.shape).copy()


class RegressionFill(NamedTuple):
    """What :func:`regress` gives: the fill and the predicted standard deviation of its error, per band."""

    #: ``(time, band, y, x)``: the fill at gaps it could fill, NaN elsewhere
    values: np.ndarray
    #: ``(time, band, y, x)``: the spread of the error of ``values`` expected from the fits (reflectance), before
    #: any calibration on the scene; NaN where ``values`` is
    sigma: np.ndarray


def _box_sums(arrays: np.ndarray, size: int) -> np.ndarray:
    """Sum over a ``size``² window around each pixel of the last two axes (box filters: O(1) per pixel)."""
    axes = (1,) * (arrays.ndim - 2) + (size, size)
    return ndimage.uniform_filter(arrays, size=axes, mode="constant") * (size * size)


def _helper_fit(
    values: np.ndarray, gap: np.ndarray, t: int, s: int, wanted: np.ndarray, *, window: int, min_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Predict date ``t`` from helper date ``s``: a gain and an offset per band fitted on the pixels clear in both.

    The fit is local (the ``window`` around each pixel) where the window holds ``min_pixels`` such pixels and
    the helper varies there, else the scene's (the image handed in; fitted only when a ``wanted`` pixel needs
    it). Returns the prediction and the residual variance of its fit, each ``(band, y, x)`` float32.
    """
    both = ~gap[t] & ~gap[s]
    if not both.any():
        x_centre = y_centre = np.zeros(values.shape[1], dtype=np.float32)
    else:
        x_centre, y_centre = values[s][:, both].mean(axis=1), values[t][:, both].mean(axis=1)
    # centred on the scene's means, float32 sums lose nothing that matters to a window's (co)variance
    x = np.where(both, values[s] - x_centre[:, None, None], 0).astype(np.float32)
    y = np.where(both, values[t] - y_centre[:, None, None], 0).astype(np.float32)
    count = np.round(_box_sums(both.astype(np.float32), window))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_x, mean_y, mean_xx, mean_xy, mean_yy = _box_sums(np.stack([x, y, x * x, x * y, y * y]), window) / count
        var_x, cov = mean_xx - mean_x * mean_x, mean_xy - mean_x * mean_y
        gain = cov / var_x
        residual = np.maximum(mean_yy - mean_y * mean_y - gain * cov, 0)
        offset = mean_y - gain * mean_x + y_centre[:, None, None] - gain * x_centre[:, None, None]
    local = (count >= min_pixels) & (var_x > 1e-10) & np.isfinite(gain)
    if (wanted & ~local).any():
        scene_gain, scene_offset, scene_residual = _scene_fit(values[s][:, both], values[t][:, both])
        gain = np.where(local, gain, scene_gain[:, None, None].astype(np.float32))
        offset = np.where(local, offset, scene_offset[:, None, None].astype(np.float32))
        residual = np.where(local, residual, scene_residual[:, None, None].astype(np.float32))
    return gain * values[s] + offset, residual


def _scene_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gain, offset and residual variance per band of ``y ~ x`` over the clear pixels ``(band, n)`` of the image.

    Too few pixels, or a helper without contrast: gain 1, no offset, and a residual so large that any other
    helper outweighs this one.
    """
    bands = x.shape[0]
    if x.shape[1] < 2:
        return np.ones(bands), np.zeros(bands), np.ones(bands)
    x, y = x.astype(np.float64), y.astype(np.float64)
    mean_x, mean_y = x.mean(axis=1), y.mean(axis=1)
    var_x = x.var(axis=1)
    flat = var_x <= 1e-10
    gain = np.where(flat, 1.0, ((x - mean_x[:, None]) * (y - mean_y[:, None])).mean(axis=1) / np.where(flat, 1, var_x))
    offset = np.where(flat, 0.0, mean_y - gain * mean_x)
    residual = ((y - gain[:, None] * x - offset[:, None]) ** 2).mean(axis=1)
    return gain, offset, np.where(flat, 1.0, residual)


def regress(
    values: np.ndarray,
    gap: np.ndarray,
    days: np.ndarray,
    *,
    window: int = REGRESSION_WINDOW,
    min_pixels: int = REGRESSION_MIN_PIXELS,
    helpers: int = REGRESSION_HELPERS,
    best: int = REGRESSION_BEST,
    targets: Sequence[int] | None = None,
) -> RegressionFill:
    """Fill each date's gaps by local regression on the helper dates that fit it best, with the error's spread.

    For a gap pixel of date ``t``, the ``helpers`` dates nearest in time that are clear there each predict it
    through a per-band gain and offset fitted in the ``window`` around it (:func:`_helper_fit`: on the pixels
    clear in both dates; fewer than ``min_pixels`` of them, the scene's fit). The ``best`` of them whose fits
    leave the smallest residual variance (mean over the bands) are averaged, weighted by 1 / that variance²;
    the fill is clipped to [0, 1]. Its ``sigma`` is the square root of the weighted mean residual variance plus
    the weighted variance of the helpers' predictions: what the fits leave unexplained and how much the
    helpers disagree.

    With ``targets``, only those dates are filled; the others stay NaN, as do gaps no date observes.
    """
    values = np.asarray(values)
    out = RegressionFill(np.full_like(values, np.nan), np.full_like(values, np.nan))
    for t in range(values.shape[0]) if targets is None else targets:
        if gap[t].any():
            _regress_date(values, gap, days, t, out, window=window, min_pixels=min_pixels, helpers=helpers, best=best)
    return out


def _regress_date(
    values: np.ndarray,
    gap: np.ndarray,
    days: np.ndarray,
    t: int,
    out: RegressionFill,
    *,
    window: int,
    min_pixels: int,
    helpers: int,
    best: int,
) -> None:
    """Fill date ``t`` of ``out`` in place (see :func:`regress`)."""
    candidates = np.zeros(gap.shape[1:], dtype=np.int64)
    predictions, residuals, usable = [], [], []
    for s in _by_distance(days, t):
        takes = gap[t] & ~gap[s] & (candidates < helpers)
        if not takes.any():
            continue
        prediction, residual = _helper_fit(values, gap, t, s, takes, window=window, min_pixels=min_pixels)
        predictions.append(prediction)
        residuals.append(residual)
        usable.append(takes)
        candidates += takes
    if not predictions:
        return
    residual = np.stack(residuals)  # (helpers, band, y, x)
    misfit = np.where(np.stack(usable), residual.mean(axis=1), np.inf)
    rank = np.argsort(np.argsort(misfit, axis=0, kind="stable"), axis=0, kind="stable")
    weight = np.where(rank < best, 1.0 / (np.where(np.isfinite(misfit), misfit, 0) + _MISFIT_FLOOR) ** 2, 0)
    weight = np.where(np.isfinite(misfit), weight, 0)[:, None]  # (helpers, 1, y, x)
    total = weight.sum(axis=0)
    filled = candidates > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        prediction = np.stack(predictions)
        mean = (weight * prediction).sum(axis=0) / total
        variance = (weight * (residual + (prediction - mean) ** 2)).sum(axis=0) / total
    out.values[t][:, filled] = np.clip(mean[:, filled], 0, 1)
    out.sigma[t][:, filled] = np.sqrt(variance[:, filled])


def fill_regression(values: np.ndarray, gap: np.ndarray, days: np.ndarray, **options: Any) -> np.ndarray:
    """Return the fill of :func:`regress` alone (a :data:`Filler`; ``options`` as there)."""
    return regress(values, gap, days, **options).values


_FILLERS: dict[str, Filler] = {
    "nearest": fill_nearest,
    "linear": fill_linear,
    "median": fill_median,
    "regression": fill_regression,
}


def _reconstruct(cube: xr.Dataset, method: BaselineName, **options: int) -> xr.DataArray:
    gap_da = gaps_of(cube)
    values = np.asarray(cube["reflectance"].values, dtype=np.float32)
    gap = np.asarray(gap_da.values, dtype=bool)
    filler = _FILLERS[method]
    filled = filler(values, gap, days_of(cube), **options) if options else filler(values, gap, days_of(cube))
    # clear pixels are copied, never recomputed: bit-identical to the observation
    result = np.where(gap[:, None], filled, values).astype(np.float32)
    out = xr.DataArray(result, dims=cube["reflectance"].dims, coords=cube["reflectance"].coords, name="reconstructed")
    return out.assign_attrs(method=method, long_name=f"reflectance with gaps filled by {method}", units="1")


def nearest(cube: xr.Dataset) -> xr.DataArray:
    """Gaps filled from the nearest clear date in time. Returns ``reconstructed(time, band, y, x)``."""
    return _reconstruct(cube, "nearest")


def linear(cube: xr.Dataset) -> xr.DataArray:
    """Gaps filled by linear interpolation in time between the nearest clear dates before and after."""
    return _reconstruct(cube, "linear")


def median(cube: xr.Dataset) -> xr.DataArray:
    """Gaps filled with the per-pixel temporal median of the clear observations."""
    return _reconstruct(cube, "median")


def regression(
    cube: xr.Dataset, *, window: int = REGRESSION_WINDOW, min_pixels: int = REGRESSION_MIN_PIXELS
) -> xr.DataArray:
    """Gaps filled by local per-band regression on the best-fitting nearby clear dates (``window`` px windows).

    Examples
    --------
    >>> from cmsn_cube.testing import tiny_scene
    >>> cube = tiny_scene(size=48)
    >>> filled = regression(cube)
    >>> bool(filled.where(~cube.cloud_mask).equals(cube.reflectance.where(~cube.cloud_mask)))
    True
    """
    if window < 3 or window % 2 == 0:
        raise CubeValidationError(f"window must be an odd number of pixels >= 3, got {window}")
    return _reconstruct(cube, "regression", window=window, min_pixels=min_pixels)


#: Every baseline by name: ``cube -> reconstructed(time, band, y, x)``.
BASELINES: dict[str, Callable[[xr.Dataset], xr.DataArray]] = {
    "nearest": nearest,
    "linear": linear,
    "median": median,
    "regression": regression,
}


def fillable(cube: xr.Dataset) -> xr.DataArray:
    """Gap pixels that some other date observes clear: the most any temporal gap-filler can fill."""
    gap = gaps_of(cube)
    n_clear = (~gap).sum("time")
    return (gap & (n_clear > 0)).rename("fillable")
