"""Every Dask graph of a reconstruction: blocks, strips, the self-check, the output arrays, the streamed write.

A block ``(i, j)`` reads its pixels plus the ``overlap`` after them from the store's chunks, runs its tiles
(:func:`cmsn_cube.inference.tasks.block_sums`), and is finished
(:func:`cmsn_cube.inference.tiling.finish_block`) with the strips that blocks ``(i-1, j)``, ``(i, j-1)`` and
``(i-1, j-1)`` spilled over its start: the only data that moves between blocks, and only forward.
:func:`block_graph` returns the finished blocks and, as data, which block spills which strip to which block
(a :class:`StripMap`); :func:`output_arrays` keeps that map in the output arrays' graph, where the streamed
write (:func:`compute_regions`) reads it back. No task key is ever parsed.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import dask
import dask.array as da
import dask.optimization
import dask.threaded
import numpy as np
import xarray as xr
from dask._task_spec import convert_legacy_graph  # dask >= 2024.12: graphs of task specs
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from cmsn_cube.cube import BANDS
from cmsn_cube.inference import tasks, tiling
from cmsn_cube.inference.models import ModelSpec
from cmsn_cube.inference.tiling import Tilings, block_core

Key = Any  # a Dask key: a string or a tuple (name, *index)
Index = tuple[int, int]  # a block, an output chunk and a written region: (row, column)

#: The key under which the output arrays' graph layers carry the :class:`StripMap` (``collection_annotations``:
#: Dask keeps them with the layer and never sends them to the scheduler).
STRIPS_ANNOTATION = "cmsn_strips"


class ChunkRegions:
    """An array (numpy or Dask) cut into the regions that tasks receive.

    A Dask array is handed over as the whole chunks that cover a region (``to_delayed``), which the task joins
    (:func:`cmsn_cube.inference.tasks.join`). Slicing it instead lets Dask fuse the store read into every part of
    every slice: 3756 read tasks instead of 774 for a streamed 4096² write (512 px chunks on disk), 8.4 s of
    reading instead of 2.7 s. A chunk is read once per computation, and once more in a streamed write when the
    regions that share it are not in flight together.
    """

    def __init__(self, array: Any) -> None:
        self.array = array
        if isinstance(array, da.Array):
            self.parts = array.to_delayed()
            self.bounds = [np.cumsum((0, *chunks)) for chunks in array.chunks]

    def region(self, rows: slice, cols: slice) -> Any:
        """Return ``array[..., rows, cols]``: a numpy view, or the covering chunks with their offsets."""
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


def _input_regions(cube: xr.Dataset) -> tuple[ChunkRegions, ChunkRegions]:
    """Return the cube's reflectance ``(time, band, y, x)`` and cloud mask ``(time, y, x)``, ready to cut."""
    reflectance = cube["reflectance"].transpose("time", "band", "y", "x").data
    cloud_mask = cube["cloud_mask"].transpose("time", "y", "x").data
    return ChunkRegions(reflectance), ChunkRegions(cloud_mask)


@dataclass(frozen=True)
class StripMap:
    """Which block spills which strip over which later block: ``{spilling block: ((receiving block, key), ...)}``."""

    spilled: Mapping[Index, tuple[tuple[Index, Key], ...]]

    def __repr__(self) -> str:  # shown in the graph's HTML view: keep it short
        return f"StripMap({sum(len(strips) for strips in self.spilled.values())} strips)"

    @classmethod
    def of(cls, graph: HighLevelGraph) -> StripMap:
        """Return the strips that :func:`output_arrays` left in ``graph``'s layers (none when there are none)."""
        spilled: dict[Index, tuple[tuple[Index, Key], ...]] = {}
        for layer in graph.layers.values():
            found = (layer.collection_annotations or {}).get(STRIPS_ANNOTATION)
            if isinstance(found, StripMap):
                spilled.update(found.spilled)
        return cls(spilled)


@dataclass(frozen=True)
class BlockGraph:
    """A scene's blocks in the graph: each block's tile run and finished outputs (Delayed), and the strips."""

    #: per block, the Delayed :func:`~cmsn_cube.inference.tasks.block_sums` of its tiles
    tiles: dict[Index, Any]
    #: per block, the Delayed dict of its outputs (:func:`~cmsn_cube.inference.tiling.finish_block`)
    blocks: dict[Index, Any]
    strips: StripMap


