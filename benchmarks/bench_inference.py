"""Whole-scene reconstruction speed and memory: the Dask path against a plain torch loop over the same tiles.

For each scene size (default 2048² and 4096² pixels × 3 dates, written to a Zarr store first):

- plain loop: the whole padded scene in memory, the same global tiles, one process, torch on every core;
- Dask path: ``reconstruct(open_cube(store))`` on a LocalCluster of worker processes (one per core, one torch
  thread each, warmed up as the loop is), reading the store lazily: ``compute`` = every output variable computed and kept on the workers
  (the model, blending and NDVI), ``write`` = the same written region by region with ``write_reconstruction``,
  streamed in raster order (adds encoding and compressing the output store; the loop writes nothing).

Each path runs ``--repeat`` times and its fastest run is reported (the machine's noise only ever slows a
run). Prints wall times, throughput in megapixels of output per second (dates × H × W), the ratio of throughputs
(target ≥ 0.95), and the Dask path's memory during the write (all workers): idle RSS after warm-up, peak RSS,
and peak bytes of task results held (the target: no growth with the scene at a fixed chunk size). ``--full`` adds a Landsat-size 7,700² scene.
Also the classical weighted regression (``method="weighted-regression"``) computed the same way, and the network's
compute time as a multiple of it (what the network costs over the filler a user would pick instead).
The model's own forward rate is measured first in the same run; each size then prints the loop's and the
streamed write's rate as a share of that rate divided by the tile overhead (tile pixels run per scene pixel).
``--task-stream`` prints where the workers' time goes during the first streamed write (Dask's task stream: compute
seconds per kind of task, transfers, idle) and the CPU time of each worker and of this process (the scheduler, the
client and the memory sampler, which share the workers' cores). ``--to-zarr`` also writes the lazy result with xarray's ``to_zarr`` (the task order Dask's scheduler picks, no
resume records) with its time and worker memory, against the hand-made streamer of ``write_reconstruction``.

Run::

    make bench        # or:
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1 \\
        python benchmarks/bench_inference.py --sizes 2048 4096
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import psutil
import torch
import xarray as xr
from bench_model import make_inputs, time_it  # this folder: the script's own
from distributed import get_task_stream, wait

from cmsn_cube.cluster import get_client
from cmsn_cube.inference import (
    AxisTiling,
    ModelSpec,
    model_channels,
    model_on_worker,
    model_spec,
    reconstruct,
    tiles_to_run,
    write_reconstruction,
)
from cmsn_cube.model import CMSN, list_models, load_model
from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import open_cube, write_cube
from cmsn_cube.testing import claim_workdir


def plain_loop(store: str, model: torch.nn.Module, *, tile: int, overlap: int, batch_size: int) -> tuple[float, int]:
    """Seconds for one process to run the model over the scene's tiles, and how many tiles it ran.

    The same global tiles as the Dask path, skipping the same tiles with nothing to fill; the whole mirrored
    scene in memory; only the forward passes are timed (no reading, masking, blending or writing).
    """
    cube = open_cube(store).load()
    tilings = [AxisTiling.plan(cube.sizes[d], tile=tile, overlap=overlap, chunk=10**9) for d in ("y", "x")]
    rows, cols = (t.block_source(0) for t in tilings)
    channels, to_fill = model_channels(
        cube.reflectance.transpose("time", "band", "y", "x").values[:, :, rows][..., cols],
        cube.cloud_mask.transpose("time", "y", "x").values[:, rows][..., cols],
    )
    del cube  # a 6144² scene and all its batches at once did not fit in 24 GiB beside the workers
    corners = tiles_to_run(
        to_fill, [(int(y), int(x)) for y in tilings[0].starts for x in tilings[1].starts], (tile, tile)
    )

    def batch(first: int) -> torch.Tensor:
        return torch.from_numpy(
            np.stack([channels[:, :, y : y + tile, x : x + tile] for y, x in corners[first : first + batch_size]])
        )

    seconds = 0.0
    with torch.inference_mode():
        model(batch(0))  # warm-up, as the workers are warmed up
        for first in range(0, len(corners), batch_size):
            windows = batch(first)  # cut outside the timing: only the forward passes count
            start = time.perf_counter()
            model(windows)
            seconds += time.perf_counter() - start
    return seconds, len(corners)


def forward_rate(model: torch.nn.Module, *, tile: int, batch_size: int, repeats: int = 3) -> float:
    """The model's own forward rate in this process, megapixels of tile output per second (best of ``repeats``).

    bench_model.py's inputs and timing, in the same run as the scene paths, so that their ratios to it are not
    moved by the machine's state.
    """
    inputs = make_inputs(batch_size, tile)["inputs"]
    with torch.inference_mode():
        seconds = time_it(lambda: model(inputs), repeats=repeats)
    return batch_size * 3 * tile * tile / seconds / 1e6


#: Largest scene generated in one piece: the generator's working set at 6144² is ~15 GiB of this 24 GiB machine.
LARGEST_GENERATED = 6144


def scene(size: int) -> Any:
    """The embedded synthetic scene at ``size``² px (seed ``size``); above :data:`LARGEST_GENERATED`, four mirrored
    copies of one half the size, so that a Landsat-size scene fits in memory (its content is only tiles to run)."""
    if size <= LARGEST_GENERATED:
        return synthetic_scene(height=size, width=size, seed=size)
    half = synthetic_scene(height=(size + 1) // 2, width=(size + 1) // 2, seed=size).drop_vars(["truth", "land_cover"])
    mirrored = half.isel(y=slice(None, None, -1), x=slice(None, None, -1))
    top = xr.concat([half, mirrored.isel(y=slice(None, None, -1))], dim="x")
    bottom = xr.concat([mirrored.isel(x=slice(None, None, -1)), mirrored], dim="x")
    whole = xr.concat([top, bottom], dim="y").isel(y=slice(0, size), x=slice(0, size))
    spacing = float(half.x[1] - half.x[0]), float(half.y[1] - half.y[0])
    return whole.assign_coords(
        x=float(half.x[0]) + spacing[0] * np.arange(size), y=float(half.y[0]) + spacing[1] * np.arange(size)
    )


def write_scene(size: int, store: str) -> None:
    """Write the :func:`scene` of ``size`` to ``store`` in a child process.

    With the tuned allocator a process never gives memory back: generating a 6144² scene here left this process
    at ~15 GiB, and the plain loop over it was then killed for memory on a 24 GiB machine.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        child.submit(_write_scene, size, store).result()


