"""Sampler throughput: samples/s from a Zarr store on disk, DataLoader with 0 and 2 workers.

Reference: the same windows (three dates, reflectance + cloud mask) read straight from the Zarr arrays with
numpy slicing, with no cloud simulation. Also times one CPU training step of the CMSN model on the same
batches, to say whether the sampler keeps up (goal: >= 5x the samples/s a training step consumes).

    python benchmarks/bench_samples.py [--size 512] [--window 256] [--batches 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from cmsn_cube.samples import TripletWindowDataset
from cmsn_cube.testing import tiny_store


def rate(n_samples: int, seconds: float) -> float:
    return n_samples / seconds if seconds > 0 else float("inf")


def loader_rate(dataset: TripletWindowDataset, *, workers: int, batch: int, n_batches: int) -> float:
    # windows repeat when the scene has fewer than needed: every timed batch is read and simulated afresh
    indices = [i % len(dataset) for i in range(batch * (n_batches + 1))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=indices, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first read are not throughput
    start, n = time.perf_counter(), 0
    for item in iterator:
        n += item["inputs"].shape[0]
    return rate(n, time.perf_counter() - start)


def numpy_rate(store: str, dataset: TripletWindowDataset, *, n_samples: int) -> float:
    group = zarr.open_group(store, mode="r")
    reflectance, cloud = group["reflectance"], group["cloud_mask"]
    size = dataset.size
    start = time.perf_counter()
    for index in range(n_samples):
        triplet, y0, x0 = dataset.windows[index % len(dataset)]
        for t in triplet:
            np.asarray(reflectance[t, :, y0 : y0 + size, x0 : x0 + size])
            np.asarray(cloud[t, y0 : y0 + size, x0 : x0 + size])
    return rate(n_samples, time.perf_counter() - start)


def training_rate(dataset: TripletWindowDataset, *, batch: int, steps: int = 2) -> float | None:
    try:
        from cmsn_cube.model.cmsn import CMSN
        from cmsn_cube.model.losses import CMSNLoss
    except ImportError:
        return None
    model, loss_fn = CMSN(), CMSNLoss()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    items = [dataset[i % len(dataset)] for i in range(batch)]
    batch_tensors = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    elapsed = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        optimiser.zero_grad()
        losses = loss_fn(model(batch_tensors["inputs"]), batch_tensors)
        losses["total"].backward()
        optimiser.step()
        if step:  # the first step warms up allocators
            elapsed += time.perf_counter() - start
    return rate(batch * steps, elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="scene side, px")
    parser.add_argument("--window", type=int, default=256, help="window side, px")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=15, help="batches timed per loader")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        store = tiny_store(Path(tmp) / "bench.zarr", size=args.size, seed=0, chunk=256)
        dataset = TripletWindowDataset(store, size=args.window, overlap=32, seed=0)
        n = args.batch * args.batches
        print(f"scene {args.size}x{args.size} px, 3 dates, windows {args.window} px: {dataset.summary()}")
        reference = numpy_rate(store, dataset, n_samples=n)
        print(f"numpy slicing of the Zarr arrays (reference)  : {reference:8.1f} samples/s")
        rates = {}
        for workers in (0, 2):
            value = rates[workers] = loader_rate(dataset, workers=workers, batch=args.batch, n_batches=args.batches)
            print(
                f"TripletWindowDataset, DataLoader, {workers} workers : {value:8.1f} samples/s  "
                f"({value / reference:.2f}x the numpy reference)"
            )
        train = training_rate(dataset, batch=args.batch)
        if train is not None:
            print(
                f"CMSN CPU training step (2 threads)             : {train:8.2f} samples/s consumed; "
                f"sampler / training = {rates[0] / train:.1f}x (0 workers), {rates[2] / train:.1f}x (2 workers)"
            )


if __name__ == "__main__":
    main()