def block_graph(
    cube: xr.Dataset,
    spec: ModelSpec,
    tilings: Tilings,
    triplets: tuple[tuple[int, int, int], ...],
    *,
    batch_size: int,
    device: str,
    fill_unobserved: bool,
    methods: Any,
    days: tuple[float, ...],
    quality: Any = None,
) -> BlockGraph:
    """Build one Delayed dict of outputs per block ``(i, j)`` of ``tilings``, and the strips between them.

    ``methods``: the filler index per date (an array, or the Delayed choice of the scene self-check, which every
    block then waits for); ``quality``: the self-check's scores (Delayed), whose calibration factors scale the
    uncertainty (None: the default factor). The model is one graph key, shipped once to each worker.
    """
    arrays = _input_regions(cube)
    token = dask.base.tokenize(
        *(a.array for a in arrays), spec.sha256, tilings, triplets, batch_size, device, fill_unobserved, methods
    )
    options = {"triplets": triplets, "days": days, "methods": methods, "batch_size": batch_size, "device": device}
    sums = _tile_sums(arrays, dask.delayed(spec, pure=True, traverse=False), tilings, token, options)
    finish = {"triplets": triplets, "fill_unobserved": fill_unobserved, "days": days, "methods": methods}
    return _finished_blocks(sums, tilings, token, {**finish, "quality": quality})


def _tile_sums(
    arrays: tuple[ChunkRegions, ChunkRegions], model: Any, tilings: Tilings, token: str, options: dict[str, Any]
) -> dict[Index, Any]:
    """Return the Delayed :func:`~cmsn_cube.inference.tasks.block_sums` of every block."""
    sums = {}
    for i, j in itertools.product(*(range(t.n_blocks) for t in tilings)):
        sources = (tilings[0].block_source(i), tilings[1].block_source(j))
        rows, cols = (slice(int(s.min()), int(s.max()) + 1) for s in sources)
        sums[i, j] = dask.delayed(tasks.block_sums, pure=True)(
            *(array.region(rows, cols) for array in arrays),
            sources=(sources[0] - rows.start, sources[1] - cols.start),
            spec=model,
            tilings=tilings,
            index=(i, j),
            origin=(rows.start, cols.start),
            dask_key_name=f"cmsn-tiles-{token}-{i}-{j}",
            **options,
        )
    return sums


def _finished_blocks(sums: dict[Index, Any], tilings: Tilings, token: str, options: dict[str, Any]) -> BlockGraph:
    """Finish every block with the strips that the blocks above, to the left and diagonally spill over it."""
    finished = {}
    spilled: dict[Index, list[tuple[Index, Key]]] = {}
    for i, j in sums:
        core = block_core(tilings, (i, j))
        # what the tiles of the block above / to the left lay past their own block's end
        above = tilings[0].spill(i - 1) if i > 0 else None
        left = tilings[1].spill(j - 1) if j > 0 else None
        spilling = {"above": (i - 1, j, above, core[1]), "left": (i, j - 1, core[0], left)}
        spilling["diagonal"] = (i - 1, j - 1, above, left)
        strips: list[Any] = []
        for side, (si, sj, rows, cols) in spilling.items():
            if rows is None or cols is None:
                strips.append(None)
                continue
            strip = dask.delayed(tiling.spilled_strip, pure=True)(
                sums[si, sj], rows, cols, dask_key_name=f"cmsn-strip-{token}-{i}-{j}-{side}"
            )
            spilled.setdefault((si, sj), []).append(((i, j), strip.key))
            strips.append(strip)
        finished[i, j] = dask.delayed(tiling.finish_block, pure=True, nout=None)(
            sums[i, j],
            *strips,
            core=core,
            dask_key_name=f"cmsn-block-{token}-{i}-{j}",
            **options,
        )
    return BlockGraph(sums, finished, StripMap({block: tuple(strips) for block, strips in spilled.items()}))


def output_arrays(
    blocks: BlockGraph, tilings: Tilings, n_dates: int, variables: Mapping[str, tuple[tuple[str, ...], np.dtype]]
) -> dict[str, da.Array]:
    """Return one Dask array per output variable (``{name: (dims, dtype)}``): chunk ``(i, j)`` is block ``(i, j)``'s.

    Each chunk is one item of its block's outputs (no copy). The layers carry the :class:`StripMap`.
    """
    token = dask.base.tokenize(*(block.key for block in blocks.blocks.values()))
    arrays = {}
    for name, (dims, dtype) in variables.items():
        array_name = f"cmsn-{name}-{token}"
        leading = (0,) * (len(dims) - 2)
        chunk_tasks = {
            (array_name, *leading, i, j): (operator.getitem, block.key, name) for (i, j), block in blocks.blocks.items()
        }
        layer = MaterializedLayer(chunk_tasks, collection_annotations={STRIPS_ANNOTATION: blocks.strips})
        graph = HighLevelGraph.from_collections(array_name, layer, dependencies=list(blocks.blocks.values()))
        chunks = ((n_dates,), *(((len(BANDS),),) if "band" in dims else ()), *(t.output_chunks for t in tilings))
        arrays[name] = da.Array(graph, array_name, chunks, meta=np.empty((0,) * len(dims), dtype=dtype))
    return arrays