def _write_scene(size: int, store: str) -> None:
    write_cube(scene(size), store)


def compute_seconds(client: Any, result: Any) -> float:
    """Seconds to compute the Dask arrays of a reconstruction onto the workers, which then drop them again.

    Only the Dask arrays (a forced method's ``method_used`` is a plain numpy array); dropped, not cancelled:
    distributed's cancel asserts on keys another collection shares. Returns once the scheduler holds nothing,
    else the next run would find the results in memory.
    """
    start = time.perf_counter()
    persisted = client.persist(
        [variable.data for variable in result.data_vars.values() if dask.is_dask_collection(variable.data)]
    )
    wait(persisted)  # computed and kept on the workers
    seconds = time.perf_counter() - start
    del persisted
    while client.run_on_scheduler(_tasks_held):
        time.sleep(0.1)
    return seconds


def task_stream_summary(records: list[dict[str, Any]], *, top: int = 8) -> str:
    """Summarise Dask's task stream: tasks, busy and idle seconds per worker, compute seconds per kind of task.

    A task's kind is its key's name without the token and the region numbers (``cmsn-tiles``, ``open_dataset-
    reflectance``, ...); idle is the stream's span minus what each worker spent computing.
    """
    busy: dict[str, float] = {}
    kinds: dict[str, list[float]] = {}
    transfer = 0.0
    starts, stops = [], []
    for record in records:
        key = record["key"] if isinstance(record["key"], str) else record["key"][0]
        kind = "-".join(part for part in key.split("-") if not re.fullmatch(r"[0-9a-f]{6,}|[0-9_]+", part))
        for step in record["startstops"]:
            seconds = step["stop"] - step["start"]
            starts.append(step["start"])
            stops.append(step["stop"])
            if step["action"] == "compute":
                busy[record["worker"]] = busy.get(record["worker"], 0.0) + seconds
                kinds.setdefault(kind, []).append(seconds)
            else:
                transfer += seconds
    span = max(stops) - min(starts)
    total = sum(busy.values())
    lines = [
        f"  {len(records)} tasks over {span:.1f} s; computing {total:.1f} worker-s, idle "
        f"{len(busy) * span - total:.1f} worker-s, transfers {transfer:.1f} s"
    ]
    for kind, seconds in sorted(kinds.items(), key=lambda item: -sum(item[1]))[:top]:
        lines.append(f"  {sum(seconds):7.1f} s {100 * sum(seconds) / total:5.1f} %  {len(seconds):5d} x {kind}")
    return "\n".join(lines)


def _warm_up(spec: ModelSpec, tile: int, batch_size: int) -> None:
    """Load the model in this worker and run a first forward pass (what the loop's warm-up batch does)."""
    model = model_on_worker(spec, "cpu")
    with torch.inference_mode():
        model(torch.zeros(batch_size, 3, 5, tile, tile))


