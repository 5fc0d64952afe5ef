"""How far to trust each filled pixel: calibrating the predicted spread of the error, and judging it.

Every filler of :func:`cmsn_cube.inference.reconstruct` comes with a raw spread per pixel and band, the
``sigma`` of :func:`cmsn_cube.baselines.regress` (what the local fits of the helper dates leave unexplained,
plus how much the helpers disagree). A raw spread ranks pixels well but its scale depends on the scene, the
sensor and the filler, so it is calibrated on the scene itself: the self-check hides clear pixels under real
cloud shapes, fills them with each method, and :func:`calibration_scale` finds the factor that makes the
hidden pixels' errors match the spread. The published ``uncertainty`` is that factor times the raw spread: the
predicted standard deviation of the error, in reflectance.

The factor is fitted to two points of a normal error at once, the shares within 1 and 2 sigma (68.3 % and
95.4 %): it is the factor whose larger miss of the two is smallest. Real errors have heavier tails than a normal
one (on the real stacks of ../shared/data about 75 % and 94 %, as a Laplace error), so no factor hits both; this
one keeps both within a few points, where matching the 1 sigma share alone left 2 sigma 5 points short.
"""

from __future__ import annotations

import numpy as np

#: Shares of a normal error within 1 and 2 standard deviations.
WITHIN_1_SIGMA, WITHIN_2_SIGMA = 0.6827, 0.9545
#: Factor applied to the raw spread when the scene gives none (a forced ``method``, too few hidden pixels):
#: the median of the factors the self-check found on the real stacks of ../shared/data
#: (``benchmarks/bench_quality.py`` prints them).
DEFAULT_SCALE = 0.8


def calibration_scale(errors: np.ndarray, sigma: np.ndarray) -> float:
    """Return the factor ``k`` such that ``k * sigma`` is the standard deviation of ``errors`` (NaN if none).

    ``errors`` and ``sigma`` are arrays of the same shape (any NaN pair is left out). ``k`` minimises the larger
    of the misses ``|share within k sigma - 68.3 %|`` and ``|share within 2 k sigma - 95.4 %|``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sigma = rng.uniform(0.01, 0.05, 100_000)
    >>> round(calibration_scale(rng.normal(0, 2 * sigma), sigma), 1)
    2.0
    """
    ratio = np.sort(_ratios(errors, sigma))
    if ratio.size == 0:
        return float("nan")
    one, two = np.quantile(ratio, [WITHIN_1_SIGMA, WITHIN_2_SIGMA])
    candidates = np.geomspace(min(one, two / 2), max(one, two / 2), 64) if one > 0 else np.array([two / 2])
    within_1 = np.searchsorted(ratio, candidates, side="right") / ratio.size
    within_2 = np.searchsorted(ratio, 2 * candidates, side="right") / ratio.size
    miss = np.maximum(np.abs(within_1 - WITHIN_1_SIGMA), np.abs(within_2 - WITHIN_2_SIGMA))
    return float(candidates[int(np.argmin(miss))])


def coverage(errors: np.ndarray, sigma: np.ndarray) -> tuple[float, float]:
    """Return the shares of ``|errors|`` within 1 and 2 times ``sigma`` (NaN pairs left out)."""
    ratio = _ratios(errors, sigma)
    if ratio.size == 0:
        return float("nan"), float("nan")
    return float(np.mean(ratio <= 1)), float(np.mean(ratio <= 2))


def calibration_error(errors: np.ndarray, sigma: np.ndarray, *, bins: int = 10) -> float:
    """Return the uncertainty calibration error (UCE) of ``sigma``, in the units of ``errors``.

    As UnCRtainTS defines it: the pixels are binned by predicted ``sigma`` (equal counts), and the error is the
    pixel-weighted mean over the bins of |RMSE of the bin's errors - root mean predicted variance of the bin|.
    """
    keep = np.isfinite(errors) & np.isfinite(sigma)
    errors, sigma = np.asarray(errors)[keep], np.asarray(sigma)[keep]
    if errors.size == 0:
        return float("nan")
    order = np.argsort(sigma, kind="stable")
    total = 0.0
    for part in np.array_split(order, min(bins, errors.size)):
        rmse = np.sqrt(np.mean(errors[part] ** 2))
        predicted = np.sqrt(np.mean(sigma[part] ** 2))
        total += part.size * abs(rmse - predicted)
    return total / errors.size


def rank_correlation(errors: np.ndarray, sigma: np.ndarray) -> float:
    """Return Spearman's rank correlation between ``sigma`` and ``|errors|`` (does a larger sigma mean a larger error?)."""
    from scipy.stats import spearmanr

    keep = np.isfinite(errors) & np.isfinite(sigma)
    if keep.sum() < 3:
        return float("nan")
    return float(spearmanr(np.asarray(sigma)[keep], np.abs(np.asarray(errors)[keep])).statistic)


def _ratios(errors: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    errors, sigma = np.asarray(errors, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    keep = np.isfinite(errors) & np.isfinite(sigma) & (sigma > 0)
    return np.abs(errors[keep]) / sigma[keep]
