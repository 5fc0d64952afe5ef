"""The scene self-check: how well each method fills this scene, measured on the scene itself.

A user has no truth under the clouds of their own scene, but the scene has clear pixels. The check takes a
bounded sample of windows spread over the scene; each sample (:func:`check_sample`) hides clear pixels of one
date under a real cloud shape (the cube's own cloud masks, from other windows and dates, turned, flipped and
shifted), fills them with each method, and keeps the fill beside the pixels it hid. :func:`combine_samples`
scores them: PSNR (dB, band mean), MAE (reflectance) and SAM (°) per date and method, and :func:`choose` picks
the filler of each date, which is what :func:`cmsn_cube.inference.reconstruct` uses with ``method="auto"`` (it
runs the samples as parallel tasks).

Pure numpy here; the fills come in as a callable, so this module knows nothing of torch or Dask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: The methods the check compares: the network, the classical local regression (the best-fitting of the
#: nearest clear dates of the whole series, the ``regression`` baseline) and the local regression of the
#: triplet that weighs both helper dates by how well their fits explain the window (the network's own prior), and
#: ``blend``, the mean of the network's and the regression's fills (their errors partly cancel: on every unseen
#: real stack of ``benchmarks/bench_quality.py`` it gained 0.09-0.71 dB over the regression, and on the
#: generator's scenes, where the network leads, it was within 0.06 dB of the network).
METHODS: tuple[str, ...] = ("cmsn", "regression", "weighted-regression", "blend")
#: The methods that run the network.
NETWORK: tuple[str, ...] = ("cmsn", "blend")
#: The classical ones, in the order ties are broken.
CLASSICAL: tuple[str, ...] = ("regression", "weighted-regression")
#: What it measures per date and method; ``pixels`` is the number of hidden pixels scored (what an estimate rests
#: on); ``psnr_pooled_db`` is the PSNR of the squared error pooled over the bands (AllClear's and UnCRtainTS'
#: convention), beside ``psnr_db``, the mean of the bands' PSNRs; ``uncertainty_scale`` is the factor that
#: calibrates the method's raw spread on the hidden pixels (:func:`cmsn_cube.uncertainty.calibration_scale`:
#: the date's own where it has :data:`MIN_PIXELS`, else the method's over the scene, else the default).
METRICS: tuple[str, ...] = ("psnr_db", "mae", "sam_deg", "pixels", "psnr_pooled_db", "uncertainty_scale")
#: Fewest hidden pixels per date for a score (fewer: NaN, and the date keeps the classical method).
MIN_PIXELS = 400
#: Side of the sample windows (px) and how many; each sample hides one date of one window and runs as its own
#: task. 160 px: the six samples of a 2048² scene cost about 1 s (9 % of the network path); 256 px cost 2.4 s for
#: the same choices. Their per-date estimate is 2.1-2.7 dB from the measured PSNR on unseen generator seeds and
#: 1.0-4.3 dB on the unseen real stacks (``benchmarks/bench_quality.py``): a guide to rank methods, not a measure.
WINDOW = 160
N_WINDOWS = 6

#: ``fill(method, channels(every date, bands + mask, y, x), date)`` -> the date's fill and its raw spread,
#: each ``(bands, y, x)``.
Fill = Callable[[str, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def sample_windows(
    shape: tuple[int, int], *, size: int = WINDOW, count: int = N_WINDOWS
) -> list[tuple[int, int, int, int]]:
    """Return ``count`` windows ``(row, col, height, width)`` of ``size`` px spread evenly over a scene of ``shape``.

    Fewer, of the scene's size, when the scene is small; the check then draws several times per window.
    """
    height, width = (min(size, n) for n in shape)
    per_axis = max(1, int(np.ceil(np.sqrt(count))))
    rows = np.unique(np.linspace(0, shape[0] - height, per_axis).round().astype(int))
    cols = np.unique(np.linspace(0, shape[1] - width, per_axis).round().astype(int))
    corners = [(int(r), int(c)) for r in rows for c in cols]
    if len(corners) > count:  # keep an even spread: every k-th corner
        corners = [corners[int(i)] for i in np.linspace(0, len(corners) - 1, count).round()]
    return [(r, c, height, width) for r, c in corners]


def _shape_pool(masks: Sequence[np.ndarray]) -> list[tuple[int, int, np.ndarray]]:
    """Return every date's cloud mask of every window with some cloud and some clear, with its window and date.

    These are the real shapes to paste.
    """
    return [(w, t, m[t]) for w, m in enumerate(masks) for t in range(m.shape[0]) if 0.005 < m[t].mean() < 0.9]


def _pasted(
    gap: np.ndarray,
    date: int,
    pool: Sequence[tuple[int, int, np.ndarray]],
    level: float,
    rng: np.random.Generator,
    *,
    window: int,
) -> np.ndarray:
    """Return a shape to hide on ``date`` of a window, on the date's clear pixels only.

    A pool shape near the date's own cloud fraction ``level`` (the date's own mask of this window only when no
    other shape fits), turned, flipped and shifted.
    """
    fitting = [(w, t, shape) for w, t, shape in pool if shape.shape == gap.shape[1:]]
    # the date's own shape here only when nothing else fits (one window, one cloudy date): turned and shifted
    candidates = [shape for w, t, shape in fitting if (w, t) != (window, date)] or [shape for _, _, shape in fitting]
    if not candidates:
        return np.zeros_like(gap[date])
    fractions = np.array([shape.mean() for shape in candidates])
    nearest = np.argsort(np.abs(fractions - level))[: max(1, len(candidates) // 3)]
    shape = candidates[int(rng.choice(nearest))]
    shape = np.rot90(shape, int(rng.integers(4))) if shape.shape[0] == shape.shape[1] else shape
    shape = shape[:, ::-1] if rng.random() < 0.5 else shape
    shape = np.roll(shape, (int(rng.integers(shape.shape[0])), int(rng.integers(shape.shape[1]))), axis=(0, 1))
    return shape & ~gap[date]


#: What one sample gives: the hidden date, each method's fill of its hidden pixels and the raw spread of its
#: error (a pair of ``(4, n)`` arrays), and their truth ``(4, n)``.
Sample = tuple[int, dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]


def sample_window(sample: int, n_windows: int) -> int:
    """Return the window of the ``sample``-th sample.

    Each pass over the windows shifts by one, so a date meets every window.
    """
    return (sample + sample // n_windows) % n_windows


def dates_to_check(gap_pixels: np.ndarray) -> tuple[int, ...]:
    """Return the dates with pixels to fill (``gap_pixels``: per date): the only ones a check samples."""
    return tuple(int(t) for t in np.flatnonzero(np.asarray(gap_pixels) > 0))


def planned_sample(sample: int, n_windows: int, dates: Sequence[int]) -> tuple[int, int] | None:
    """Return the ``(date, window)`` of the ``sample``-th sample, the ``dates`` in turn; None past the last sample.

    A check of ``n`` dates with gaps takes :func:`samples_needed` ``(n)`` samples; none when no date has one.
    """
    if not dates or sample >= samples_needed(len(dates)):
        return None
    return dates[sample % len(dates)], sample_window(sample, n_windows)


def check_sample(
    reflectance: np.ndarray,
    cloud_mask: np.ndarray,
    masks: Sequence[np.ndarray],
    *,
    date: int,
    window: int,
    triplets: Sequence[tuple[int, int, int]],
    fill: Fill,
    rng: np.random.Generator,
    model_channels: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> Sample | None:
    """Hide clear pixels of ``date`` in one window under a real shape and fill them with every method.

    ``masks`` are the cloud masks ``(T, h, w)`` of all sample windows (the shapes to paste, and each date's
    cloud fraction); ``window`` is this window's position among them. None when nothing could be hidden.
    """
    gap = model_channels(reflectance, cloud_mask)[1]
    levels = np.mean([mask.mean(axis=(1, 2)) for mask in masks], axis=0)  # each date's cloud fraction, sampled
    triplet = triplets[date]
    # scored where another date of the triplet is clear: the pixels no date observes stay NaN in the result
    seen_elsewhere = (~gap[[t for t in triplet if t != date]]).any(axis=0)
    hidden = np.zeros_like(gap)
    hidden[date] = _pasted(gap, date, _shape_pool(masks), float(levels[date]), rng, window=window) & seen_elsewhere
    if not hidden[date].any():
        return None
    channels, _ = model_channels(reflectance, cloud_mask | hidden)
    filled = {}
    for method in METHODS:
        values, sigma = fill(method, channels, date)
        filled[method] = (values[:, hidden[date]], sigma[:, hidden[date]])
    return date, filled, reflectance[date][:, hidden[date]]


def combine_samples(samples: Sequence[Sample | None], n_dates: int) -> np.ndarray:
    """Scores ``(time, method, metric)`` (:data:`METHODS`, :data:`METRICS`) pooled over the samples."""
    predicted: dict[tuple[int, str], list[np.ndarray]] = {}
    spread: dict[tuple[int, str], list[np.ndarray]] = {}
    truth: dict[int, list[np.ndarray]] = {}
    for sample in samples:
        if sample is None:
            continue
        date, filled, reference = sample
        for method, (values, sigma) in filled.items():
            predicted.setdefault((date, method), []).append(values)
            spread.setdefault((date, method), []).append(sigma)
        truth.setdefault(date, []).append(reference)
    scores = _scores(predicted, truth, n_dates)
    scores[..., METRICS.index("uncertainty_scale")] = _scales(predicted, spread, truth, n_dates)
    return scores


def _scores(
    predicted: dict[tuple[int, str], list[np.ndarray]], truth: dict[int, list[np.ndarray]], n_dates: int
) -> np.ndarray:
    from cmsn_cube.metrics import mae, psnr, sam

    scores = np.full((n_dates, len(METHODS), len(METRICS)), np.nan)
    for date in range(n_dates):
        reference = np.concatenate(truth.get(date, [np.empty((4, 0))]), axis=1)
        scores[date, :, METRICS.index("pixels")] = reference.shape[1]
        if reference.shape[1] < MIN_PIXELS:
            continue
        for m, method in enumerate(METHODS):
            guess = np.concatenate(predicted[date, method], axis=1)
            scores[date, m, :3] = (
                np.mean([psnr(guess[b], reference[b]) for b in range(reference.shape[0])]),
                mae(guess, reference),
                sam(guess, reference, axis=0),
            )
            scores[date, m, METRICS.index("psnr_pooled_db")] = psnr(guess, reference)
    return scores


def _scales(
    predicted: dict[tuple[int, str], list[np.ndarray]],
    spread: dict[tuple[int, str], list[np.ndarray]],
    truth: dict[int, list[np.ndarray]],
    n_dates: int,
) -> np.ndarray:
    """Return the calibration factors ``(time, method)`` of the raw spread.

    From the date's own hidden pixels where it has :data:`MIN_PIXELS`, else those of every date for the
    method, else :data:`cmsn_cube.uncertainty.DEFAULT_SCALE`.
    """
    from cmsn_cube.uncertainty import DEFAULT_SCALE, calibration_scale

    scales = np.full((n_dates, len(METHODS)), DEFAULT_SCALE)
    for m, method in enumerate(METHODS):
        dates = [d for d in truth if (d, method) in predicted]
        errors = {d: np.concatenate(predicted[d, method], axis=1) - np.concatenate(truth[d], axis=1) for d in dates}
        sigmas = {d: np.concatenate(spread[d, method], axis=1) for d in dates}
        if sum(e.shape[1] for e in errors.values()) >= MIN_PIXELS:
            pooled = calibration_scale(
                np.concatenate(list(errors.values()), axis=1), np.concatenate(list(sigmas.values()), axis=1)
            )
            scales[:, m] = pooled if np.isfinite(pooled) else DEFAULT_SCALE
        for d in dates:
            if errors[d].shape[1] >= MIN_PIXELS and np.isfinite(own := calibration_scale(errors[d], sigmas[d])):
                scales[d, m] = own
    return scales


def uncertainty_scales(quality: np.ndarray | None, n_dates: int) -> list[dict[str, float]]:
    """Return each date's calibration factor per method from the self-check's scores (``None``: the default).

    Scores written before the factor was measured give the default too.
    """
    from cmsn_cube.uncertainty import DEFAULT_SCALE

    if quality is None or quality.shape[-1] <= METRICS.index("uncertainty_scale"):
        return [dict.fromkeys(METHODS, DEFAULT_SCALE) for _ in range(n_dates)]
    factors = np.nan_to_num(quality[..., METRICS.index("uncertainty_scale")], nan=DEFAULT_SCALE)
    return [{method: float(factors[d, m]) for m, method in enumerate(METHODS)} for d in range(n_dates)]


def samples_needed(n_dates: int) -> int:
    """Return the number of samples of a check: :data:`N_WINDOWS`, and at least two per date.

    Two per date matter for a long series, or a small scene whose one window is drawn again with other shapes.
    """
    return max(N_WINDOWS, 2 * n_dates)


#: A date keeps its own best filler only when it beats the scene's best by this much (dB); below it, a date's
#: score is mostly sampling noise (a few hundred hidden pixels) and the scene's pooled choice is safer (on the
#: CBERS stack a 0.5 dB margin lost 0.11 dB to the best classical filler, 1 dB lost nothing).
DATE_MARGIN_DB = 1.0


def choose(scores: np.ndarray) -> tuple[str, ...]:
    """Choose each date's filler: the one with the best measured PSNR, when it beats the scene's best by a margin.

    The margin is :data:`DATE_MARGIN_DB` over the scene's best (pooled over dates); below it, the scene's best.
    The network is the scene's best only when it also beats the best classical filler on most checked dates:
    on the unseen New York Landsat stack one date where it won by 3.6 dB made it the scene's pick while it lost
    on the other dates.
    Ties go to a classical filler (the ``regression`` baseline first), and so do dates too cloudy to check.
    """
    psnr, pixels = scores[..., METRICS.index("psnr_db")], scores[..., METRICS.index("pixels")]
    weights = np.where(np.isfinite(psnr), pixels, 0)
    pooled = np.array(
        [
            np.average(np.nan_to_num(psnr[:, m]), weights=weights[:, m]) if weights[:, m].sum() else np.nan
            for m in range(len(METHODS))
        ]
    )
    scene = _best(pooled)
    if scene in NETWORK:  # a large win on one date must not carry the network over the dates where it loses
        scene = _scene_network_method(psnr, pooled)
    chosen = []
    for row in psnr:
        if not np.isfinite(row).any():  # too cloudy to check: nothing says the scene's winner holds here
            chosen.append(CLASSICAL[0])
            continue
        best = _best(row)
        own = np.nan_to_num(row[METHODS.index(best)], nan=-np.inf)
        chosen.append(best if own > np.nan_to_num(row[METHODS.index(scene)], nan=-np.inf) + DATE_MARGIN_DB else scene)
    return tuple(chosen)


def _best(psnr: np.ndarray) -> str:
    """Return the method of highest PSNR; one that runs the network only when strictly above every classical one."""
    classical = _best_classical(psnr)
    scores = {m: np.nan_to_num(psnr[METHODS.index(m)], nan=-np.inf) for m in METHODS}
    network = max(NETWORK, key=lambda m: (scores[m], -NETWORK.index(m)))
    return network if scores[network] > scores[classical] else classical


def _scene_network_method(psnr: np.ndarray, pooled: np.ndarray) -> str:
    """Return the best pooled method that runs the network and beats the best classical one on most checked dates.

    The best classical method when none does.
    """
    classical = _best_classical(pooled)
    other = psnr[:, METHODS.index(classical)]
    for method in sorted(NETWORK, key=lambda m: -np.nan_to_num(pooled[METHODS.index(m)], nan=-np.inf)):
        own = psnr[:, METHODS.index(method)]
        checked = np.isfinite(own) & np.isfinite(other)
        beats = pooled[METHODS.index(method)] > pooled[METHODS.index(classical)]
        if beats and 2 * int((own > other)[checked].sum()) > int(checked.sum()):
            return method
    return classical


def _best_classical(psnr: np.ndarray) -> str:
    """Return the classical method of highest PSNR (ties: the first of :data:`CLASSICAL`)."""
    return max(CLASSICAL, key=lambda m: (np.nan_to_num(psnr[METHODS.index(m)], nan=-np.inf), -CLASSICAL.index(m)))


def quality_table(result: Any) -> Any:
    """Return a reconstruction's self-check as a ``pandas.DataFrame``: one row per date and method.

    The columns are ``psnr_db``, ``mae``, ``sam_deg``, ``pixels`` (hidden pixels scored), ``chosen`` (the
    method that filled the date) and ``gap_pixels`` (the date's pixels to fill; -1 in stores written before it). Computes the small ``quality``/``method_used`` variables (and so the check, if
    not yet run).

    Raises
    ------
    CubeValidationError
        ``result`` has no ``quality`` variable (not a reconstruction, or one with a forced method).
    """
    import dask
    import pandas as pd

    from cmsn_cube.exceptions import CubeValidationError

    if "quality" not in result:
        raise CubeValidationError(
            "no self-check in this dataset: it is not a reconstruction, or its method was forced (method='auto' runs it)"
        )
    gaps = result["gap_pixels"].data if "gap_pixels" in result else np.full(result.sizes["time"], -1)
    scores, used, gaps = (np.asarray(v) for v in dask.compute(result["quality"].data, result["method_used"].data, gaps))
    metrics = [str(m) for m in result["metric"].values] if "metric" in result.coords else list(METRICS)
    methods = [str(m) for m in result["method"].values] if "method" in result.coords else list(METHODS)
    rows = []
    for index, time in enumerate(np.asarray(result["time"].values)):
        for m, method in enumerate(methods):
            row = {"time": time, "method": method, **dict(zip(metrics, scores[index, m], strict=True))}
            rows.append({**row, "chosen": int(used[index]) == m, "gap_pixels": int(gaps[index])})
    table = pd.DataFrame(rows)
    table["pixels"] = table["pixels"].astype(int)
    return table


def format_quality(table: Any) -> str:
    """:func:`quality_table` as the lines the command line prints."""
    if "gap_pixels" in table and (table["gap_pixels"] == 0).all():
        return "scene self-check: nothing to fill on any date (no cloud, no no-data pixel): the reconstruction is the input"
    lines = [
        "scene self-check: clear pixels of this scene hidden under real cloud shapes, filled by each method",
        "  date        method       PSNR (dB)  pooled (dB)  MAE (refl.)  SAM (°)  hidden px",
    ]
    for row in table.itertuples():
        if getattr(row, "gap_pixels", -1) == 0:
            if row.method == METHODS[0]:  # one line per date
                lines.append(f"  {str(row.time)[:10]}   nothing to fill (every pixel observed): not checked")
            continue
        pooled = getattr(row, "psnr_pooled_db", float("nan"))  # stores written before it have none
        lines.append(
            f"  {str(row.time)[:10]}  {'*' if row.chosen else ' '}{row.method:<11} {row.psnr_db:9.2f}  {pooled:11.2f}  "
            f"{row.mae:11.4f}  {row.sam_deg:7.2f}  {row.pixels:9d}"
        )
    lines.append(
        f"  * fills the date: the best band-mean PSNR over all the scene's dates, or the date's own best where it wins by "
        f"{DATE_MARGIN_DB:g} dB or more; ties, and dates with fewer than {MIN_PIXELS} hidden px (nan), go to regression"
    )
    return "\n".join(lines)