def _tasks_held(dask_scheduler) -> int:  # type: ignore[no-untyped-def]
    return len(dask_scheduler.tasks)


def cpu_seconds(process: psutil.Process) -> float:
    """User and system CPU seconds ``process`` has used so far."""
    times = process.cpu_times()
    return times.user + times.system


def worker_rss(processes: list[psutil.Process]) -> int:
    return sum(p.memory_info().rss for p in processes)


def _held_bytes(dask_scheduler) -> int:  # type: ignore[no-untyped-def]
    # kept by the scheduler as results come and go: asking it leaves the workers' event loops alone
    return int(sum(worker.nbytes for worker in dask_scheduler.workers.values()))


class PeakMemory:
    """Samples the workers every 0.2 s: summed resident memory (RSS), and the bytes of task results they hold.

    With the tuned allocator (memory is never returned to the system) RSS is a high-water mark that also counts
    the allocator's fragmentation; the held results (Dask's "managed" memory) are what the graph keeps alive.
    """

    def __init__(self, client) -> None:  # type: ignore[no-untyped-def]
        self.client, self.peak, self.peak_managed = client, 0, 0
        self.processes = [psutil.Process(pid) for pid in client.run(os.getpid).values()]

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, worker_rss(self.processes))
            self.peak_managed = max(self.peak_managed, self.client.run_on_scheduler(_held_bytes))
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="scene sizes in pixels")
    parser.add_argument("--full", action="store_true", help="also a Landsat-size 7,700² scene")
    parser.add_argument("--model", default=None, help="checkpoint (default: packaged cmsn-small, else untrained)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each path; the fastest is reported")
    parser.add_argument(
        "--workdir", default=None, help="a new or empty folder (or one this benchmark made) for the scene stores"
    )
    parser.add_argument(
        "--write-only",
        action="store_true",
        help="only the streamed write and its memory (no loop, no compute: both hold the whole scene in memory)",
    )
    parser.add_argument(
        "--task-stream",
        action="store_true",
        help="print where the workers' time goes during the first streamed write (Dask's task stream)",
    )
    parser.add_argument(
        "--to-zarr",
        action="store_true",
        help="also write the lazy result with xarray's to_zarr (Dask's own task order; no resume records)",
    )
    args = parser.parse_args()
    sizes = args.sizes + ([7700] if args.full else [])
    name = args.model or ("cmsn-small" if "cmsn-small" in list_models() else None)
    model = load_model(name) if name else CMSN().eval()
    # a given folder must be new, empty or this benchmark's own: it replaces the stores it writes there
    workdir = (
        claim_workdir(args.workdir, "bench_inference") if args.workdir else Path(tempfile.mkdtemp(prefix="cmsn-bench-"))
    )
    block = AxisTiling.plan(10**6, tile=args.tile, overlap=args.overlap, chunk=args.chunk).block
    print(
        f"model {name or 'untrained default CMSN'}; tile {args.tile} px, overlap {args.overlap} px, chunk "
        f"{args.chunk} px (blocks of {block} px); {args.workers} workers x {args.threads_per_worker} thread(s)"
    )
    print(
        f"{'scene':>11} {'tiles':>6} {'loop s':>7} {'compute s':>9} {'write s':>8} {'loop Mpx/s':>10} "
        f"{'cmp Mpx/s':>9} {'wr Mpx/s':>8} {'ratio cmp':>9} {'ratio wr':>8} {'idle MiB':>8} {'peak MiB':>8} "
        f"{'held MiB':>8} {'classical s':>11} {'cmp/classical':>13}"
    )
    torch.set_num_threads(os.cpu_count() or 1)
    forward = forward_rate(model, tile=args.tile, batch_size=args.batch_size)
    print(f"model forward rate in this run: {forward:.2f} Mpx/s of tile output (batch {args.batch_size})")
    rows, bounds = [], []
    for size in sizes:
        store = str(workdir / f"scene{size}.zarr")
        if not Path(store).exists():
            write_scene(size, store)
        megapixels = 3 * size * size / 1e6
        torch.set_num_threads(os.cpu_count() or 1)
        out = str(workdir / f"out{size}.zarr")
        loop_s = write_s = compute_s = classical_s = float("inf")
        tiles: int | str = "-"
        # a fresh cluster per size: with the tuned allocator a worker's RSS is its high-water mark
        with get_client(workers=args.workers, threads_per_worker=args.threads_per_worker) as client:
            client.run(_warm_up, model_spec(model), args.tile, args.batch_size)
            memory = PeakMemory(client)
            idle = worker_rss(memory.processes)
            result = reconstruct(
                open_cube(store),
                model=model,
                tile=args.tile,
                overlap=args.overlap,
                chunk=args.chunk,
                batch_size=args.batch_size,
            )
            # the best run of each path (this shared machine's noise only ever slows a run); the writes first,
            # since a persisted scene would raise the workers' RSS high-water mark
            for run in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(out + ".regions", ignore_errors=True)
                recording = get_task_stream(client) if args.task_stream and run == 0 else contextlib.nullcontext()
                processes = [psutil.Process(), *memory.processes]  # this one runs the scheduler and the client
                cpu_before = [cpu_seconds(p) for p in processes]
                with memory, recording as stream:
                    start = time.perf_counter()
                    write_reconstruction(result, out, progress=False)
                    write_s = min(write_s, time.perf_counter() - start)
                cpu = [cpu_seconds(p) - before for p, before in zip(processes, cpu_before, strict=True)]
                if stream is not None:
                    print(
                        f"{size}² streamed write, where the workers' time goes:\n{task_stream_summary(stream.data)}\n"
                        f"  CPU time: workers {', '.join(f'{c:.1f}' for c in cpu[1:])} s; this process (the scheduler, the "
                        f"client and the memory sampler, sharing the cores) {cpu[0]:.1f} s"
                    )
            if args.to_zarr:  # the public-API alternative: xarray's to_zarr, the order Dask's scheduler picks
                dask_memory = PeakMemory(client)
                shutil.rmtree(out, ignore_errors=True)
                with dask_memory:
                    start = time.perf_counter()
                    result.to_zarr(out, mode="w", consolidated=False)
                    to_zarr_s = time.perf_counter() - start
                print(
                    f"{size}²: xarray to_zarr {to_zarr_s:.1f} s, worker RSS peak {dask_memory.peak / 2**20:.0f} MiB, "
                    f"held {dask_memory.peak_managed / 2**20:.0f} MiB (streamed write_reconstruction: {write_s:.1f} s)",
                    flush=True,
                )
            for _ in range(0 if args.write_only else args.repeat):  # loop and Dask compute in turns
                seconds, tiles = plain_loop(
                    store, model, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size
                )
                loop_s = min(loop_s, seconds)
                compute_s = min(compute_s, compute_seconds(client, result))
            # what a user would run instead: the classical weighted regression over the same tiles, same path
            classical = reconstruct(
                open_cube(store), model=model, method="weighted-regression", tile=args.tile, overlap=args.overlap,
                chunk=args.chunk, batch_size=args.batch_size,
            )  # fmt: skip
            for _ in range(0 if args.write_only else args.repeat):
                classical_s = min(classical_s, compute_seconds(client, classical))
        rows.append((size, memory.peak, memory.peak_managed))
        if isinstance(tiles, int):  # the forward rate divided by the tile overhead (tile pixels per scene pixel)
            bounds.append(
                (size, forward * size * size / (tiles * args.tile**2), megapixels / loop_s, megapixels / write_s)
            )

        def figure(value: float, width: int, digits: int) -> str:  # "-" for a path that did not run
            return f"{value:{width}.{digits}f}" if np.isfinite(value) and value > 0 else f"{'-':>{width}}"

        print(
            f"{size:>5}x{size:<5} {tiles:>6} {figure(loop_s, 7, 1)} {figure(compute_s, 9, 1)} {write_s:8.1f} "
            f"{figure(megapixels / loop_s, 10, 2)} {figure(megapixels / compute_s, 9, 2)} {megapixels / write_s:8.2f} "
            f"{figure(loop_s / compute_s, 9, 2)} {figure(loop_s / write_s, 8, 2)} {idle / 2**20:8.0f} "
            f"{memory.peak / 2**20:8.0f} {memory.peak_managed / 2**20:8.0f} {figure(classical_s, 11, 1)} "
            f"{figure(compute_s / classical_s, 13, 2)}",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out + ".regions", ignore_errors=True)
    for size, bound, loop_rate, write_rate in bounds:
        print(
            f"{size}²: forward rate / tile overhead = {bound:.2f} Mpx/s of output; loop at {loop_rate / bound:.2f} "
            f"of it, streamed write at {write_rate / bound:.2f}"
        )
    if len(rows) > 1:
        (first, rss_first, held_first), (last, rss_last, held_last) = rows[0], rows[-1]
        print(
            f"from {first}² to {last}² ({(last / first) ** 2:.0f}x the pixels): peak worker RSS grows "
            f"{rss_last / rss_first:.2f}x, peak held results {held_last / held_first:.2f}x"
        )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
