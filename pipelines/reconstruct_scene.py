"""Scene pipeline: a cube store -> cloud-free reconstruction + NDVI in a Zarr store, on a Dask cluster.

    python pipelines/reconstruct_scene.py stores/wuhan.zarr stores/wuhan-reconstructed.zarr [--scheduler tcp://...]

A thin script over the public API (the same as `cmsn-cube reconstruct`), kept as a template for pipelines that
add steps around it; re-running it resumes an interrupted write.
"""

from __future__ import annotations

import argparse

from cmsn_cube.cluster import get_client
from cmsn_cube.inference import reconstruct, write_reconstruction
from cmsn_cube.report import describe_cube
from cmsn_cube.store import open_cube


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="input cube store (local path or fsspec URL)")
    parser.add_argument("out", help="output store for reconstructed, filled, ndvi, ndvi_observed")
    parser.add_argument("--model", default=None, help="checkpoint path or packaged name (default: packaged)")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    parser.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes")
    args = parser.parse_args()
    cube = open_cube(args.store)
    print(describe_cube(cube, name=args.store))
    with get_client(args.scheduler, workers=args.workers, dashboard=True) as client:
        print(f"Dask dashboard: {client.dashboard_link}")
        write_reconstruction(reconstruct(cube, model=args.model), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