class SelfCheck(NamedTuple):
    """The scene self-check in the graph: its scores, the filler it picks per date, and that pick as one key."""

    quality: da.Array
    method_used: da.Array
    methods: Any
    #: ``quality``'s one chunk as a Delayed: what the blocks read the calibration factors from (a written
    #: reconstruction computes that chunk first and hands it to every region, as for ``methods``)
    scores: Any


def self_check(
    cube: xr.Dataset,
    spec: ModelSpec,
    triplets: tuple[tuple[int, int, int], ...],
    *,
    gap_pixels: Any,
    days: tuple[float, ...],
    device: str,
    seed: int,
) -> SelfCheck:
    """Build the scene self-check: one task per sample, one that pools their scores and one that picks.

    A sample is a window read from the store's chunks with one date hidden, filled by every method
    (:func:`cmsn_cube.inference.tasks.run_check_sample`). Only dates with pixels to fill (``gap_pixels``, per
    date, numpy or Dask) are sampled: a sample task past what those dates need returns at once.
    """
    from cmsn_cube.selfcheck import METHODS, METRICS, combine_samples, sample_window, sample_windows, samples_needed

    arrays = _input_regions(cube)
    windows = sample_windows((cube.sizes["y"], cube.sizes["x"]))
    token = dask.base.tokenize(*(a.array for a in arrays), spec.sha256, triplets, device, seed)
    reads = []
    for k, (row, col, height, width) in enumerate(windows):
        regions = [array.region(slice(row, row + height), slice(col, col + width)) for array in arrays]
        reads.append(
            dask.delayed(tasks.read_window, pure=True)(
                *regions, origin=(row, col), dask_key_name=f"cmsn-check-read-{token}-{k}"
            )
        )
    masks = [dask.delayed(operator.getitem, pure=True)(read, 1) for read in reads]
    model = dask.delayed(spec, pure=True, traverse=False)
    options = {"spec": model, "triplets": triplets, "days": days, "device": device}
    samples = [
        dask.delayed(tasks.run_check_sample, pure=True)(
            reads[sample_window(k, len(windows))],
            masks,
            gap_pixels,
            sample=k,
            window=sample_window(k, len(windows)),
            seed=(seed, k),
            dask_key_name=f"cmsn-check-sample-{token}-{k}",
            **options,
        )
        for k in range(samples_needed(len(triplets)))  # the most any set of dates with gaps needs
    ]
    scores = dask.delayed(combine_samples, pure=True)(samples, len(triplets), dask_key_name=f"cmsn-check-{token}")
    quality = da.from_delayed(scores, shape=(len(triplets), len(METHODS), len(METRICS)), dtype=np.float64)
    method_used = quality.map_blocks(tasks.choice, drop_axis=[1, 2], dtype=np.uint8)
    return SelfCheck(
        quality,
        method_used,
        method_used.to_delayed(optimize_graph=False)[0],
        quality.to_delayed(optimize_graph=False)[0, 0, 0],
    )


def computed_chunks(arrays: Mapping[str, Any], values: Mapping[str, np.ndarray]) -> dict[Key, np.ndarray]:
    """Return the chunk keys of the lazy ``arrays`` and their chunks, cut from the computed ``values``."""
    keys: dict[Key, np.ndarray] = {}
    for name, value in values.items():
        data = arrays[name]
        if isinstance(data, da.Array):
            for index in np.ndindex(*data.numblocks):
                where = tuple(slice(sum(c[:i]), sum(c[: i + 1])) for c, i in zip(data.chunks, index, strict=True))
                keys[(data.name, *index)] = value[where]
    return keys


class RegionGraph(NamedTuple):
    """A write task per region on top of the chunks of the arrays written: ``regions`` in raster order."""

    graph: dict[Key, Any]
    regions: dict[Index, Key]
    strips: StripMap

    def upstream(self, keys: list[Key], *, known: Collection[Key] = ()) -> dict[Key, Any]:
        """Return the part of the graph that ``keys`` need: they and everything they depend on.

        The walk stops at ``known`` keys (already on the cluster): they are left out, as are their own inputs.
        """
        from dask.core import get_dependencies

        needed, stack = {}, [key for key in keys if key not in known]
        while stack:
            key = stack.pop()
            if key not in needed:
                needed[key] = self.graph[key]
                stack.extend(k for k in get_dependencies(self.graph, key) if k not in known)
        return needed

    def shared(self) -> list[Key]:
        """Return the keys that every region needs (the model, the self-check's choice); none for one region.

        They do not depend on where a region lies, and each region's graph would carry them again.
        """
        if len(self.regions) < 2:
            return []
        needed = [set(self.upstream([region])) for region in self.regions.values()]
        return sorted(set.intersection(*needed), key=str)


