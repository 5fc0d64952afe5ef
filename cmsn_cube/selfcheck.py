"""The scene self-check: how well each method fills this scene, measured on the scene itself.

A user has no truth under the clouds of their own scene, but the scene has clear pixels. The check takes a
bounded sample of windows spread over the scene, pastes real cloud shapes (the cube's own cloud masks, from
other windows and dates, turned and flipped) over clear pixels of every date at once, fills them with each
method, and scores the fill against the pixels it hid: PSNR (dB, band mean), MAE (reflectance) and SAM (°) per
date and method. :func:`choose` then picks, per date, the method that measured better (ties: the classical
regression), which is what :func:`cmsn_cube.inference.reconstruct` uses with ``method="auto"``.

Pure numpy here; the fills come in as a callable, so this module knows nothing of torch or Dask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: The methods the check compares: the network and the classical local regression (weighted by local fit).
METHODS: tuple[str, ...] = ("cmsn", "regression")
#: What it measures per date and method; ``pixels`` is the number of hidden pixels scored.
METRICS: tuple[str, ...] = ("psnr_db", "mae", "sam_deg", "pixels")
#: Fewest hidden pixels per date for a score (fewer: NaN, and the date keeps the classical method).
MIN_PIXELS = 400
#: Side of the sample windows (px, one tile: smaller windows gave the network less context and a pessimistic
#: estimate) and how many: 8 x 256² px, each with one date hidden, about 10 % of the tile runs of a 2048² scene.
WINDOW = 256
N_WINDOWS = 8

Fill = Callable[[str, np.ndarray, tuple[int, ...]], np.ndarray]


def sample_windows(
    shape: tuple[int, int], *, size: int = WINDOW, count: int = N_WINDOWS
) -> list[tuple[int, int, int, int]]:
    """``count`` windows ``(row, col, height, width)`` of ``size`` px spread evenly over a scene of ``shape``
    (fewer, of the scene's size, when the scene is small; the check then draws several times per window)."""
    height, width = (min(size, n) for n in shape)
    per_axis = max(1, int(np.ceil(np.sqrt(count))))
    rows = np.unique(np.linspace(0, shape[0] - height, per_axis).round().astype(int))
    cols = np.unique(np.linspace(0, shape[1] - width, per_axis).round().astype(int))
    corners = [(int(r), int(c)) for r in rows for c in cols]
    if len(corners) > count:  # keep an even spread: every k-th corner
        corners = [corners[int(i)] for i in np.linspace(0, len(corners) - 1, count).round()]
    return [(r, c, height, width) for r, c in corners]


def _shape_pool(gaps: Sequence[np.ndarray]) -> list[tuple[int, int, np.ndarray]]:
    """Every date's gap mask of every window with some cloud and some clear, with its window and date: the real
    shapes to paste."""
    return [(w, t, g[t]) for w, g in enumerate(gaps) for t in range(g.shape[0]) if 0.005 < g[t].mean() < 0.9]


def _pasted(
    gap: np.ndarray,
    date: int,
    pool: Sequence[tuple[int, int, np.ndarray]],
    level: float,
    rng: np.random.Generator,
    *,
    window: int,
) -> np.ndarray:
    """A shape to hide on ``date`` of a window: a pool shape near the date's own cloud fraction ``level`` (never
    the date's own mask of this window), turned, flipped and shifted, on the date's clear pixels only."""
    candidates = [shape for w, t, shape in pool if (w, t) != (window, date) and shape.shape == gap.shape[1:]]
    if not candidates:
        return np.zeros_like(gap[date])
    fractions = np.array([shape.mean() for shape in candidates])
    nearest = np.argsort(np.abs(fractions - level))[: max(1, len(candidates) // 3)]
    shape = candidates[int(rng.choice(nearest))]
    shape = np.rot90(shape, int(rng.integers(4))) if shape.shape[0] == shape.shape[1] else shape
    shape = shape[:, ::-1] if rng.random() < 0.5 else shape
    shape = np.roll(shape, (int(rng.integers(shape.shape[0])), int(rng.integers(shape.shape[1]))), axis=(0, 1))
    return shape & ~gap[date]


def self_check(
    windows: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    triplets: Sequence[tuple[int, int, int]],
    fill: Fill,
    seed: int = 0,
    samples: int = N_WINDOWS,
    model_channels: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> np.ndarray:
    """Scores ``(time, method, metric)`` (:data:`METHODS`, :data:`METRICS`) of filling hidden clear pixels.

    Parameters
    ----------
    windows : sequence of (reflectance, cloud_mask)
        ``(T, 4, h, w)`` and ``(T, h, w)`` arrays of the sample windows.
    triplets : sequence of tuple
        The dates each date is reconstructed from (:func:`cmsn_cube.samples.date_triplets`).
    fill : callable
        ``fill(method, channels, triplet)`` returns the ``(3, 4, h, w)`` reconstruction of ``channels``
        (``(3, 5, h, w)``: the triplet's bands, zero where hidden, then the mask) by ``method``.
    seed, samples : int
        Random shapes; samples drawn, cycling over the windows, each hiding one date, the dates in turn (see
        :func:`samples_needed`).
    model_channels : callable
        :func:`cmsn_cube.inference.model_channels`.
    """
    rng = np.random.default_rng(seed)
    gaps = [model_channels(reflectance, cloud)[1] for reflectance, cloud in windows]
    pool = _shape_pool(gaps)
    levels = np.mean([gap.mean(axis=(1, 2)) for gap in gaps], axis=0)  # each date's cloud fraction, sampled
    n_dates = len(triplets)
    predicted: dict[tuple[int, str], list[np.ndarray]] = {}
    truth: dict[int, list[np.ndarray]] = {}
    for sample in range(samples):
        # one date hidden at a time, the dates in turn: its helpers stay as observed, as under a real cloud;
        # each pass over the windows shifts by one, so a date meets every window
        date, index = sample % n_dates, (sample + sample // len(windows)) % len(windows)
        (reflectance, cloud), gap = windows[index], gaps[index]
        triplet = triplets[date]
        hidden = np.zeros_like(gap)
        # scored where another date of the triplet is clear: the pixels no date observes stay NaN in the result
        seen_elsewhere = (~gap[[t for t in triplet if t != date]]).any(axis=0)
        hidden[date] = _pasted(gap, date, pool, float(levels[date]), rng, window=index) & seen_elsewhere
        if not hidden[date].any():
            continue
        channels, _ = model_channels(reflectance[list(triplet)], (cloud | hidden)[list(triplet)])
        for method in METHODS:
            output = fill(method, channels, triplet)[triplet.index(date)]
            predicted.setdefault((date, method), []).append(output[:, hidden[date]])  # (4, n)
        truth.setdefault(date, []).append(reflectance[date][:, hidden[date]])
    return _scores(predicted, truth, n_dates)


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
    return scores


def samples_needed(n_dates: int) -> int:
    """Samples of a check: :data:`N_WINDOWS`, and at least two per date (a long series, or a small scene
    whose one window is drawn again with other shapes)."""
    return max(N_WINDOWS, 2 * n_dates)


def choose(scores: np.ndarray) -> tuple[str, ...]:
    """Per date, the method with the higher measured PSNR; ties and unmeasured dates take the regression."""
    psnr = scores[..., METRICS.index("psnr_db")]
    network, classical = psnr[:, METHODS.index("cmsn")], psnr[:, METHODS.index("regression")]
    return tuple("cmsn" if n > c else "regression" for n, c in zip(network, classical, strict=True))


def quality_table(result: Any) -> Any:
    """A reconstruction's self-check as a ``pandas.DataFrame``: one row per date and method, with ``psnr_db``,
    ``mae``, ``sam_deg``, ``pixels`` (hidden pixels scored) and ``chosen`` (the method that filled the date).
    Computes the small ``quality``/``method_used`` variables (and so the check, if not yet run).

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
    scores, used = (np.asarray(v) for v in dask.compute(result["quality"].data, result["method_used"].data))
    rows = []
    for index, time in enumerate(np.asarray(result["time"].values)):
        for m, method in enumerate(METHODS):
            row = {"time": time, "method": method, **dict(zip(METRICS, scores[index, m], strict=True))}
            rows.append({**row, "chosen": int(used[index]) == m})
    table = pd.DataFrame(rows)
    table["pixels"] = table["pixels"].astype(int)
    return table


def format_quality(table: Any) -> str:
    """:func:`quality_table` as the lines the command line prints."""
    lines = [
        "scene self-check: clear pixels of this scene hidden under real cloud shapes, filled by each method",
        "  date        method       PSNR (dB)  MAE (refl.)  SAM (°)  hidden px",
    ]
    for row in table.itertuples():
        lines.append(
            f"  {str(row.time)[:10]}  {'*' if row.chosen else ' '}{row.method:<11} {row.psnr_db:9.2f}  "
            f"{row.mae:11.4f}  {row.sam_deg:7.2f}  {row.pixels:9d}"
        )
    lines.append("  * fills the date (the better PSNR; ties and dates too cloudy to check go to the regression)")
    return "\n".join(lines)
