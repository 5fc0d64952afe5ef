"""Classical gap-fillers, the yardstick for the network: same cube in, same layout out.

Each baseline takes a cube and returns ``reconstructed(time, band, y, x)`` float32 in which every clear pixel
is the observation, bit for bit, and every gap (cloud mask or no data) is filled from other dates where any
date is clear there; gaps no date can fill stay NaN. They compute the cube (their job is to compute).

- ``nearest``: the clear observation of the nearest date in time (ties: the earlier date);
- ``linear``: linear interpolation in time between the nearest clear dates before and after (only one side
  clear: that side's value);
- ``median``: the per-pixel temporal median of the clear observations;
- ``regression``: a local linear regression of the target date on a helper date (the nearest date clear at
  the pixel), fit per band in a window around each pixel on the pixels clear in both dates (the
  "neighbourhood similar pixel"/regression idea, e.g. Zeng et al. 2013 WLR), computed with box filters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import xarray as xr
from scipy import ndimage

from cmsn_cube.exceptions import CubeValidationError
from cmsn_cube.qa import ensure_cloud_mask

BaselineName = Literal["nearest", "linear", "median", "regression"]
Filler = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

#: Local regression: window side (px), fewest common clear pixels for a local fit, and the slope bounds
#: (a helper date brighter or darker by more than a factor 3 is not a usable predictor).
REGRESSION_WINDOW = 31
REGRESSION_MIN_PIXELS = 20
_SLOPE_BOUNDS = (0.0, 3.0)


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


def _box_means(weight: np.ndarray, arrays: list[np.ndarray], size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Window count and weighted means of ``arrays`` (box filters of the sums: O(1) per pixel)."""
    count = ndimage.uniform_filter(weight, size=size, mode="constant") * size * size
    with np.errstate(invalid="ignore", divide="ignore"):
        means = [ndimage.uniform_filter(weight * a, size=size, mode="constant") * size * size / count for a in arrays]
    return np.round(count), means


def fill_regression(
    values: np.ndarray,
    gap: np.ndarray,
    days: np.ndarray,
    *,
    window: int = REGRESSION_WINDOW,
    min_pixels: int = REGRESSION_MIN_PIXELS,
    targets: Sequence[int] | None = None,
) -> np.ndarray:
    """Fill each date from helper dates (nearest first) through a local per-band linear regression.

    With ``targets``, only those dates are filled; the others stay NaN.
    Where fewer than ``min_pixels`` pixels of the window are clear in both dates, the fit of the whole scene
    is used; where the scene has too few either, the helper's value itself.
    """
    out = np.full_like(values, np.nan)
    for t in range(values.shape[0]) if targets is None else targets:
        remaining = gap[t].copy()
        for s in _by_distance(days, t):
            target = remaining & ~gap[s]
            if not target.any():
                continue
            both = ~gap[t] & ~gap[s]
            weight = both.astype(np.float64)
            for b in range(values.shape[1]):
                x = np.where(both, values[s, b], 0).astype(np.float64)
                y = np.where(both, values[t, b], 0).astype(np.float64)
                count, (mx, my, mxx, mxy) = _box_means(weight, [x, y, x * x, x * y], window)
                with np.errstate(invalid="ignore", divide="ignore"):
                    variance = mxx - mx * mx
                    slope = (mxy - mx * my) / variance
                    local = (count >= min_pixels) & np.isfinite(slope) & (variance > 1e-8)
                g_slope, g_mx, g_my = _global_fit(values[s, b][both], values[t, b][both], min_pixels)
                slope = np.clip(np.where(local, slope, g_slope), *_SLOPE_BOUNDS)
                centre_x, centre_y = np.where(local, mx, g_mx), np.where(local, my, g_my)
                helper = values[s, b][target].astype(np.float64)
                predicted = centre_y[target] + slope[target] * (helper - centre_x[target])
                out[t, b][target] = np.clip(predicted, 0, 1).astype(values.dtype)
            remaining &= ~target
            if not remaining.any():
                break
    return out


def _global_fit(x: np.ndarray, y: np.ndarray, min_pixels: int) -> tuple[float, float, float]:
    """Slope and centre of the scene-wide fit; slope 1 through the origin when there are too few pixels."""
    if x.size < min_pixels or np.var(x) < 1e-8:
        return 1.0, 0.0, 0.0
    mx, my = float(x.mean()), float(y.mean())
    return float(np.mean((x - mx) * (y - my)) / np.var(x)), mx, my


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
    """Gaps filled by local per-band regression on the nearest clear helper date (``window`` px windows).

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