def region_graph(
    arrays: Mapping[str, tuple[tuple[str, ...], da.Array]],
    writers: Mapping[Index, Callable[..., Any]],
    *,
    label: str,
    computed: Mapping[Key, np.ndarray],
) -> RegionGraph:
    """Build one low-level graph of the ``arrays`` (``{name: (dims, data)}``) and a write task per region.

    ``writers[i, j]`` takes the ``(i, j)`` chunk of every array, in order; the regions are written in the order
    of ``writers`` (raster order: a region's strips come before it). ``computed``: chunks already computed,
    put in the graph as values (not computed again).

    Not optimised: ``dask.optimize`` works on each variable's graph on its own and fused the block task that
    finishes all four variables into each of them (four runs per block); and not ``dask.delayed`` per region,
    which culled the whole graph for each region (1.2 s for the 95 regions of a 4096² scene, before the first
    could start).
    """
    merged = HighLevelGraph.merge(*(data.__dask_graph__() for _, data in arrays.values()))
    graph: dict[Key, Any] = dict(merged)
    graph.update((key, value) for key, value in computed.items() if key in graph)
    token = dask.base.tokenize(label, *(data.name for _, data in arrays.values()))
    regions = {}
    for (i, j), write in writers.items():
        chunks = [
            (data.name, *(i if d == "y" else j if d == "x" else 0 for d in dims)) for dims, data in arrays.values()
        ]
        regions[i, j] = f"cmsn-write-{token}-{i}_{j}"
        graph[regions[i, j]] = (write, *chunks)
    # as task specs, whose dependencies are explicit: a region's graph then leaves out keys already on the
    # cluster and still depends on them (in a tuple task, a key missing from the graph reads as a plain string)
    return RegionGraph(convert_legacy_graph(graph), regions, StripMap.of(merged))


def compute_regions(regions: RegionGraph, *, progress: bool, description: str) -> None:
    """Compute the write tasks with a tqdm bar: streamed on the active Dask client, else at once locally.

    On a client (:func:`_stream_regions`) memory stays bounded however large the scene; the local schedulers
    get the whole graph at once and order it themselves.
    """
    from tqdm import tqdm

    if not regions.regions:
        return
    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    keys = list(regions.regions.values())
    if client is None:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc=description, disable=not progress):
            scheduler = dask.base.get_scheduler() or dask.threaded.get  # the configured one, else threads
            needed, _ = dask.optimization.cull(regions.graph, keys)  # the local schedulers run every task
            scheduler(needed, keys)
        return
    with tqdm(total=len(keys), desc=description, unit="region", disable=not progress) as bar:
        _stream_regions(client, regions, on_done=bar.update)


#: Regions in flight per worker thread while streaming a write. Measured on a 4096² scene with two 1-thread
#: workers: 2 left each worker idle ~3 s waiting for reads and re-read 3.4x the store; 4 cut both in half.
_REGIONS_PER_THREAD = 4


def _stream_regions(client: Any, regions: RegionGraph, *, on_done: Callable[[int], Any]) -> None:
    """Submit the regions in raster order, keeping :data:`_REGIONS_PER_THREAD` per worker thread in flight.

    Given the whole graph at once, the scheduler's static order wanders over the scene and keeps the rows of
    tiles it has run waiting for neighbours it reaches much later (a front across the scene, growing with it).
    Submitted in raster order, a region only needs strips that regions submitted before it spill over its
    start: the futures of those strips (:attr:`RegionGraph.strips`) are held from the submission of the region
    that spills them to the submission of the one that takes them, so no tile runs twice and nothing else waits.
    """
    from distributed import wait

    window = _REGIONS_PER_THREAD * sum(client.nthreads().values())
    # what every region needs (the model's weights, the self-check): sent and kept once, not with each region
    shared = regions.shared()
    kept = client.get(regions.upstream(shared), shared, sync=False) if shared else []
    held: dict[Index, list[Any]] = {}  # receiving region -> futures of its strips
    in_flight: set[Any] = set()
    for index, region in regions.regions.items():
        if len(in_flight) >= window:
            done, in_flight = wait(in_flight, return_when="FIRST_COMPLETED")
            for future in done:
                future.result()  # raises a failed region's error
            on_done(len(done))
        spilled = regions.strips.spilled.get(index, ())
        keys = [region, *(key for _, key in spilled)]
        write, *strip_futures = client.get(regions.upstream(keys, known=shared), keys, sync=False)
        in_flight.add(write)
        for (receiver, _), future in zip(spilled, strip_futures, strict=True):
            held.setdefault(receiver, []).append(future)
        held.pop(index, None)  # now kept by this region's tasks
    for future in wait(in_flight).done:
        future.result()
    on_done(len(in_flight))
    del kept  # held to here: the scheduler forgets the shared keys once no future names them
