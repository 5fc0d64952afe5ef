"""Whole-scene reconstruction: tiles on one global grid, blended, mapped over the scene with Dask.

How a scene is cut
------------------
Tiles of ``tile`` pixels start every ``stride = tile - overlap`` pixels on one grid that covers the whole scene
from its first pixel (mirrored past its end), and neighbouring tiles are blended over their ``overlap`` with
weights that add up to one. Each tile belongs to the block where it starts, so overlaps only reach forward.
A task is one row of tiles across a block ``chunk`` pixels wide: it reads its pixels plus the ``overlap`` after
them from the store's chunks, runs the tiles that have something to fill, and is finished with the
``overlap``-wide strips that the tasks above and to the left spilled over its start; the finished row is one
chunk of the output. No chunk waits for a chunk after it, so :func:`write_reconstruction` streams a scene
through a cluster in raster order, in memory that does not grow with the scene. The result does not depend on
the chunking: no seam at block borders, identical numbers on one thread, many threads or a cluster.

The model reaches workers as one graph key holding its weights (a few MB), loaded once per worker process and
cached there (``_model_on_worker``), not once per chunk.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import operator
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import dask
import dask.array as da
import dask.optimization
import dask.threaded
import numpy as np
import xarray as xr
from dask.highlevelgraph import HighLevelGraph

from cmsn_cube.cube import BANDS, check_reflectance_values
from cmsn_cube.device import default_device
from cmsn_cube.exceptions import (
    ArgumentError,
    BandMismatchError,
    CMSNCubeError,
    CMSNCubeWarning,
    CubeValidationError,
    DimensionError,
    NoDataError,
    StoreError,
    check_non_negative,
    check_positive,
)
from cmsn_cube.qa import ensure_cloud_mask

if TYPE_CHECKING:  # torch loads only when a model runs
    import torch

#: Name of the packaged checkpoint used when ``model=None``.
DEFAULT_MODEL = "cmsn-small"

ModelLike = Any  # None | packaged name | checkpoint path | torch.nn.Module (a CMSN)


# ------------------------------------------------------------------------------------------ model spec


@dataclass(frozen=True)
class ModelSpec:
    """A model as it travels to workers: its weights as bytes and their digest (the cache key)."""

    name: str
    sha256: str
    payload: bytes

    def __repr__(self) -> str:  # keep graph reprs short
        return f"ModelSpec({self.name!r}, sha256={self.sha256[:12]}…)"


def model_spec(model: ModelLike = None) -> ModelSpec:
    """Turn ``None`` (packaged default), a name, a checkpoint path or a CMSN module into a :class:`ModelSpec`.

    A checkpoint is verified (digest, architecture) here, on the client, before any worker sees it.
    """
    import torch

    from cmsn_cube.model.checkpoint import load_model

    if isinstance(model, torch.nn.Module):
        config, state, name = dict(model.config), model.state_dict(), "in-memory model"  # type: ignore[arg-type]
    else:
        source = DEFAULT_MODEL if model is None else model
        loaded = load_model(source, bands=BANDS)  # verified: digest, architecture, band order, weights fit
        config, state, name = dict(loaded.config), loaded.state_dict(), os.fspath(source)
    buffer = io.BytesIO()
    torch.save({"config": config, "state_dict": {k: v.detach().cpu() for k, v in state.items()}}, buffer)
    data = buffer.getvalue()
    return ModelSpec(name=name, sha256=hashlib.sha256(data).hexdigest(), payload=data)


_MODEL_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _load_spec(sha256: str, payload: bytes, device: str) -> torch.nn.Module:
    import torch

    from cmsn_cube.model.checkpoint import build_model

    content = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    model = build_model(content["config"])
    model.load_state_dict(content["state_dict"])
    return model.to(device).eval()


def _model_on_worker(spec: ModelSpec, device: str) -> torch.nn.Module:
    """The model for ``spec`` in this process, built once and reused by every chunk."""
    with _MODEL_LOCK:
        return _load_spec(spec.sha256, spec.payload, device)


def run_filler(
    method: str,
    windows: np.ndarray,
    *,
    spec: ModelSpec,
    device: str,
    days: list[float],
    targets: list[int] | None = None,
    weighted: np.ndarray | None = None,
) -> np.ndarray:
    """Fill ``windows(batch, dates, bands + mask, y, x)`` as ``(batch, dates, bands, y, x)`` with the network
    (``"cmsn"``), the local regression weighted by fit (``"weighted-regression"``: the network's prior on its
    own, :class:`cmsn_cube.model.prior.RegressionFill`) or the classical local regression (``"regression"``:
    :func:`cmsn_cube.baselines.fill_regression` itself, nearest clear date first; where it has no answer, the
    weighted one). ``targets``: the dates wanted (default all; the others may be left unfilled); ``weighted``:
    the weighted regression of these windows when already run.
    """
    from cmsn_cube.baselines import fill_regression

    if method == "regression" and weighted is not None:
        output = weighted.copy()
    else:
        output = _run_model(_filler_on_worker(method, spec, device), windows, device)
    if method != "regression":
        return output
    for k, window in enumerate(windows):
        values, gap = window[:, :-1], window[:, -1] > 0.5
        filled = fill_regression(values, gap, np.asarray(days, dtype=np.float64), targets=targets)
        use = gap[:, None] & np.isfinite(filled)
        output[k][use] = filled[use]
    return output


def _filler_on_worker(method: str, spec: ModelSpec, device: str) -> torch.nn.Module:
    """The network (``"cmsn"``), or the weighted local regression with its band statistics (the others)."""
    network = _model_on_worker(spec, device)
    if method == "cmsn":
        return network
    with _MODEL_LOCK:
        return _regression_like(network)


@functools.lru_cache(maxsize=4)
def _regression_like(network: torch.nn.Module) -> torch.nn.Module:
    import torch

    from cmsn_cube.model.prior import RegressionFill

    return RegressionFill.like(network).to(torch.as_tensor(network.band_mean).device).eval()


# ------------------------------------------------------------------------------------------ tiling


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
    """

    size: int
    tile: int
    overlap: int
    n_tiles: int
    block: int

    @classmethod
    def plan(cls, size: int, *, tile: int, overlap: int, chunk: int) -> AxisTiling:
        """The grid of ``tile``/``overlap``, with blocks of ``chunk`` pixels rounded down to whole strides."""
        if size <= tile:
            return cls(size=size, tile=size, overlap=0, n_tiles=1, block=size)
        stride = tile - overlap
        return cls(
            size, tile, overlap, n_tiles=-(-(size - overlap) // stride), block=max(stride, chunk // stride * stride)
        )

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def starts(self) -> np.ndarray:
        """First pixel of every tile."""
        return np.arange(self.n_tiles) * self.stride

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.block)

    @property
    def output_chunks(self) -> tuple[int, ...]:
        """Chunks of the reconstructed scene: one per block, the last one shorter."""
        return tuple(min(self.block, self.size - b * self.block) for b in range(self.n_blocks))

    def block_tiles(self, b: int) -> range:
        """The tiles that start in block ``b`` (none in a last block shorter than the overlap)."""
        per_block = self.block // self.stride
        return range(min(b * per_block, self.n_tiles), min((b + 1) * per_block, self.n_tiles))

    def block_extent(self, b: int) -> tuple[int, int]:
        """The pixels block ``b`` reads: its own, and the ``overlap`` its last tile lays over the next block."""
        start = b * self.block
        tiles = self.block_tiles(b)
        return start, max(start + self.output_chunks[b], int(self.starts[tiles[-1]]) + self.tile if tiles else 0)

    def block_source(self, b: int) -> np.ndarray:
        """The scene pixel that each pixel of :meth:`block_extent` reads (mirrored past the scene's end)."""
        index = np.arange(*self.block_extent(b))
        return np.where(index >= self.size, 2 * (self.size - 1) - index, index)

    def spill(self, b: int) -> slice | None:
        """Where, in block ``b``'s extent, its tiles lie over block ``b + 1`` (``None`` for the last block)."""
        if b + 1 >= self.n_blocks:
            return None
        reach = min(self.block_extent(b)[1] - (b + 1) * self.block, self.output_chunks[b + 1])
        return slice(self.output_chunks[b], self.output_chunks[b] + reach) if reach > 0 else None

    def weights(self) -> np.ndarray:
        """Blending weight across a tile: a cosine ramp over the overlap at each end, 1 inside, never 0.

        The ramps of two neighbouring tiles add up to 1 (sin² + cos²).
        """
        weight = np.ones(self.tile, dtype=np.float32)
        if self.overlap:
            ramp = np.sin(np.linspace(0, np.pi / 2, self.overlap + 2)[1:-1]) ** 2
            weight[: self.overlap] = ramp
            weight[-self.overlap :] = ramp[::-1]
        return weight


