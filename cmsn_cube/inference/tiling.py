"""The tile grid and the blend, in pure numpy: what a block runs, and how its outputs are finished.

Nothing here knows Dask or torch: :mod:`cmsn_cube.inference.graph` maps these over a scene and
:mod:`cmsn_cube.inference.tasks` runs the fillers on the windows chosen here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from cmsn_cube.cube import BANDS
from cmsn_cube.exceptions import BandMismatchError, DimensionError

#: Run a (triplet, filler) only on the tiles where a date it fills has a gap (False: on every tile with a gap on
#: any date, as before; kept to test that skipping changes nothing).
SKIP_CLEAR_DATES = True

#: Values of the ``filled`` layer (CF flags): where each pixel of a reconstruction comes from.
#: ``NO_DATA_FILLED``: a gap with no observation at all (NaN: Landsat 7 SLC-off stripes, a scene's edge) rather
#: than a cloud over an observation, filled from other dates.
#: ``SERIES_FILLED``: a gap no date of its triplet observed, filled by the classical local regression from the
#: nearest date of the whole series that observed it.
OBSERVED, FILLED, UNOBSERVED, INVENTED, NO_DATA_FILLED, SERIES_FILLED = 0, 1, 2, 3, 4, 5
FILLED_FLAGS = {
    "flag_values": [OBSERVED, FILLED, UNOBSERVED, INVENTED, NO_DATA_FILLED, SERIES_FILLED],
    "flag_meanings": (
        "observed filled_from_other_dates unobserved_left_nan unobserved_filled_by_network "
        "no_data_filled_from_other_dates filled_from_a_date_outside_its_triplet"
    ),
}


@dataclass(frozen=True)
class AxisTiling:
    """The global tile grid along one axis of ``size`` pixels, and the blocks that share it out.

    Positions are scene pixels. Tile ``k`` covers ``[k * stride, k * stride + tile)``: its last ``overlap``
    pixels are shared with tile ``k + 1`` and blended; pixels past the scene's end are the scene reflected at
    its edge. Blocks are ``block`` pixels, a multiple of the stride, and each tile belongs to the block where
    it starts. Overlaps therefore only reach forward: the last tiles of a block lay ``overlap`` pixels over
    the start of the next block, and a block is complete as soon as its own tiles and those of the blocks
    before it have run. Nothing waits for a block further on, so a scene streams through in bounded memory.

    An axis no longer than a tile is one window (no padding, no overlap): a small cube gives exactly what the
    model gives on the whole cube at once.

    Examples
    --------
    >>> tiling = AxisTiling.plan(200, tile=64, overlap=16, chunk=100)
    >>> tiling.starts.tolist(), tiling.output_chunks
    ([0, 48, 96, 144], (96, 96, 8))
    """

    size: int
    tile: int
    overlap: int
    n_tiles: int
    block: int

    @classmethod
    def plan(cls, size: int, *, tile: int, overlap: int, chunk: int) -> AxisTiling:
        """Plan the grid of ``tile``/``overlap``, with blocks of ``chunk`` pixels rounded down to whole strides."""
        if size <= tile:
            return cls(size=size, tile=size, overlap=0, n_tiles=1, block=size)
        stride = tile - overlap
        return cls(
            size, tile, overlap, n_tiles=-(-(size - overlap) // stride), block=max(stride, chunk // stride * stride)
        )

    @property
    def stride(self) -> int:
        """Pixels from one tile's start to the next one's."""
        return self.tile - self.overlap

    @property
    def starts(self) -> np.ndarray:
        """First pixel of every tile."""
        return np.arange(self.n_tiles) * self.stride

    @property
    def n_blocks(self) -> int:
        """Number of blocks (output chunks) along the axis."""
        return -(-self.size // self.block)

    @property
    def output_chunks(self) -> tuple[int, ...]:
        """Chunks of the reconstructed scene: one per block, the last one shorter."""
        return tuple(min(self.block, self.size - b * self.block) for b in range(self.n_blocks))

    def block_tiles(self, b: int) -> range:
        """Return the tiles that start in block ``b`` (none in a last block shorter than the overlap)."""
        per_block = self.block // self.stride
        return range(min(b * per_block, self.n_tiles), min((b + 1) * per_block, self.n_tiles))

    def block_extent(self, b: int) -> tuple[int, int]:
        """Return the pixels block ``b`` reads: its own, and the ``overlap`` its last tile lays over the next block."""
        start = b * self.block
        tiles = self.block_tiles(b)
        return start, max(start + self.output_chunks[b], int(self.starts[tiles[-1]]) + self.tile if tiles else 0)

    def block_source(self, b: int) -> np.ndarray:
        """Return the scene pixel that each pixel of :meth:`block_extent` reads (mirrored past the scene's end)."""
        index = np.arange(*self.block_extent(b))
        return np.where(index >= self.size, 2 * (self.size - 1) - index, index)

    def spill(self, b: int) -> slice | None:
        """Return where, in block ``b``'s extent, its tiles lie over block ``b + 1`` (``None`` for the last block)."""
        if b + 1 >= self.n_blocks:
            return None
        reach = min(self.block_extent(b)[1] - (b + 1) * self.block, self.output_chunks[b + 1])
        return slice(self.output_chunks[b], self.output_chunks[b] + reach) if reach > 0 else None

    def weights(self) -> np.ndarray:
        """Return the blending weight across a tile: a cosine ramp over the overlap at each end, 1 inside, never 0.

        The ramps of two neighbouring tiles add up to 1 (sin² + cos²).
        """
        weight = np.ones(self.tile, dtype=np.float32)
        if self.overlap:
            ramp = np.sin(np.linspace(0, np.pi / 2, self.overlap + 2)[1:-1]) ** 2
            weight[: self.overlap] = ramp
            weight[-self.overlap :] = ramp[::-1]
        return weight


Tilings = tuple[AxisTiling, AxisTiling]


def plan_scene(height: int, width: int, *, tile: int, overlap: int, chunk: int) -> Tilings:
    """Plan the tiles of a ``height`` x ``width`` scene: blocks one row of tiles high and ``chunk`` pixels wide.

    A task runs one row of a block's tiles (about a second on a CPU core) and that row is one chunk of the
    output: small tasks keep every worker busy to the end, and a chunk is written as soon as it is finished,
    without being gathered with others first.

    Examples
    --------
    >>> rows, cols = plan_scene(300, 270, tile=96, overlap=16, chunk=200)
    >>> rows.output_chunks, cols.output_chunks
    ((80, 80, 80, 60), (160, 110))
    """
    return (
        AxisTiling.plan(height, tile=tile, overlap=overlap, chunk=tile - overlap),
        AxisTiling.plan(width, tile=tile, overlap=overlap, chunk=chunk),
    )


def block_core(tilings: Tilings, index: tuple[int, int]) -> tuple[slice, slice]:
    """Return the pixels of block ``index``'s extent that are its own output chunk (its first rows and columns)."""
    return (slice(0, tilings[0].output_chunks[index[0]]), slice(0, tilings[1].output_chunks[index[1]]))


def model_channels(reflectance: np.ndarray, cloud_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Build the network's input from ``reflectance(time, band, y, x)`` and ``cloud_mask(time, y, x)`` arrays.

    Returns ``channels(time, 5, y, x)`` float32 (the bands, zero where filled, then the mask) and
    ``to_fill(time, y, x)``: the cloud mask or no data (NaN in any band), both filled by the network.

    Raises
    ------
    BandMismatchError
        ``reflectance`` is not ``(time, 4 bands, y, x)``.
    DimensionError
        ``cloud_mask`` is not ``(time, y, x)`` of the same sizes.
    """
    if reflectance.ndim != 4 or reflectance.shape[1] != len(BANDS):
        raise BandMismatchError(
            f"reflectance must be (time, band, y, x) with {len(BANDS)} bands ({', '.join(BANDS)}), got {reflectance.shape}"
        )
    if cloud_mask.shape != reflectance.shape[:1] + reflectance.shape[2:]:
        raise DimensionError(
            f"cloud_mask must be (time, y, x) = {reflectance.shape[:1] + reflectance.shape[2:]}, got {cloud_mask.shape}"
        )
    to_fill = np.asarray(cloud_mask, dtype=bool) | np.isnan(reflectance).any(axis=1)
    channels = np.empty((reflectance.shape[0], len(BANDS) + 1, *reflectance.shape[2:]), dtype=np.float32)
    np.copyto(channels[:, :-1], reflectance)
    np.copyto(channels[:, :-1], 0.0, where=to_fill[:, None])
    channels[:, -1] = to_fill
    return channels, to_fill


def take(array: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """Return ``np.take``, a view when ``index`` is a contiguous range (any block inside the scene)."""
    start = int(index[0])
    if np.array_equal(index, np.arange(start, start + index.size)):
        return array[(slice(None),) * (axis % array.ndim) + (slice(start, start + index.size),)]
    return np.take(array, index, axis=axis)


def tiles_to_run(to_fill: np.ndarray, corners: list[tuple[int, int]], tile: tuple[int, int]) -> list[tuple[int, int]]:
    """Return the tiles (top-left ``corners`` in ``to_fill(time, y, x)``) with a pixel to fill on some date.

    A tile with nothing to fill blends only into clear pixels, which keep their observed value: running it
    would change nothing.
    """
    return [corner for corner, gaps in zip(corners, tile_gaps(to_fill, corners, tile), strict=True) if gaps.any()]


def tile_gaps(to_fill: np.ndarray, corners: list[tuple[int, int]], tile: tuple[int, int]) -> np.ndarray:
    """Return ``(tiles, dates)`` bool: whether each date has a pixel to fill in each tile (``corners`` as above)."""
    gaps = np.zeros((len(corners), to_fill.shape[0]), dtype=bool)
    for k, (y, x) in enumerate(corners):
        gaps[k] = to_fill[:, y : y + tile[0], x : x + tile[1]].any(axis=(1, 2))
    return gaps


class FillerRun(NamedTuple):
    """One filler on one triplet of dates, over some tiles of a block."""

    triplet: tuple[int, ...]
    method: str
    #: the dates whose gaps it fills (each date is filled from its own triplet, by its own filler)
    served: list[int]
    #: the tiles it runs on: positions in :attr:`BlockBlend.corners`
    tiles: list[int]


@dataclass
class BlockBlend:
    """The tiles of one block that have something to fill, and their blended sums over the block's extent.

    Positions are in the block's extent (:meth:`AxisTiling.block_extent`). ``weight`` holds the blending weights
    of every tile that runs; :meth:`add` lays a filler's output over ``sums``, weighted the same way: the bands,
    then the raw spread of their error (``sums`` is ``(time, 2 * bands, y, x)``).
    """

    corners: list[tuple[int, int]]
    gaps: np.ndarray
    tile: tuple[int, int]
    blend: np.ndarray
    sums: np.ndarray
    weight: np.ndarray

    @classmethod
    def plan(cls, tilings: Tilings, index: tuple[int, int], to_fill: np.ndarray) -> BlockBlend:
        """Plan block ``index`` of ``tilings`` over the ``to_fill(time, y, x)`` of its extent.

        A tile with nothing to fill on any date blends only into clear pixels: it is not run (:func:`tiles_to_run`).
        """
        origins = [t.block_extent(b)[0] for t, b in zip(tilings, index, strict=True)]
        tile = (tilings[0].tile, tilings[1].tile)
        candidates = [
            (int(tilings[0].starts[ky]) - origins[0], int(tilings[1].starts[kx]) - origins[1])
            for ky in tilings[0].block_tiles(index[0])
            for kx in tilings[1].block_tiles(index[1])
        ]
        gaps = tile_gaps(to_fill, candidates, tile)
        keep = np.flatnonzero(gaps.any(axis=1))
        n_dates, height, width = to_fill.shape
        blend = np.outer(tilings[0].weights(), tilings[1].weights())
        planned = cls(
            corners=[candidates[k] for k in keep],
            gaps=gaps[keep],
            tile=tile,
            blend=blend,
            sums=np.zeros((n_dates, 2 * len(BANDS), height, width), dtype=np.float32),
            weight=np.zeros((height, width), dtype=np.float32),
        )
        for y, x in planned.corners:
            planned.weight[y : y + tile[0], x : x + tile[1]] += blend
        return planned

    def runs(self, triplets: tuple[tuple[int, int, int], ...], chosen: list[str]) -> list[FillerRun]:
        """Return the (triplet, filler) runs that fill this block, given each date's triplet and ``chosen`` filler.

        A date with nothing to fill in a tile keeps its observation there whatever the filler says, so each
        (triplet, filler) runs only on the tiles where a date it serves has a gap (:data:`SKIP_CLEAR_DATES`): on a
        long series with a few cloudy dates, a few triplets run instead of one per date. The classical
        regression sees every date (:func:`date_context`): one run serves all its dates.
        """
        if not self.corners:
            return []
        n_dates = len(chosen)
        contexts = [date_context(triplets[d], chosen[d], n_dates) for d in range(n_dates)]
        runs = []
        for triplet, method in sorted({(contexts[d], chosen[d]) for d in range(n_dates)}):
            served = [d for d in range(n_dates) if (contexts[d], chosen[d]) == (triplet, method)]
            wanted = [k for k, gap in enumerate(self.gaps) if not SKIP_CLEAR_DATES or any(gap[d] for d in served)]
            runs.append(FillerRun(triplet, method, served, wanted))
        return runs

    def windows(self, channels: np.ndarray, tiles: list[int]) -> np.ndarray:
        """Return the ``channels(time, 5, y, x)`` windows of ``tiles``, stacked: ``(tiles, time, 5, tile, tile)``."""
        ty, tx = self.tile
        return np.stack([channels[:, :, y : y + ty, x : x + tx] for y, x in (self.corners[k] for k in tiles)])

    def add(self, output: np.ndarray, sigma: np.ndarray, tiles: list[int], run: FillerRun) -> None:
        """Lay a filler's ``output(tiles, served dates, bands, tile, tile)`` over the sums of the dates it serves.

        ``sigma``, the raw spread of its error (the same shape; NaN where no date observes a pixel), is laid over
        the second half of the sums' bands, NaN as 0.
        """
        ty, tx = self.tile
        bands = output.shape[2]
        for j, k in enumerate(tiles):
            y, x = self.corners[k]
            for i, date in enumerate(run.served):
                self.sums[date, :bands, y : y + ty, x : x + tx] += output[j, i] * self.blend
                self.sums[date, bands:, y : y + ty, x : x + tx] += np.nan_to_num(sigma[j, i]) * self.blend


def date_context(triplet: tuple[int, ...], method: str, n_dates: int) -> tuple[int, ...]:
    """Return the dates a date's filler sees: its ``triplet``, or all ``n_dates`` for the classical regression.

    The blend's network sees the triplet (its regression every date of the windows it is handed).
    """
    return tuple(range(n_dates)) if method == "regression" else tuple(triplet)


def _fill_from_the_series(
    reconstructed: np.ndarray,
    sigma: np.ndarray,
    flags: np.ndarray,
    observed: np.ndarray,
    to_fill: np.ndarray,
    unobserved: np.ndarray,
    days: tuple[float, ...],
) -> np.ndarray:
    """Fill, in place, the ``unobserved`` gaps (none of their context) that another date of the series observed.

    Returns where it filled ``(time, y, x)``.
    """
    from cmsn_cube.baselines import regress

    reachable = unobserved & (~to_fill).any(axis=0)
    targets = [int(t) for t in np.flatnonzero(reachable.any(axis=(1, 2)))]
    if not targets:
        return np.zeros_like(reachable)
    # a NaN band of a clear pixel is a gap too (model_channels' rule): no NaN reaches the fit
    filled = regress(np.nan_to_num(observed), to_fill, np.asarray(days), targets=targets)
    reachable &= np.isfinite(filled.values).all(axis=1)
    np.copyto(reconstructed, filled.values, where=reachable[:, None])
    np.copyto(sigma, filled.sigma, where=reachable[:, None])
    flags[reachable] = SERIES_FILLED
    return reachable


def spilled_strip(block: dict[str, np.ndarray], rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """Return the part of a block's sums that its last tiles lay over a later block (copied: the block is large)."""
    return block["sums"][..., rows, cols].copy(), block["weight"][rows, cols].copy()


def finish_block(
    block: dict[str, np.ndarray],
    *strips: tuple[np.ndarray, np.ndarray] | None,
    core: tuple[slice, slice],
    triplets: tuple[tuple[int, int, int], ...],
    fill_unobserved: bool,
    days: tuple[float, ...] | None = None,
    methods: np.ndarray | None = None,
    quality: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Return a block's outputs: its sums plus the strips that earlier blocks' tiles lay over its start, blended.

    ``block`` holds the ``sums`` and ``weight`` over the block's extent and the ``observed`` bands and ``to_fill``
    mask of its ``core``. ``strips`` come from the block above, the block to the left and the one diagonally
    above-left (``None`` where there is none); each covers the first rows and/or columns of the block.
    ``methods`` gives each date's filler (indices into :data:`cmsn_cube.selfcheck.METHODS`; default the
    network), and with it the dates it saw (:func:`date_context`). A gap that none of those dates observed but
    another date of the series did is filled by the classical regression (:func:`cmsn_cube.baselines.regress`
    over the block's core, each date's ``days``; flagged :data:`SERIES_FILLED`); one that no date observed is
    NaN (flagged :data:`UNOBSERVED`), or the network's guess with ``fill_unobserved`` (flagged :data:`INVENTED`).

    ``uncertainty`` is the raw spread of each fill times the scene's calibration factor of the filler that made
    it (``quality``: the self-check's scores, :data:`cmsn_cube.selfcheck.METRICS`; without them
    :data:`cmsn_cube.uncertainty.DEFAULT_SCALE`); NaN where nothing was filled or no date observed the pixel.

    Examples
    --------
    >>> sums = np.concatenate([np.full((3, 4, 2, 2), 0.5), np.full((3, 4, 2, 2), 0.02)], axis=1).astype(np.float32)
    >>> to_fill = np.zeros((3, 2, 2), dtype=bool)
    >>> to_fill[0, 0, 0] = True  # one cloudy pixel, observed on the other dates
    >>> observed = np.full((3, 4, 2, 2), 0.25, np.float32)
    >>> block = {"sums": sums, "weight": np.full((2, 2), 2, np.float32), "observed": observed, "to_fill": to_fill}
    >>> out = finish_block(block, None, None, None, core=(slice(0, 2), slice(0, 2)), triplets=((0, 1, 2),) * 3,
    ...                    fill_unobserved=False)
    >>> float(out["reconstructed"][0, 0, 0, 0]), out["filled"][0].tolist()
    (0.25, [[1, 0], [0, 0]])
    >>> round(float(out["uncertainty"][0, 0, 0, 0]), 4), bool(np.isnan(out["uncertainty"][0, 0, 1, 1]))
    (0.008, True)
    """
    from cmsn_cube.selfcheck import METHODS

    summed = block["sums"][..., core[0], core[1]].copy()
    weight = block["weight"][core].copy()
    for strip in strips:
        if strip is not None:
            head = (slice(0, strip[1].shape[0]), slice(0, strip[1].shape[1]))
            summed[(..., *head)] += strip[0]
            weight[head] += strip[1]
    np.divide(summed, weight, out=summed, where=weight > 0)
    bands = summed.shape[1] // 2
    reconstructed, sigma = summed[:, :bands].copy(), summed[:, bands:].copy()
    to_fill, observed = block["to_fill"], block["observed"]
    # blending averages identical values in floating point: clear pixels take the observation, bit-identical
    np.copyto(reconstructed, observed, where=~to_fill[:, None])
    n_dates = to_fill.shape[0]
    chosen = [METHODS[int(m)] for m in methods] if methods is not None else ["cmsn"] * n_dates
    contexts = [date_context(triplets[d], chosen[d], n_dates) for d in range(n_dates)]
    seen = np.stack([(~to_fill[list(context)]).any(axis=0) for context in contexts])
    unobserved = to_fill & ~seen
    flags = to_fill.astype(np.uint8)  # FILLED where the network filled, OBSERVED elsewhere
    flags[to_fill & np.isnan(observed).any(axis=1)] = NO_DATA_FILLED  # stripes and edges, not clouds
    flags[unobserved] = INVENTED if fill_unobserved else UNOBSERVED
    if not fill_unobserved:
        np.copyto(reconstructed, np.float32(np.nan), where=unobserved[:, None])
    from_series = np.zeros_like(to_fill)
    if days is not None:
        from_series = _fill_from_the_series(reconstructed, sigma, flags, observed, to_fill, unobserved, days)
    from cmsn_cube.metrics import ndvi

    ndvi_observed = ndvi(observed, axis=1)
    ndvi_observed[to_fill] = np.nan
    return {
        "reconstructed": reconstructed,
        "filled": flags,
        "ndvi": ndvi(reconstructed, axis=1),
        "ndvi_observed": ndvi_observed,
        "uncertainty": _calibrated(sigma, to_fill & ~unobserved | from_series, chosen, from_series, quality),
    }


def _calibrated(
    sigma: np.ndarray, filled: np.ndarray, chosen: list[str], from_series: np.ndarray, quality: np.ndarray | None
) -> np.ndarray:
    """Return the raw spread ``sigma`` times each date's calibration factor where ``filled``, NaN elsewhere.

    The factor is the one of the date's filler, or of the regression at the pixels it filled from the series.
    """
    from cmsn_cube.selfcheck import uncertainty_scales

    scales = uncertainty_scales(quality, len(chosen))
    own = np.array([scales[d][chosen[d]] for d in range(len(chosen))], dtype=np.float32)
    regression = np.array([scales[d]["regression"] for d in range(len(chosen))], dtype=np.float32)
    factor = np.where(from_series, regression[:, None, None], own[:, None, None])
    out = sigma * factor[:, None]
    out[~np.broadcast_to(filled[:, None], out.shape)] = np.nan
    return out
