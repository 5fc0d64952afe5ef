"""Every observed pixel used: the 140-date ``s2_nrt_romania`` series of ../shared/data reconstructed with the
classical regression; prints the pixel-dates filled from outside their triplet (flag 5, NaN before), those left
NaN where some date observed them, and the quality of that fill on clear dates whose whole triplet is hidden over
a 40 x 40 px patch (band-mean PSNR, dB) beside copying the nearest observed date.

Usage: ``python benchmarks/bench_series_fill.py [--dates 10]``
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from cmsn_cube.baselines import days_of, fill_nearest
from cmsn_cube.cube import date_triplets
from cmsn_cube.inference import SERIES_FILLED, reconstruct
from cmsn_cube.metrics import psnr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from real_stacks import romania  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dates", type=int, default=10, help="clear dates scored (every 6th clear date)")
args = parser.parse_args()
warnings.simplefilter("ignore")
cube = romania()
started = time.perf_counter()
result = reconstruct(cube, method="regression").compute(scheduler="synchronous")
flags, observed = result.filled.values, result.observed_dates.values
left = (np.isnan(result.reconstructed.values).any(axis=1) & (observed > 0)[None]).sum()
print(f"{cube.sizes['time']} dates, {time.perf_counter() - started:.1f} s: {int((flags == SERIES_FILLED).sum())} "
      f"pixel-dates filled from the series (flag 5), {int(left)} left NaN where some date observed them")  # fmt: skip

mask = cube.cloud_mask.values
triplets = date_triplets(cube)
patch = (slice(None), slice(30, 70), slice(30, 70))
series, nearest = [], []
for date in [d for d in range(cube.sizes["time"]) if not mask[d].any()][::6][: args.dates]:
    hidden = cube.copy(deep=True)
    for t in triplets[date]:
        hidden["cloud_mask"].values[t, 30:70, 30:70] = True
    filled = reconstruct(hidden, method="regression").compute(scheduler="synchronous").reconstructed.values[date]
    gap = hidden.cloud_mask.values | np.isnan(hidden.reflectance.values).any(axis=1)
    copied = fill_nearest(hidden.reflectance.values, gap, days_of(hidden))[date]
    truth = cube.reflectance.values[date]
    series.append(np.mean([psnr(filled[patch][b], truth[patch][b]) for b in range(4)]))
    nearest.append(np.mean([psnr(copied[patch][b], truth[patch][b]) for b in range(4)]))
print(f"{len(series)} clear dates, whole triplet hidden over 40 x 40 px: series fill {np.mean(series):.2f} dB "
      f"(worst {np.min(series):.2f}), nearest observed date copied {np.mean(nearest):.2f} dB")  # fmt: skip