def model_channels(reflectance: np.ndarray, cloud_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The network's input from ``reflectance(time, band, y, x)`` and ``cloud_mask(time, y, x)`` arrays.

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


def _run_model(model: torch.nn.Module, windows: np.ndarray, device: str) -> np.ndarray:
    import torch

    with torch.inference_mode():
        tensor = torch.from_numpy(windows).to(device)
        if device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.float16):
                result = model(tensor).output.float()
        else:
            result = model(tensor).output
        return result.cpu().numpy()


def _take(array: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``np.take`` that returns a view when ``index`` is a contiguous range (any block inside the scene)."""
    start = int(index[0])
    if np.array_equal(index, np.arange(start, start + index.size)):
        return array[(slice(None),) * (axis % array.ndim) + (slice(start, start + index.size),)]
    return np.take(array, index, axis=axis)


#: Run a (triplet, filler) only on the tiles where a date it fills has a gap (False: on every tile with a gap on
#: any date, as before; kept to test that skipping changes nothing).
SKIP_CLEAR_DATES = True


def tiles_to_run(to_fill: np.ndarray, corners: list[tuple[int, int]], tile: tuple[int, int]) -> list[tuple[int, int]]:
    """The tiles (top-left ``corners`` in ``to_fill(time, y, x)``) with a pixel to fill on some date.

    A tile with nothing to fill blends only into clear pixels, which keep their observed value: running it
    would change nothing.
    """
    return [corner for corner, gaps in zip(corners, tile_gaps(to_fill, corners, tile), strict=True) if gaps.any()]


def tile_gaps(to_fill: np.ndarray, corners: list[tuple[int, int]], tile: tuple[int, int]) -> np.ndarray:
    """``(tiles, dates)`` bool: whether each date has a pixel to fill in each tile (``corners`` as above)."""
    gaps = np.zeros((len(corners), to_fill.shape[0]), dtype=bool)
    for k, (y, x) in enumerate(corners):
        gaps[k] = to_fill[:, y : y + tile[0], x : x + tile[1]].any(axis=(1, 2))
    return gaps


class _Chunks:
    """An array (numpy or Dask) cut into the regions that tasks receive.

    A Dask array is handed over as the whole chunks that cover a region (``to_delayed``), which the task joins
    (:func:`_join`). Slicing it instead lets Dask fuse the store read into every part of every slice: 3756
    read tasks instead of 774 for a streamed 4096² write (512 px chunks on disk), 8.4 s of reading instead of
    2.7 s. A chunk is read once per computation, and once more in a streamed write
    (:func:`write_reconstruction`) when the regions that share it are not in flight together.
    """

    def __init__(self, array: Any) -> None:
        self.array = array
        if isinstance(array, da.Array):
            self.parts = array.to_delayed()
            self.bounds = [np.cumsum((0, *chunks)) for chunks in array.chunks]

    def region(self, rows: slice, cols: slice) -> Any:
        """``array[..., rows, cols]``: a numpy view, or the covering chunks with their offsets for :func:`_join`."""
        if not isinstance(self.array, da.Array):
            return self.array[..., rows, cols]
        ranges = [range(len(b) - 1) for b in self.bounds[:-2]]
        for bounds, wanted in zip(self.bounds[-2:], (rows, cols), strict=True):
            first = int(np.searchsorted(bounds, wanted.start, side="right")) - 1
            ranges.append(range(first, int(np.searchsorted(bounds, wanted.stop, side="left"))))
        pieces = [
            (self.parts[index], tuple(int(b[i]) for b, i in zip(self.bounds, index, strict=True)))
            for index in itertools.product(*ranges)
        ]
        shape = (*self.array.shape[:-2], rows.stop - rows.start, cols.stop - cols.start)
        return {"pieces": pieces, "shape": shape, "dtype": self.array.dtype, "origin": (rows.start, cols.start)}


def _join(region: Any) -> np.ndarray:
    """The array of a :meth:`_Chunks.region`: copies the part of each chunk that falls in the region."""
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


def _checked_reflectance(region: Any, origin: tuple[int, int]) -> np.ndarray:
    """The reflectance of a :meth:`_Chunks.region` starting at scene pixel ``origin``, checked as it is read
    (±inf, digital numbers); the error names the rows and columns.
    """
    values = _join(region)
    rows, cols = values.shape[-2:]
    where = f"reflectance in rows {origin[0]}:{origin[0] + rows}, columns {origin[1]}:{origin[1] + cols}"
    check_reflectance_values(values, where=where)
    return values


def _block_sums(
    reflectance: Any,
    cloud_mask: Any,
    *,
    sources: tuple[np.ndarray, np.ndarray],
    spec: ModelSpec,
    tilings: tuple[AxisTiling, AxisTiling],
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

    ``reflectance``/``cloud_mask`` hold the scene pixels the block reads (:meth:`_Chunks.region`), and
    ``sources`` index them per axis (:meth:`AxisTiling.block_source`, relative to the region that starts at
    scene pixel ``origin``), mirroring them past the scene's end; the reflectance is checked as it is read
    (:func:`_checked_reflectance`). Returns the weighted sums and weights over the extent, and the observed
    bands and fill mask of the block's core (what :func:`_finish_block` needs).
    """
    joined = _checked_reflectance(reflectance, origin)
    observed, cloudy = (_take(_take(a, sources[0], -2), sources[1], -1) for a in (joined, _join(cloud_mask)))
    channels, to_fill = model_channels(observed, cloudy)
    n_dates, height, width = to_fill.shape
    sums = np.zeros((n_dates, len(BANDS), height, width), dtype=np.float32)
    weight = np.zeros((height, width), dtype=np.float32)
    origins = [t.block_extent(b)[0] for t, b in zip(tilings, index, strict=True)]
    ty, tx = tilings[0].tile, tilings[1].tile
    candidates = [
        (int(tilings[0].starts[ky]) - origins[0], int(tilings[1].starts[kx]) - origins[1])
        for ky in tilings[0].block_tiles(index[0])
        for kx in tilings[1].block_tiles(index[1])
    ]
    gaps_of_candidates = tile_gaps(to_fill, candidates, (ty, tx))
    # a tile with nothing to fill on any date blends only into clear pixels: it is not run (tiles_to_run)
    keep = np.flatnonzero(gaps_of_candidates.any(axis=1))
    corners = [candidates[k] for k in keep]
    gaps = gaps_of_candidates[keep]
    if corners:
        from cmsn_cube.selfcheck import METHODS

        chosen = [METHODS[int(m)] for m in methods]
        blend = np.outer(tilings[0].weights(), tilings[1].weights())
        every_date = tuple(range(n_dates))
        for y, x in corners:
            weight[y : y + ty, x : x + tx] += blend
        # A date with nothing to fill in a tile keeps its observation there whatever the filler says, so each
        # (triplet, filler) runs only on the tiles where a date it serves has a gap: on a long series with a
        # few cloudy dates, a few triplets run instead of one per date.
        for triplet, method in sorted({(triplets[d], chosen[d]) for d in range(n_dates)}):
            served = [d for d in range(n_dates) if (triplets[d], chosen[d]) == (triplet, method)]
            wanted = [k for k, gap in enumerate(gaps) if not SKIP_CLEAR_DATES or any(gap[d] for d in served)]
            for first in range(0, len(wanted), batch_size):
                batch = wanted[first : first + batch_size]
                windows = np.stack([channels[:, :, y : y + ty, x : x + tx] for y, x in (corners[k] for k in batch)])
                output = run_filler(
                    method,
                    windows if triplet == every_date else np.ascontiguousarray(windows[:, list(triplet)]),
                    spec=spec,
                    device=device,
                    days=[days[d] for d in triplet],
                )
                for j, k in enumerate(batch):
                    y, x = corners[k]
                    for date in served:
                        sums[date, :, y : y + ty, x : x + tx] += output[j, triplet.index(date)] * blend
    core_rows, core_cols = (slice(0, t.output_chunks[b]) for t, b in zip(tilings, index, strict=True))
    return {
        "sums": sums,
        "weight": weight,
        "observed": observed[..., core_rows, core_cols],
        "to_fill": to_fill[:, core_rows, core_cols],
    }


#: Key prefix of the strips that a block's tiles spill over a later block: ``{prefix}{token}-{i}-{j}-{side}``
#: for the block ``(i, j)`` that receives it from ``above``, the ``left`` or the ``diagonal``.
STRIP_PREFIX = "cmsn-strip-"
_STRIP_SOURCE = {"above": (-1, 0), "left": (0, -1), "diagonal": (-1, -1)}


def _spilled_strip(block: dict[str, np.ndarray], rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """The part of a block's sums that its last tiles lay over a later block (copied: the block is large)."""
    return block["sums"][..., rows, cols].copy(), block["weight"][rows, cols].copy()


#: Values of the ``filled`` layer (CF flags): where each pixel of a reconstruction comes from.
#: ``NO_DATA_FILLED``: a gap with no observation at all (NaN: Landsat 7 SLC-off stripes, a scene's edge) rather
#: than a cloud over an observation, filled from other dates.
OBSERVED, FILLED, UNOBSERVED, INVENTED, NO_DATA_FILLED = 0, 1, 2, 3, 4
FILLED_FLAGS = {
    "flag_values": [OBSERVED, FILLED, UNOBSERVED, INVENTED, NO_DATA_FILLED],
    "flag_meanings": (
        "observed filled_from_other_dates unobserved_left_nan unobserved_filled_by_network "
        "no_data_filled_from_other_dates"
    ),
}


def _finish_block(
    block: dict[str, np.ndarray],
    *strips: tuple[np.ndarray, np.ndarray] | None,
    core: tuple[slice, slice],
    triplets: tuple[tuple[int, int, int], ...],
    fill_unobserved: bool,
) -> dict[str, np.ndarray]:
    """A block's outputs: its sums plus the strips that earlier blocks' tiles lay over its start, blended.

    ``strips`` come from the block above, the block to the left and the one diagonally above-left (``None``
    where there is none); each covers the first rows and/or columns of the block. A gap that no date of its
    triplet observed is NaN (flagged :data:`UNOBSERVED`), or the network's guess with ``fill_unobserved``
    (flagged :data:`INVENTED`).
    """
    reconstructed = block["sums"][..., core[0], core[1]].copy()
    weight = block["weight"][core].copy()
    for strip in strips:
        if strip is not None:
            head = (slice(0, strip[1].shape[0]), slice(0, strip[1].shape[1]))
            reconstructed[(..., *head)] += strip[0]
            weight[head] += strip[1]
    np.divide(reconstructed, weight, out=reconstructed, where=weight > 0)
    to_fill, observed = block["to_fill"], block["observed"]
    # blending averages identical values in floating point: clear pixels take the observation, bit-identical
    np.copyto(reconstructed, observed, where=~to_fill[:, None])
    seen_in_triplet = np.stack([(~to_fill[list(triplet)]).any(axis=0) for triplet in triplets])
    unobserved = to_fill & ~seen_in_triplet
    flags = to_fill.astype(np.uint8)  # FILLED where the network filled, OBSERVED elsewhere
    flags[to_fill & np.isnan(observed).any(axis=1)] = NO_DATA_FILLED  # stripes and edges, not clouds
    flags[unobserved] = INVENTED if fill_unobserved else UNOBSERVED
    if not fill_unobserved:
        np.copyto(reconstructed, np.float32(np.nan), where=unobserved[:, None])
    from cmsn_cube.metrics import ndvi

    ndvi_observed = ndvi(observed, axis=1)
    ndvi_observed[to_fill] = np.nan
    return {
        "reconstructed": reconstructed,
        "filled": flags,
        "ndvi": ndvi(reconstructed, axis=1),
        "ndvi_observed": ndvi_observed,
    }


# ------------------------------------------------------------------------------------------ public API


def model_inputs(cube: xr.Dataset) -> tuple[xr.DataArray, xr.DataArray]:
    """:func:`model_channels` of a cube (computes): ``(time, band, y, x)`` with band ``mask`` last, and ``filled``."""
    reflectance = cube["reflectance"].transpose("time", "band", "y", "x")
    channels, to_fill = model_channels(
        np.asarray(reflectance.values), np.asarray(cube["cloud_mask"].transpose("time", "y", "x").values)
    )
    coords = {name: coord for name, coord in reflectance.coords.items() if "band" not in coord.dims}
    return (
        xr.DataArray(channels, dims=reflectance.dims, coords={**coords, "band": [*BANDS, "mask"]}),
        xr.DataArray(to_fill, dims=("time", "y", "x"), coords=coords, name="filled"),
    )


#: The variables of a reconstruction: dims, dtype and attrs.
OUTPUT_VARIABLES: dict[str, tuple[tuple[str, ...], np.dtype, dict[str, Any]]] = {
    "reconstructed": (
        ("time", "band", "y", "x"),
        np.dtype(np.float32),
        {"long_name": "reconstructed TOA reflectance", "units": "1"},
    ),
    "filled": (
        ("time", "y", "x"),
        np.dtype(np.uint8),
        {
            "long_name": "origin of each pixel (0 observed, 1 filled by the network from other dates' observations, "
            "2 observed on no date of its triplet: NaN, 3 the same, filled by the network)",
            **FILLED_FLAGS,
        },
    ),
    "ndvi": (("time", "y", "x"), np.dtype(np.float32), {"long_name": "NDVI of the reconstruction", "units": "1"}),
    "ndvi_observed": (
        ("time", "y", "x"),
        np.dtype(np.float32),
        {"long_name": "NDVI of the observation (NaN under clouds)", "units": "1"},
    ),
}


def reconstruct(
    cube: xr.Dataset,
    *,
    model: ModelLike = None,
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 4,
    device: str | None = None,
    chunk: int = 1024,
    fill_unobserved: bool = False,
    method: str = "auto",
    check_seed: int = 0,
) -> xr.Dataset:
    """Reconstruct every cloudy pixel of every date, lazily (nothing runs until you compute or write).

    Parameters
    ----------
    cube : xarray.Dataset
        A cube with ``reflectance`` and ``cloud_mask`` (or ``qa_pixel`` to decode it), at least 3 dates.
    model : None, str, path or CMSN
        ``None`` = the packaged checkpoint :data:`DEFAULT_MODEL`; a packaged name; a checkpoint path; or a model.
    tile : int
        Window size in pixels fed to the network.
    overlap : int
        Pixels shared by neighbouring windows, blended with a cosine ramp; less than half a tile.
    batch_size : int
        Windows per forward pass.
    device : str, optional
        ``"cpu"``, ``"cuda"``…; default CUDA when present.
    chunk : int
        Width in pixels of the output's Dask chunks (along x), at least ``tile``; rounded down to a multiple of
        the stride ``tile - overlap`` (1024 -> 896 with the defaults), so that each chunk runs its own tiles.
        Along y a chunk is one row of tiles, one stride high (224 px with the defaults).
    fill_unobserved : bool
        Also fill the gaps that no date of their triplet observed (the network's guess, flagged 3 in
        ``filled``); by default they stay NaN (flagged 2).
    method : {"auto", "cmsn", "regression", "weighted-regression"}
        Who fills the gaps. ``"auto"``: per date, the filler that scored best in the scene self-check
        (:mod:`cmsn_cube.selfcheck`: the scene's own clear pixels hidden under real cloud shapes and filled by
        the network and by two classical local regressions; ties go to the classical ones). The others force
        one filler (no check; see :func:`run_filler`).
    check_seed : int
        Seed of the shapes the self-check pastes.

    Returns
    -------
    xarray.Dataset
        ``reconstructed(time, band, y, x)`` (clear pixels bit-identical to the input), ``filled(time, y, x)``
        (:data:`FILLED_FLAGS`: observed, filled from other dates (under a cloud, or where the date has no data
        at all: SLC-off stripes), unobserved), ``ndvi(time, y, x)`` from the
        reconstruction, ``ndvi_observed(time, y, x)`` (NaN under clouds) and ``observed_dates(y, x)`` (dates
        with a clear observation), with the input's coordinates and CRS, and attrs naming the checkpoint and
        its sha256 and the input (its store and fingerprint). Each tile runs once, and tiles with no pixel to
        fill are not run at all. Reflectance is checked as it is read (±inf, digital numbers). Also
        ``method_used(time)`` (index into :data:`cmsn_cube.selfcheck.METHODS`) and, with ``method="auto"``,
        ``quality(time, method, metric)``: the self-check's scores (see ``ds.cmsn.quality()``).

    Raises
    ------
    DimensionError
        Fewer than 3 dates.
    BandMismatchError, CubeValidationError
        The cube does not follow the schema.
    ArgumentError
        A size or count out of range.
    NoDataError
        An in-memory cube with no clear pixel on any date (lazy cubes: when written).
    """
    from cmsn_cube.baselines import days_of
    from cmsn_cube.samples import date_triplets  # each date with its two nearest dates
    from cmsn_cube.selfcheck import METHODS, METRICS

    check_positive(tile=tile, batch_size=batch_size, chunk=chunk)
    if method not in ("auto", *METHODS):
        raise ArgumentError(f"method must be 'auto' or one of {list(METHODS)}, got {method!r}")
    check_non_negative(overlap=overlap)
    if not 2 * overlap < tile:
        raise ArgumentError(f"overlap must be less than half a tile, got overlap={overlap}, tile={tile}")
    if chunk < tile:
        raise ArgumentError(f"chunk ({chunk} px) must be at least one tile ({tile} px)")
    input_store = cube.encoding.get("source")
    cube = ensure_cloud_mask(cube, min_dates=3)
    observed_dates = count_observed_dates(cube)
    if observed_dates.chunks is None:
        check_observed(observed_dates.values, what="the cube")
    spec = model_spec(model)
    device = default_device(device)
    # A task runs one row of a block's tiles (about a second on a CPU core) and that row is one chunk of the
    # output: small tasks keep every worker busy to the end, and a chunk is written as soon as it is finished,
    # without being gathered with others first.
    tilings = (
        AxisTiling.plan(cube.sizes["y"], tile=tile, overlap=overlap, chunk=tile - overlap),
        AxisTiling.plan(cube.sizes["x"], tile=tile, overlap=overlap, chunk=chunk),
    )
    triplets = tuple(date_triplets(cube))
    days = tuple(days_of(cube).tolist())  # the regression takes helper dates nearest first
    n_dates = cube.sizes["time"]
    quality = None
    if method == "auto":
        scores = _check_graph(cube, spec, triplets, days=days, device=device, seed=check_seed)
        quality = da.from_delayed(scores, shape=(n_dates, len(METHODS), len(METRICS)), dtype=np.float64)
        method_used = quality.map_blocks(_choice, drop_axis=[1, 2], dtype=np.uint8)
        methods: Any = method_used.to_delayed(optimize_graph=False)[0]  # every block waits for the choice
    else:
        method_used = np.full(n_dates, METHODS.index(method), dtype=np.uint8)
        methods = method_used
    finished = _block_graph(
        cube,
        spec,
        tilings,
        triplets,
        batch_size=batch_size,
        device=device,
        fill_unobserved=fill_unobserved,
        methods=methods,
        days=days,
    )
    # each chunk is one item of its block's outputs (no copy: da.from_delayed + da.block copied every chunk)
    token = dask.base.tokenize(*(block.key for block in finished.values()))
    variables = {}
    for name, (dims, dtype, _) in OUTPUT_VARIABLES.items():
        array_name = f"cmsn-{name}-{token}"
        leading = (0,) * (len(dims) - 2)
        layer: dict[Any, Any] = {
            (array_name, *leading, i, j): (operator.getitem, block.key, name) for (i, j), block in finished.items()
        }
        graph = HighLevelGraph.from_collections(array_name, layer, dependencies=list(finished.values()))
        chunks = ((n_dates,), *(((len(BANDS),),) if "band" in dims else ()), *(t.output_chunks for t in tilings))
        variables[name] = (dims, da.Array(graph, array_name, chunks, meta=np.empty((0,) * len(dims), dtype=dtype)))
    result = _assemble(cube, variables, spec)
    result["observed_dates"] = observed_dates.chunk(
        {"y": tilings[0].output_chunks, "x": tilings[1].output_chunks}
    ).assign_attrs(long_name="dates with a clear observation of the pixel", units="1")
    result["method_used"] = xr.DataArray(
        method_used,
        dims="time",
        attrs={
            "long_name": "filler of each date's gaps",
            "flag_values": list(range(len(METHODS))),
            "flag_meanings": " ".join(METHODS),
        },
    )
    if quality is not None:
        result["quality"] = xr.DataArray(
            quality,
            dims=("time", "method", "metric"),
            coords={"method": list(METHODS), "metric": list(METRICS)},
            attrs={"long_name": "scene self-check: hidden clear pixels filled by each method, scored"},
        )
    options = {"tile": tile, "overlap": overlap, "chunk": chunk, "fill_unobserved": fill_unobserved}
    result.attrs.update(
        input_fingerprint=input_fingerprint(cube),
        tiling=json.dumps({**options, "method": method, "check_seed": check_seed}),
    )
    if input_store:
        result.attrs["input_store"] = input_store
    return result


def _check_graph(
    cube: xr.Dataset,
    spec: ModelSpec,
    triplets: tuple[tuple[int, int, int], ...],
    *,
    days: tuple[float, ...],
    device: str,
    seed: int,
) -> Any:
    """The Delayed scores of the scene self-check: one task per sample (a window read from the store's chunks,
    one date hidden, filled by every method), and one that pools them.
    """
    from cmsn_cube.selfcheck import combine_samples, plan_samples, sample_windows, samples_needed

    reflectance = cube["reflectance"].transpose("time", "band", "y", "x").data
    cloud_mask = cube["cloud_mask"].transpose("time", "y", "x").data
    arrays = (_Chunks(reflectance), _Chunks(cloud_mask))
    windows = sample_windows((cube.sizes["y"], cube.sizes["x"]))
    token = dask.base.tokenize(reflectance, cloud_mask, spec.sha256, triplets, device, seed)
    reads = []
    for k, (row, col, height, width) in enumerate(windows):
        rows, cols = slice(row, row + height), slice(col, col + width)
        regions = [array.region(rows, cols) for array in arrays]
        reads.append(
            dask.delayed(_read_window, pure=True)(
                *regions, origin=(row, col), dask_key_name=f"cmsn-check-read-{token}-{k}"
            )
        )
    masks = [dask.delayed(operator.getitem, pure=True)(read, 1) for read in reads]
    model = dask.delayed(spec, pure=True, traverse=False)
    samples = [
        dask.delayed(_run_check_sample, pure=True)(
            reads[window],
            masks,
            date=date,
            window=window,
            spec=model,
            triplets=triplets,
            days=days,
            device=device,
            seed=(seed, k),
            dask_key_name=f"cmsn-check-sample-{token}-{k}",
        )
        for k, (date, window) in enumerate(plan_samples(len(windows), len(triplets), samples_needed(len(triplets))))
    ]
    return dask.delayed(combine_samples, pure=True)(samples, len(triplets), dask_key_name=f"cmsn-check-{token}")


def _read_window(reflectance: Any, cloud_mask: Any, *, origin: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A sample window of the self-check, its reflectance checked as it is read."""
    return _checked_reflectance(reflectance, origin), np.asarray(_join(cloud_mask), dtype=bool)


def _run_check_sample(
    read: tuple[np.ndarray, np.ndarray],
    masks: list[np.ndarray],
    *,
    date: int,
    window: int,
    spec: ModelSpec,
    triplets: tuple[tuple[int, int, int], ...],
    days: tuple[float, ...],
    device: str,
    seed: tuple[int, int],
) -> Any:
    """One sample of the scene self-check (see :func:`cmsn_cube.selfcheck.check_sample`)."""
    from cmsn_cube.selfcheck import check_sample

    weighted: dict[str, np.ndarray] = {}  # the two regressions share it: run once per sample

    def fill(method: str, channels: np.ndarray, triplet: tuple[int, ...]) -> np.ndarray:
        options = {"spec": spec, "device": device, "days": [days[d] for d in triplet]}
        if method != "cmsn" and "output" not in weighted:
            weighted["output"] = run_filler("weighted-regression", channels[None], **options)  # type: ignore[arg-type]
        if method == "weighted-regression":
            return weighted["output"][0]
        wanted = [triplet.index(date)]  # only the hidden date is scored
        return run_filler(method, channels[None], targets=wanted, weighted=weighted.get("output"), **options)[0]  # type: ignore[arg-type]

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


def _choice(scores: np.ndarray) -> np.ndarray:
    from cmsn_cube.selfcheck import METHODS, choose

    return np.array([METHODS.index(method) for method in choose(scores)], dtype=np.uint8)


def count_observed_dates(cube: xr.Dataset) -> xr.DataArray:
    """``(y, x)`` uint16: the dates with a clear observation (not cloud, no band NaN) of each pixel (lazy)."""
    clear = ~cube["cloud_mask"] & cube["reflectance"].notnull().all("band")
    return clear.sum("time").astype(np.uint16).rename("observed_dates")


def check_observed(observed_dates: np.ndarray, *, what: str) -> None:
    """Raise :class:`NoDataError` when no pixel was ever observed clear; warn with the share never observed."""
    if observed_dates.size == 0 or not observed_dates.any():
        raise NoDataError(f"{what} has no clear pixel on any date (all cloud or no data): nothing to reconstruct from")
    never = int((observed_dates == 0).sum())
    if never > 0:
        warnings.warn(
            f"{never} pixels ({100 * never / observed_dates.size:.2f} %) of {what} are observed on no date: they stay NaN "
            "(flagged 2 in 'filled'), or are the network's guess with fill_unobserved=True (flagged 3)",
            CMSNCubeWarning,
            stacklevel=3,
        )


def input_fingerprint(cube: xr.Dataset) -> str:
    """A digest of what a reconstruction reads: the data (their content when in memory; for lazy data their
    graph, which names the store, its modification time and every operation), the store's write id, the
    times, the grid and the CRS. Any change gives another digest, so a resumed write never mixes inputs.
    """
    from cmsn_cube.cube import crs_of
    from cmsn_cube.store import WRITE_ID_ATTR

    parts = (
        dask.base.tokenize(cube["reflectance"].data, cube["cloud_mask"].data),
        cube.attrs.get(WRITE_ID_ATTR),
        cube["time"].values.astype("datetime64[ns]").astype("int64").tolist(),
        [float(v) for v in (cube.y[0], cube.y[-1], cube.x[0], cube.x[-1])],
        cube.sizes["y"],
        cube.sizes["x"],
        str(crs_of(cube)),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _block_graph(
    cube: xr.Dataset,
    spec: ModelSpec,
    tilings: tuple[AxisTiling, AxisTiling],
    triplets: tuple[tuple[int, int, int], ...],
    *,
    batch_size: int,
    device: str,
    fill_unobserved: bool,
    methods: Any,
    days: tuple[float, ...],
) -> dict[tuple[int, int], Any]:
    """One Delayed dict of outputs per block ``(i, j)`` of ``tilings``; ``methods``: the filler index per date
    (an array, or the Delayed choice of the scene self-check, which every block then waits for).

    Block ``(i, j)`` reads its pixels plus the ``overlap`` after them from the store's chunks, runs its tiles,
    and is finished with the strips that blocks ``(i-1, j)``, ``(i, j-1)`` and ``(i-1, j-1)`` spilled over its
    start, ``overlap`` pixels wide: the only data that moves between blocks, and only forward.
    """
    reflectance = cube["reflectance"].transpose("time", "band", "y", "x").data
    cloud_mask = cube["cloud_mask"].transpose("time", "y", "x").data
    model = dask.delayed(spec, pure=True, traverse=False)  # one graph key: shipped once to each worker
    token = dask.base.tokenize(
        reflectance, cloud_mask, spec.sha256, tilings, triplets, batch_size, device, fill_unobserved, methods
    )
    arrays = (_Chunks(reflectance), _Chunks(cloud_mask))
    ny, nx = (t.n_blocks for t in tilings)
    sums = {}
    for i in range(ny):
        for j in range(nx):
            sources = (tilings[0].block_source(i), tilings[1].block_source(j))
            rows, cols = (slice(int(s.min()), int(s.max()) + 1) for s in sources)
            sums[i, j] = dask.delayed(_block_sums, pure=True)(
                *(array.region(rows, cols) for array in arrays),
                sources=(sources[0] - rows.start, sources[1] - cols.start),
                spec=model,
                tilings=tilings,
                index=(i, j),
                origin=(rows.start, cols.start),
                triplets=triplets,
                days=days,
                methods=methods,
                batch_size=batch_size,
                device=device,
                dask_key_name=f"cmsn-tiles-{token}-{i}-{j}",
            )
    finished = {}
    for i in range(ny):
        for j in range(nx):
            core = (slice(0, tilings[0].output_chunks[i]), slice(0, tilings[1].output_chunks[j]))
            # what the tiles of the block above / to the left lay past their own block's end
            above = tilings[0].spill(i - 1) if i > 0 else None
            left = tilings[1].spill(j - 1) if j > 0 else None
            spilling = {"above": (i - 1, j, above, core[1]), "left": (i, j - 1, core[0], left)}
            spilling["diagonal"] = (i - 1, j - 1, above, left)
            strips = tuple(
                dask.delayed(_spilled_strip, pure=True)(
                    sums[si, sj], rows, cols, dask_key_name=f"{STRIP_PREFIX}{token}-{i}-{j}-{side}"
                )
                if rows is not None and cols is not None
                else None
                for side, (si, sj, rows, cols) in spilling.items()
            )
            finished[i, j] = dask.delayed(_finish_block, pure=True, nout=None)(
                sums[i, j],
                *strips,
                core=core,
                triplets=triplets,
                fill_unobserved=fill_unobserved,
                dask_key_name=f"cmsn-block-{token}-{i}-{j}",
            )
    return finished


def _assemble(cube: xr.Dataset, variables: dict[str, tuple[tuple[str, ...], da.Array]], spec: ModelSpec) -> xr.Dataset:
    from cmsn_cube.cube import crs_of, set_crs

    coords = cube["reflectance"].coords
    out = xr.Dataset(
        {
            name: xr.DataArray(
                data,
                dims=dims,
                coords={k: v for k, v in coords.items() if set(v.dims) <= set(dims)},
                attrs=OUTPUT_VARIABLES[name][2],
            )
            for name, (dims, data) in variables.items()
        },
        attrs={**cube.attrs, "model": spec.name, "model_sha256": spec.sha256},
    )
    return set_crs(out, crs_of(cube))


# ------------------------------------------------------------------------------------------ writing


#: Attribute of a reconstruction store: what it was made from (:func:`_record`); a resume needs the same.
RECORD_ATTR = "cmsn_cube_reconstruction"

WriteState = Literal["new", "resume", "complete", "replace"]


def _region_marker(path: str, key: str) -> str:
    # inside the store, so that deleting or replacing the store deletes them too
    from cmsn_cube.store import REGIONS_FOLDER

    return f"{path}/{REGIONS_FOLDER}/{key}"


def _write_region(*arrays: np.ndarray, path: str, index: dict[str, tuple[slice, ...]], key: str) -> str:
    """Write one block of every variable (``arrays`` in the order of ``index``) straight into the Zarr arrays,
    then leave a marker (for resuming).
    """
    import fsspec
    import zarr

    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(path, mode="r+")
        for (name, where), values in zip(index.items(), arrays, strict=True):
            group[name][where] = values  # type: ignore[index]  # an Array here, never a Group
    with fsspec.open(_region_marker(path, key), "w", auto_mkdir=True) as marker:
        marker.write("done")
    return key


def _record(result: xr.Dataset) -> dict[str, Any]:
    """What a reconstruction store is made from: input, model, times, grid, tiling, variables and chunks."""
    from cmsn_cube.cube import crs_of

    return {
        "input_fingerprint": result.attrs.get("input_fingerprint"),
        "model_sha256": result.attrs.get("model_sha256"),
        "tiling": result.attrs.get("tiling"),
        "times": [str(t) for t in result["time"].values.astype("datetime64[s]")],
        "sizes": {str(dim): int(size) for dim, size in result.sizes.items()},
        "grid": [float(v) for v in (result.y[0], result.y[-1], result.x[0], result.x[-1])],
        "crs": str(crs_of(result)),
        "chunks": {str(name): list(_store_chunks(result, name)) for name in result.data_vars},
    }


def reconstruction_state(result: xr.Dataset, path: str | os.PathLike[str], *, overwrite: bool = False) -> WriteState:
    """What :func:`write_reconstruction` would do at ``path``, or the error it would raise.

    ``"new"``: nothing there (or an empty folder); ``"resume"``: this tool's unfinished output of the same
    input, model, times, grid and tiling; ``"complete"``: the same, finished (a rerun is a no-op);
    ``"replace"``: another Zarr store, replaced because ``overwrite`` is set.

    Raises
    ------
    StoreError
        ``path`` is the reconstruction's own input (even with ``overwrite``), is not a Zarr store (never
        deleted), or holds another store and ``overwrite`` is not set (the message says what differs).
    """
    import zarr

    from cmsn_cube.store import COMPLETE_ATTR, same_store, store_path, writable_kind

    path = store_path(path)
    source = result.attrs.get("input_store")
    if source and same_store(source, path):
        raise StoreError(f"{path} is the input of this reconstruction: write it to another path")
    if writable_kind(path) != "zarr":
        return "new"
    try:
        group = zarr.open_group(path, mode="r")
        attrs, members = dict(group.attrs), set(group.array_keys())
    except Exception:  # a damaged store is a foreign one
        attrs, members = {}, set()
    text = attrs.get(RECORD_ATTR)
    stored = json.loads(text) if isinstance(text, str) else None
    record = json.loads(json.dumps(_record(result)))
    if stored == record:
        return "complete" if attrs.get(COMPLETE_ATTR) is True else "resume"
    if overwrite:
        return "replace"
    if stored is None:
        what = "a cube" if "reflectance" in members else "a Zarr store that is not a reconstruction of cmsn-cube"
        raise StoreError(f"{path} holds {what}; pass overwrite=True (--overwrite) to replace it")
    differs = sorted(key for key in record if stored.get(key) != record[key])
    raise StoreError(
        f"{path} holds a reconstruction with another {', '.join(differs)}; "
        "pass overwrite=True (--overwrite) to replace it, or write to another path"
    )


def write_reconstruction(
    result: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    max_regions: int | None = None,
) -> str:
    """Write a (lazy) reconstruction to Zarr region by region; a killed run resumes from the regions written.

    Nothing is lost: the reconstruction's own input is never written over, and any other store at ``path``
    only with ``overwrite``, never a folder that is not a Zarr store. The store records what it is made from
    (input fingerprint, model, times, grid, tiling, chunks); calling this again with the same reconstruction
    resumes an unfinished store (each output chunk is written by its own task, which then leaves a marker
    inside the store) and leaves a finished one as it is. The store opens (:func:`cmsn_cube.open_reconstruction`)
    only once every region is written. On a Dask client the regions stream through the workers in raster
    order, a few per worker thread at a time, so memory does not grow with the scene; without one the
    configured local scheduler computes them all at once.

    Parameters
    ----------
    result : xarray.Dataset
        Output of :func:`reconstruct`.
    path : str or path-like
        Store location (local folder or fsspec URL).
    overwrite : bool
        Replace another Zarr store at ``path`` (another input, model or tiling, or not a reconstruction).
    progress : bool
        Show a progress bar over regions.
    max_regions : int, optional
        Write at most this many regions and stop, leaving the store resumable (for batch jobs with a time
        limit: each job writes a share, the last one completes the store).

    Returns
    -------
    str
        The store's path.

    Raises
    ------
    StoreError
        See :func:`reconstruction_state`; or a chunk of the input store is missing or corrupt (named).
    NoDataError
        The input has no clear pixel on any date. A warning names the share of pixels observed on no date.
    """
    import zarr

    from cmsn_cube.store import (
        filesystem,
        mark_store_complete,
        remove_store,
        store_compressors,
        store_path,
        write_template,
    )

    check_positive(max_regions=max_regions)
    path = store_path(path)
    # per-date coordinates of a pulled store (cloud fraction, sensor, SLC-off) come lazily, a date a chunk: they
    # are a few bytes, and the template writes only what is in memory
    lazy = [name for name, coord in result.coords.items() if name not in result.dims and coord.chunks is not None]
    result = result.assign_coords({name: result[name].variable.compute() for name in lazy})
    state = reconstruction_state(result, path, overwrite=overwrite)
    if state == "complete":
        return path
    # First, one read of the input's mask and no-data pattern (an empty scene is refused before anything is
    # written) and the small variables (the self-check's scores and choice): computed once, then written
    # directly and handed to the region tasks as values.
    precomputed = ["observed_dates", *(name for name in result.data_vars if not {"y", "x"} <= set(result[name].dims))]
    with _naming_damaged_chunks(result.attrs.get("input_store")):
        values = dict(zip(precomputed, dask.compute(*(result[name].data for name in precomputed)), strict=True))
    check_observed(values["observed_dates"], what=f"the input of {path}")
    fs, root = filesystem(path)
    if state in ("new", "replace"):
        remove_store(path)
        template = result.copy()
        for name, variable in template.data_vars.items():
            variable.encoding = {"chunks": _store_chunks(result, name), "compressors": store_compressors()}
        template.attrs[RECORD_ATTR] = json.dumps(_record(result))
        write_template(template, path)
    # also on a resume: a run killed right after the template never wrote them
    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(path, mode="r+")
        for name, value in values.items():
            group[name][...] = value  # type: ignore[index]
    names = [str(name) for name in result.data_vars if name not in values]
    graph_values = _as_graph_values(result, {str(name): value for name, value in values.items()})
    result = result[names]
    result = result.chunk({dim: -1 for dim in result.dims if dim not in ("y", "x")})
    y_chunks, x_chunks = result.chunks["y"], result.chunks["x"]
    # One low-level graph of the chunks as they are, and a write task per region on top of it. Not optimised:
    # dask.optimize works on each variable's graph on its own and fused the block task that finishes all four
    # variables into each of them (four runs per block); and not dask.delayed per region, which culled the whole
    # graph for each region (1.2 s for the 95 regions of a 4096² scene, before the first could start).
    arrays = [result[name].data for name in names]
    graph: dict[Any, Any] = dict(HighLevelGraph.merge(*(array.__dask_graph__() for array in arrays)))
    graph.update((key, value) for key, value in graph_values.items() if key in graph)  # computed above: not again
    token = dask.base.tokenize(path, *(array.name for array in arrays))
    regions: dict[tuple[int, int], Any] = {}  # write keys, in raster order: a region's strips come before it
    for i, _ in enumerate(y_chunks):
        for j, _ in enumerate(x_chunks):
            key = f"{i}_{j}"
            if state == "resume" and fs.exists(_region_marker(root, key)):
                continue
            ys = slice(sum(y_chunks[:i]), sum(y_chunks[: i + 1]))
            xs = slice(sum(x_chunks[:j]), sum(x_chunks[: j + 1]))
            chunks: list[tuple[Any, ...]] = []
            index: dict[str, tuple[slice, ...]] = {}
            for name, array in zip(names, arrays, strict=True):
                dims = result[name].dims
                chunks.append((array.name, *(i if d == "y" else j if d == "x" else 0 for d in dims)))
                index[name] = tuple(ys if d == "y" else xs if d == "x" else slice(None) for d in dims)
            regions[i, j] = f"cmsn-write-{token}-{key}"
            graph[regions[i, j]] = (functools.partial(_write_region, path=path, index=index, key=key), *chunks)
    finishing = max_regions is None or len(regions) <= max_regions
    regions = dict(itertools.islice(regions.items(), max_regions))
    with _naming_damaged_chunks(result.attrs.get("input_store")):
        _compute_regions(graph, regions, progress=progress, description=f"writing {os.path.basename(path)}")
    if not finishing:
        return path
    markers = _region_marker(root, "").rstrip("/")
    if fs.exists(markers):
        fs.rm(markers, recursive=True)
    mark_store_complete(path)
    return path


def _as_graph_values(result: xr.Dataset, values: dict[str, np.ndarray]) -> dict[Any, np.ndarray]:
    """The chunk keys of the lazy variables in ``values`` and their computed chunks."""
    keys: dict[Any, np.ndarray] = {}
    for name, value in values.items():
        data = result[name].data
        if isinstance(data, da.Array):
            for index in np.ndindex(*data.numblocks):
                where = tuple(slice(sum(c[:i]), sum(c[: i + 1])) for c, i in zip(data.chunks, index, strict=True))
                keys[(data.name, *index)] = value[where]
    return keys


@contextlib.contextmanager
def _naming_damaged_chunks(source: str | None) -> Iterator[None]:
    """Re-raise a failure to read the input as a :class:`StoreError` naming the damaged chunk when there is one
    (a codec error names neither file nor variable).
    """
    try:
        yield
    except CMSNCubeError:
        raise
    except Exception:
        if source:
            from cmsn_cube.store import check_chunk_files

            check_chunk_files(source, decode=True)
        raise


def _store_chunks(result: xr.Dataset, name: Any) -> tuple[int, ...]:
    """The Zarr chunks of variable ``name``: one date, and the Dask chunks along y/x (one region each).

    Read from the variable itself: the dataset's ``chunks`` also count coordinates, and a store's per-date
    coordinates (``cloud_fraction``, ``sensor``, ``slc_off``) come back in chunks of one date.
    """
    chunks = result[name].variable.chunksizes
    return tuple(
        1 if d == "time" else chunks[d][0] if d in chunks and d in ("y", "x") else result.sizes[d]
        for d in result[name].dims
    )


def _compute_regions(
    graph: dict[Any, Any], regions: dict[tuple[int, int], Any], *, progress: bool, description: str
) -> None:
    """Compute the ``regions`` (write keys of ``graph``) with a tqdm bar: streamed on the active Dask client,
    else at once on the configured local scheduler.

    On a client (:func:`_stream_regions`) memory stays bounded however large the scene; the local schedulers
    get the whole graph at once and order it themselves.
    """
    from tqdm import tqdm

    if not regions:
        return
    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if client is None:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc=description, disable=not progress):
            scheduler = dask.base.get_scheduler() or dask.threaded.get  # the configured one, else threads
            needed, _ = dask.optimization.cull(graph, list(regions.values()))  # the local schedulers run every task
            scheduler(needed, list(regions.values()))
        return
    with tqdm(total=len(regions), desc=description, unit="region", disable=not progress) as bar:
        _stream_regions(client, graph, regions, on_done=bar.update)


#: Regions in flight per worker thread while streaming a write. Measured on a 4096² scene with two 1-thread
#: workers: 2 left each worker idle ~3 s waiting for reads and re-read 3.4x the store; 4 cut both in half.
_REGIONS_PER_THREAD = 4


def _stream_regions(
    client: Any, graph: dict[Any, Any], regions: dict[tuple[int, int], Any], *, on_done: Callable[[int], Any]
) -> None:
    """Submit the ``regions`` (write keys of ``graph``) in raster order, keeping :data:`_REGIONS_PER_THREAD`
    per worker thread in flight.

    Given the whole graph at once, the scheduler's static order wanders over the scene and keeps the rows of
    tiles it has run waiting for neighbours it reaches much later (a front across the scene, growing with it).
    Submitted in raster order, a region only needs strips that regions submitted before it spill over its
    start: the futures of those strips are held from the submission of the region that spills them to the
    submission of the one that takes them, so no tile runs twice and nothing else waits.
    """
    from dask.core import get_dependencies
    from distributed import wait

    strips: dict[tuple[int, int], list[tuple[tuple[int, int], Any]]] = {}  # spilling block -> (receiver, key)
    for key in graph:
        if isinstance(key, str) and key.startswith(STRIP_PREFIX):
            *_, i, j, side = key.rsplit("-", 3)
            di, dj = _STRIP_SOURCE[side]
            strips.setdefault((int(i) + di, int(j) + dj), []).append(((int(i), int(j)), key))

    def upstream(keys: list[Any]) -> dict[Any, Any]:
        needed, stack = {}, list(keys)
        while stack:
            key = stack.pop()
            if key not in needed:
                needed[key] = graph[key]
                stack.extend(get_dependencies(graph, key))
        return needed

    window = _REGIONS_PER_THREAD * sum(client.nthreads().values())
    held: dict[tuple[int, int], list[Any]] = {}  # receiving region -> futures of its strips
    in_flight: set[Any] = set()
    for index, region in regions.items():
        if len(in_flight) >= window:
            done, in_flight = wait(in_flight, return_when="FIRST_COMPLETED")
            for future in done:
                future.result()  # raises a failed region's error
            on_done(len(done))
        spilled = strips.get(index, [])
        keys = [region, *(key for _, key in spilled)]
        write, *strip_futures = client.get(upstream(keys), keys, sync=False)
        in_flight.add(write)
        for (receiver, _), future in zip(spilled, strip_futures, strict=True):
            held.setdefault(receiver, []).append(future)
        held.pop(index, None)  # now kept by this region's tasks
    for future in wait(in_flight).done:
        future.result()
    on_done(len(in_flight))


def predict_window(cube: xr.Dataset, *, model: ModelLike = None, device: str | None = None) -> xr.Dataset:
    """Run the network once on a small three-date cube (a window) and keep every stage of its output.

    For figures and inspection: ``coarse``, ``refined`` and ``output`` (time, band, y, x); for whole scenes use
    :func:`reconstruct`. Computes.
    """
    import torch

    cube = ensure_cloud_mask(cube, min_dates=3)
    if cube.sizes["time"] != 3:
        raise CubeValidationError(
            f"predict_window takes exactly 3 dates, got {cube.sizes['time']}; select them with .isel(time=[...])"
        )
    spec = model_spec(model)
    device = default_device(device)
    channels, _ = model_inputs(cube)
    with torch.inference_mode():
        prediction = _model_on_worker(spec, device)(torch.from_numpy(np.asarray(channels.values)[None]).to(device))
    coords = cube["reflectance"].coords
    stages = {
        name: xr.DataArray(
            getattr(prediction, name)[0].float().cpu().numpy(), dims=("time", "band", "y", "x"), coords=coords
        )
        for name in ("coarse", "refined", "output")
    }
    return xr.Dataset(stages, attrs={"model": spec.name, "model_sha256": spec.sha256})
