"""Whole-scene reconstruction speed and memory: the Dask path against a plain torch loop over the same tiles.

For each scene size (default 2048² and 4096² pixels × 3 dates, written to a Zarr store first):

- plain loop: the whole padded scene in memory, the same global tiles, one process, torch on every core;
- Dask path: ``reconstruct(open_cube(store))`` on a LocalCluster of worker processes (one per core, one torch
  thread each), reading the store lazily: ``compute`` = every output variable computed and kept on the workers
  (the model, blending and NDVI), ``write`` = the same written region by region with ``write_reconstruction``
  (adds encoding and compressing the output store; the loop writes nothing).

Prints wall times, throughput in megapixels of output per second (dates × H × W), the ratio of throughputs
(target ≥ 0.95) and the peak resident memory of the Dask path (all workers), which must not grow with
the scene at a fixed chunk size. ``--full`` adds a Landsat-size 7,700² scene.

Run::

    make bench        # or:
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1 \\
        python benchmarks/bench_inference.py --sizes 2048 4096
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from distributed import wait

from cmsn_cube.cluster import get_client
from cmsn_cube.cube import open_cube, write_cube
from cmsn_cube.inference import AxisTiling, model_inputs, reconstruct, write_reconstruction
from cmsn_cube.model import CMSN, list_models, load_model
from cmsn_cube.sources.synthetic import synthetic_scene


def plain_loop(store: str, model: torch.nn.Module, *, tile: int, overlap: int, batch_size: int) -> float:
    """Seconds for one process to run the model over every global tile of the scene (no Dask, no blending)."""
    cube = open_cube(store).load()
    channels, _ = model_inputs(cube)
    data = channels.values
    tilings = [AxisTiling.plan(n, tile=tile, overlap=overlap, chunk=10**9) for n in data.shape[2:]]
    padded = np.pad(data, ((0, 0), (0, 0), *((t.pad_before, t.pad_after) for t in tilings)), mode="reflect")
    tiles = [(y0, x0) for y0 in tilings[0].starts for x0 in tilings[1].starts]
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tiles), batch_size):
            batch = np.stack([padded[:, :, y : y + tile, x : x + tile] for y, x in tiles[i : i + batch_size]])
            model(torch.from_numpy(batch))
    return time.perf_counter() - start


def _warm_up() -> None:
    import cmsn_cube.inference  # noqa: F401  (imports torch)


class PeakMemory:
    """Samples the summed resident memory of the worker processes every 0.2 s (the client only builds graphs)."""

    def __init__(self, client) -> None:  # type: ignore[no-untyped-def]
        self.client, self.peak, self._stop = client, 0, threading.Event()
        pids = client.run(os.getpid)
        self.processes = [psutil.Process(pid) for pid in pids.values()]

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(p.memory_info().rss for p in self.processes))
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
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
    parser.add_argument("--workdir", default=None, help="where the scene stores go (default: a temp dir)")
    args = parser.parse_args()
    sizes = args.sizes + ([7700] if args.full else [])
    name = args.model or ("cmsn-small" if "cmsn-small" in list_models() else None)
    model = load_model(name) if name else CMSN().eval()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cmsn-bench-"))
    print(
        f"model {name or 'untrained default CMSN'}; tile {args.tile} px, overlap {args.overlap} px, chunk {args.chunk} px"
    )
    print(
        f"{'scene':>11} {'loop s':>8} {'compute s':>9} {'write s':>8} {'loop Mpx/s':>11} {'cmp Mpx/s':>11} "
        f"{'write Mpx/s':>11} {'ratio cmp':>8} {'ratio':>6} {'write peak MiB':>14}"
    )
    rows = []
    with get_client(workers=args.workers) as client:
        client.run(_warm_up)  # imports in the workers, as the loop's process has them already
        for size in sizes:
            store = str(workdir / f"scene{size}.zarr")
            if not Path(store).exists():
                write_cube(synthetic_scene(height=size, width=size, seed=size), store)
            megapixels = 3 * size * size / 1e6
            torch.set_num_threads(os.cpu_count() or 1)
            loop_s = plain_loop(store, model, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size)
            out = str(workdir / f"out{size}.zarr")
            shutil.rmtree(out, ignore_errors=True)
            result = reconstruct(
                open_cube(store),
                model=model,
                tile=args.tile,
                overlap=args.overlap,
                chunk=args.chunk,
                batch_size=args.batch_size,
            )
            with PeakMemory(client) as memory:
                start = time.perf_counter()
                write_reconstruction(result, out, progress=False)
                dask_s = time.perf_counter() - start
            # after the write: with the tuned allocator, memory a worker freed still counts in its RSS
            start = time.perf_counter()
            wait(client.persist([result[name].data for name in result.data_vars]))  # compute, keep on workers
            compute_s = time.perf_counter() - start
            client.run(gc.collect)
            rows.append((size, loop_s, dask_s, memory.peak))
            print(
                f"{size:>5}x{size:<5} {loop_s:8.1f} {compute_s:9.1f} {dask_s:8.1f} {megapixels / loop_s:11.2f} "
                f"{megapixels / compute_s:11.2f} {megapixels / dask_s:11.2f} {loop_s / compute_s:8.2f} "
                f"{loop_s / dask_s:6.2f} {memory.peak / 2**20:14.0f}"
            )
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out + ".regions", ignore_errors=True)
    if len(rows) > 1:
        growth = rows[-1][3] / rows[0][3]
        print(
            f"peak memory grows {growth:.2f}x from {rows[0][0]}² to {rows[-1][0]}² ({(rows[-1][0] / rows[0][0]) ** 2:.0f}x the pixels)"
        )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
