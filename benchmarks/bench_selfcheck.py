"""Cost of the scene self-check: ``reconstruct(method="auto")`` against the network alone on one scene.

Prints the time of the check alone (``quality``), of a whole reconstruction with the check (``auto``) and
without (``cmsn``), best of ``--repeat`` runs each, on the local threaded scheduler, and the check's share.

Usage: ``python benchmarks/bench_selfcheck.py [--size 2048] [--repeat 2]``
"""

from __future__ import annotations

import argparse
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="scene side in pixels")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from bench_model import time_it  # beside this script

    from cmsn_cube.inference import reconstruct
    from cmsn_cube.sources.synthetic import synthetic_scene

    warnings.simplefilter("ignore")
    cube = synthetic_scene(height=args.size, width=args.size, seed=7).drop_vars("truth")
    reconstruct(cube.isel(y=slice(0, 256), x=slice(0, 256))).compute()  # warm-up: model built, torch started
    check = time_it(lambda: reconstruct(cube)["quality"].compute(), repeats=args.repeat, warmup=0)
    auto = time_it(lambda: reconstruct(cube).compute(), repeats=args.repeat, warmup=0)
    network = time_it(lambda: reconstruct(cube, method="cmsn").compute(), repeats=args.repeat, warmup=0)
    print(f"scene {args.size}² px x 3 dates, best of {args.repeat}:")
    print(f"  self-check alone            {check:7.2f} s")
    print(f"  reconstruct, method='auto'  {auto:7.2f} s")
    print(f"  reconstruct, method='cmsn'  {network:7.2f} s")
    print(f"  check / network-only path   {100 * check / network:6.1f} %   (auto / cmsn: {auto / network:.3f})")


if __name__ == "__main__":
    main()
