"""A long series with few cloudy dates: reconstruct() over the 24-date CBERS series of ../shared/data, every
(triplet, filler) on every tile with a gap on any date (``SKIP_CLEAR_DATES = False``, the earlier behaviour)
against only the tiles where the triplet's own dates have gaps (the default); windows run through the model
counted, best of 2 runs.

Usage: ``python benchmarks/bench_series.py``
"""

import sys
import time
import warnings
from pathlib import Path

import numpy as np

import cmsn_cube.inference as inf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from real_stacks import cbers  # noqa: E402

cube = cbers()
cloudy = np.nonzero(cube.cloud_mask.values.any(axis=(1, 2)))[0]
print("dates with clouds:", list(cloudy), "of", cube.sizes["time"])
runs = []
orig = inf.models._run_model
inf.models._run_model = lambda m, w, d: (runs.append(w.shape[0]), orig(m, w, d))[1]
warnings.simplefilter("ignore")
inf.reconstruct(cube.isel(time=[0, 1, 2]), method="cmsn").compute()  # warm-up (model load)
for label, skip in (("every triplet (before)", False), ("only where gaps (now)", True)):
    inf.tiling.SKIP_CLEAR_DATES = skip
    best = np.inf
    for _ in range(2):
        runs.clear()
        t = time.perf_counter()
        inf.reconstruct(cube, method="cmsn").compute()
        best = min(best, time.perf_counter() - t)
    print(f"{label:<24} {best:6.2f} s, windows run {sum(runs)}")
