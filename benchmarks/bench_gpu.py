"""A full Landsat scene on one GPU: Zarr in -> Zarr out, float16 autocast (as inference runs), an automatic batch size.

For each scene size (default 4096² and the full 7,700² × 3 dates, written to a Zarr store first): the largest
batch of 256-px windows that fits (doubling from 8 until the GPU runs out of memory or 512), then

- ``model``: the forward passes alone over every tile with a gap (windows already on the GPU);
- ``end to end``: ``reconstruct(open_cube(store), device="cuda")`` written with ``write_reconstruction`` (one
  process, Dask threads: reading, tiling, the model, blending, NDVI, compressing and writing).

Prints Mpx/s of output (dates × H × W) for both and the share of the end-to-end time outside the forward passes
(I/O and the CPU work around the model). Target (issue 17): a full scene end to end in ≤ 30 s on one H200.
CI has no GPU; ``--device cpu --sizes 512`` checks that the script runs.

Run::

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1 \\
        python benchmarks/bench_gpu.py [--sizes 4096 7700] [--device cuda]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cmsn_cube.inference import AxisTiling, model_channels, reconstruct, tiles_to_run, write_reconstruction
from cmsn_cube.model import load_model
from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import open_cube, write_cube
from cmsn_cube.testing import claim_workdir


def largest_batch(model: torch.nn.Module, device: str, tile: int, limit: int = 512) -> int:
    """The largest power-of-two batch (from 8) whose forward pass fits in the device's memory."""
    if not device.startswith("cuda"):
        return 8
    batch, fits = 8, 4
    while batch <= limit:
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                model(torch.zeros(batch, 3, 5, tile, tile, device=device))
            torch.cuda.synchronize()
            fits, batch = batch, batch * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return fits


def forward_seconds(store: str, model: torch.nn.Module, *, device: str, tile: int, batch: int) -> tuple[float, int]:
    """Seconds of forward passes over the scene's tiles with a gap (inputs already on the device)."""
    cube = open_cube(store).load()
    tilings = [AxisTiling.plan(cube.sizes[d], tile=tile, overlap=32, chunk=10**9) for d in ("y", "x")]
    rows, cols = (t.block_source(0) for t in tilings)
    channels, to_fill = model_channels(
        cube.reflectance.values[:, :, rows][..., cols], cube.cloud_mask.values[:, rows][..., cols]
    )
    corners = tiles_to_run(
        to_fill, [(int(y), int(x)) for y in tilings[0].starts for x in tilings[1].starts], (tile, tile)
    )
    batches = [
        torch.from_numpy(np.stack([channels[:, :, y : y + tile, x : x + tile] for y, x in corners[i : i + batch]]))
        for i in range(0, len(corners), batch)
    ]
    autocast = (
        torch.autocast("cuda", dtype=torch.float16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    seconds = 0.0
    with torch.inference_mode(), autocast:
        model(batches[0].to(device))  # warm-up
        for windows in batches:
            on_device = windows.to(device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(on_device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
    return seconds, len(corners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 7700])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    model = load_model("cmsn-small").to(args.device).eval()
    batch = largest_batch(model, args.device, args.tile)
    # a given folder must be new, empty or this script's: its scene and output stores are replaced
    workdir = claim_workdir(args.workdir, "bench_gpu") if args.workdir else Path(tempfile.mkdtemp(prefix="cmsn-gpu-"))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{name}; batch {batch} windows of {args.tile} px; float16 autocast on CUDA (as reconstruct runs it)")
    print(
        f"{'scene':>11} {'tiles':>6} {'model s':>8} {'model Mpx/s':>11} {'end-to-end s':>12} {'e2e Mpx/s':>9} {'outside model':>13}"
    )
    for size in args.sizes:
        store, out = str(workdir / f"scene{size}.zarr"), str(workdir / f"out{size}.zarr")
        if not Path(store).exists():
            write_cube(synthetic_scene(height=size, width=size, seed=size), store)
        megapixels = 3 * size * size / 1e6
        model_s, tiles = forward_seconds(store, model, device=args.device, tile=args.tile, batch=batch)
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        result = reconstruct(open_cube(store), method="cmsn", device=args.device, batch_size=batch, tile=args.tile)
        write_reconstruction(result, out, progress=False)
        total = time.perf_counter() - start
        print(
            f"{size:>5}x{size:<5} {tiles:>6} {model_s:8.1f} {megapixels / model_s:11.1f} {total:12.1f} "
            f"{megapixels / total:9.1f} {100 * (1 - model_s / total):12.0f} %",
            flush=True,
        )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
