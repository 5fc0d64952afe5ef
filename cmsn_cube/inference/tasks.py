"""What the graph's tasks run on a worker: read a region of the input, run a block's tiles, run a self-check sample.

Numpy in, numpy out; the model comes in as a :class:`~cmsn_cube.inference.models.ModelSpec`. The tasks that
only blend (finishing a block) are pure numpy and live in :mod:`cmsn_cube.inference.tiling`; the graph that
wires them is :mod:`cmsn_cube.inference.graph`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cmsn_cube.cube import check_reflectance_values
from cmsn_cube.inference.models import ModelSpec, WindowFill, blend_fills, fill_windows
from cmsn_cube.inference.tiling import BlockBlend, Tilings, block_core, date_context, model_channels, take


def join(region: Any) -> np.ndarray:
    """Return the array of a region handed to a task: a numpy view as it is, or the chunks that cover it, joined.

    ``region`` is what :meth:`cmsn_cube.inference.graph.ChunkRegions.region` gives: an array, or a dict of the
    covering chunks (``pieces``: each chunk with its first index), the region's ``shape``, ``dtype`` and
    ``origin`` (its first row and column). The part of each chunk that falls in the region is copied.
    """
    if not isinstance(region, dict):
        return region
    shape = region["shape"]
    origin = (0,) * (len(shape) - 2) + tuple(region["origin"])
    out = np.empty(shape, dtype=region["dtype"])
    for chunk, start in region["pieces"]:
        target, source = [], []
        for begin, size, first, total in zip(start, chunk.shape, origin, shape, strict=True):
            low, high = max(begin, first), min(begin + size, first + total)
            target.append(slice(low - first, high - first))
            source.append(slice(low - begin, high - begin))
        out[tuple(target)] = chunk[tuple(source)]
    return out


def checked_reflectance(region: Any, origin: tuple[int, int]) -> np.ndarray:
    """Return the reflectance of a region starting at scene pixel ``origin``, checked as it is read.

    The check refuses ±inf and digital numbers; the error names the rows and columns.
    """
    values = join(region)
    rows, cols = values.shape[-2:]
    where = f"reflectance in rows {origin[0]}:{origin[0] + rows}, columns {origin[1]}:{origin[1] + cols}"
    check_reflectance_values(values, where=where)
    return values


def block_sums(
    reflectance: Any,
    cloud_mask: Any,
    *,
    sources: tuple[np.ndarray, np.ndarray],
    spec: ModelSpec,
    tilings: Tilings,
    index: tuple[int, int],
    origin: tuple[int, int],
    triplets: tuple[tuple[int, int, int], ...],
    days: tuple[float, ...],
    methods: np.ndarray,
    batch_size: int,
    device: str,
) -> dict[str, np.ndarray]:
    """Run the tiles of block ``index`` and sum their blended outputs over the block's extent.

    ``methods`` gives, per date, the filler that fills it (an index into :data:`cmsn_cube.selfcheck.METHODS`:
    the network or the classical regression, chosen by the scene self-check or forced).

    ``reflectance``/``cloud_mask`` hold the scene pixels the block reads (see :func:`join`), and ``sources``
    index them per axis (:meth:`~cmsn_cube.inference.tiling.AxisTiling.block_source`, relative to the region
    that starts at scene pixel ``origin``), mirroring them past the scene's end; the reflectance is checked as
    it is read (:func:`checked_reflectance`). Returns the weighted sums (bands, then the raw spread of their
    error: :func:`~cmsn_cube.inference.models.fill_windows`) and weights over the extent, and the
    observed bands and fill mask of the block's core (what
    :func:`~cmsn_cube.inference.tiling.finish_block` needs).
    """
    from cmsn_cube.selfcheck import METHODS

    joined = checked_reflectance(reflectance, origin)
    observed, cloudy = (take(take(a, sources[0], -2), sources[1], -1) for a in (joined, join(cloud_mask)))
    channels, to_fill = model_channels(observed, cloudy)
    blend = BlockBlend.plan(tilings, index, to_fill)
    for run in blend.runs(triplets, [METHODS[int(m)] for m in methods]):
        for first in range(0, len(run.tiles), batch_size):
            batch = run.tiles[first : first + batch_size]
            filled = fill_windows(
                run.method,
                blend.windows(channels, batch),
                triplet=run.triplet,
                served=run.served,
                spec=spec,
                device=device,
                days=list(days),
            )
            blend.add(filled.values, filled.sigma, batch, run)
    core_rows, core_cols = block_core(tilings, index)
    return {
        "sums": blend.sums,
        "weight": blend.weight,
        "observed": observed[..., core_rows, core_cols],
        "to_fill": to_fill[:, core_rows, core_cols],
    }


def read_window(reflectance: Any, cloud_mask: Any, *, origin: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Read a sample window of the self-check, its reflectance checked as it is read."""
    return checked_reflectance(reflectance, origin), np.asarray(join(cloud_mask), dtype=bool)


def run_check_sample(
    read: tuple[np.ndarray, np.ndarray],
    masks: list[np.ndarray],
    gap_pixels: np.ndarray,
    *,
    sample: int,
    window: int,
    spec: ModelSpec,
    triplets: tuple[tuple[int, int, int], ...],
    days: tuple[float, ...],
    device: str,
    seed: tuple[int, int],
) -> Any:
    """Run the ``sample``-th sample of the scene self-check (see :func:`cmsn_cube.selfcheck.check_sample`).

    Its date comes from ``gap_pixels`` (per date): only dates with pixels to fill are checked, in turn; None
    (no model run) past the samples those dates need, or when no date has a gap.
    """
    from cmsn_cube.selfcheck import check_sample, dates_to_check, planned_sample

    planned = planned_sample(sample, len(masks), dates_to_check(gap_pixels))
    if planned is None:
        return None
    date, planned_window = planned
    assert planned_window == window, "the graph reads the window of sample_window()"

    made: dict[str, WindowFill] = {}  # the blend reuses the regression's and the network's fills of this sample

    def fill(method: str, channels: np.ndarray, date: int) -> tuple[np.ndarray, np.ndarray]:
        for needed in ("regression", "cmsn") if method == "blend" else (method,):
            if needed not in made:
                made[needed] = _filled(needed, channels, date)
        filled = blend_fills(made["regression"], made["cmsn"]) if method == "blend" else made[method]
        return filled.values[0, 0], filled.sigma[0, 0]

    def _filled(method: str, channels: np.ndarray, date: int) -> WindowFill:
        context = date_context(triplets[date], method, len(days))
        return fill_windows(method, channels[None], triplet=context, served=[date], spec=spec, device=device,
                            days=list(days))  # fmt: skip

    return check_sample(
        *read,
        masks,
        date=date,
        window=window,
        triplets=triplets,
        fill=fill,
        rng=np.random.default_rng(list(seed)),
        model_channels=model_channels,
    )


def choice(scores: np.ndarray) -> np.ndarray:
    """Return each date's filler (an index into :data:`cmsn_cube.selfcheck.METHODS`) from the self-check's scores."""
    from cmsn_cube.selfcheck import METHODS, choose

    return np.array([METHODS.index(method) for method in choose(scores)], dtype=np.uint8)
