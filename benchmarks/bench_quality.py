"""Real-data yardstick: every gap-filler on the real multi-date four-band stacks of ../shared/data.

Each stack becomes a cube; real cloud shapes (the UKIS Landsat masks, and the cube's own masks where it has
them) are pasted on clear pixels at 25/15/10 % for the dates in turn, over several draws, and every method is
scored on the pasted pixels that all of them filled (``common``): PSNR (dB, band mean), SAM (°), NDVI MAE, as
mean ± std over the draws. The methods: the classical fillers (nearest, linear, median, regression, and the
local regression weighted by fit that the network starts from), the packaged network alone (``cmsn``: the
weighted regression plus its learned residual), the default ``reconstruct()`` path (``auto``: the scene
self-check picks the best of the network and the two regressions per date) and, with ``--adapt SECONDS``, the
network adapted to each observed cube from its own clear pixels (``adapted``: ``fit()`` for that long, then the
network alone).

Stacks (``pipelines/real_stacks.py`` reads them with :func:`cmsn_cube.sources.stack.open_stack` and splits
each into the part the packaged network was fine-tuned on and the part scored here; the table says which):

- ``cbers``: CBERS-4 AWFI, 64 m, TOA-like reflectance, its own CMASK clouds; scored on dates 13-24;
- ``s2-sr``: Sentinel-2 L3A surface reflectance, Bouconne forest, 7 dates at 10 m; scored on the south half;
- ``naip-30m``: NAIP aerial, 10 summers, aggregated from 5 m to 30 m; scored on the south half;
- ``naip-5m``: the same NAIP at 5 m; scored on the south half (464 columns);
- ``embedded``: the embedded scene at an unseen seed (4321), 256 × 256 px (the generator the network knows),
  scored on its own clouds against the truth beneath them (the draws vary only the self-check's shapes).

Also: the self-check's PSNR estimate per date against the PSNR measured on the pasted truth (``auto`` rows).

Usage: ``python benchmarks/bench_quality.py [--draws 5] [--sets cbers,s2-sr,naip-30m,naip-5m,embedded] [--model PATH] [--adapt 120]``
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
from real_stacks import DATA, SCORED_ONLY, STACKS, describe_part, scored_part  # noqa: E402

METHODS = ("nearest", "linear", "median", "regression", "weighted-regression", "cmsn", "auto")
SETS = (*STACKS, *SCORED_ONLY)


def score_draw(
    cube: xr.Dataset, seed: int, model: str | None = None, adapt_seconds: float = 0.0
) -> tuple[dict[str, dict[str, float]], list[tuple[float, float]]]:
    """One draw of pasted clouds: each method's band-mean PSNR, SAM, NDVI MAE on the common pasted pixels,
    and the self-check's (estimate, measured) PSNR per date of the ``auto`` path. With ``adapt_seconds``, also
    ``adapted``: the network after ``fit()`` on the observed cube (its own clear pixels only) for that long."""
    from cmsn_cube.baselines import BASELINES
    from cmsn_cube.clouds import make_scoring_cube
    from cmsn_cube.inference import reconstruct
    from cmsn_cube.metrics import common_pixels, evaluate_reconstruction, psnr

    masks = DATA / "cloud_masks_ukis"
    if "truth" in cube:  # the embedded scene: its own clouds, scored against the truth beneath them
        observed, truth, scored = cube.drop_vars("truth"), cube["truth"].where(cube["cloud_mask"]), cube["cloud_mask"]
    else:
        observed, truth, scored = make_scoring_cube(cube, seed=seed, reference_masks=masks if masks.is_dir() else None)
    results: dict[str, xr.DataArray] = {name: BASELINES[name](observed) for name in METHODS[:4]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for forced in ("weighted-regression", "cmsn"):
            results[forced] = reconstruct(observed, method=forced, model=model).reconstructed.compute()
        auto = reconstruct(observed, check_seed=seed, model=model).compute()
        if adapt_seconds > 0:
            from cmsn_cube.adapt import fit

            fitted = fit(observed, model=model, time_budget=adapt_seconds, seed=seed, progress=False).model
            results["adapted"] = reconstruct(observed, method="cmsn", model=fitted).reconstructed.compute()
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


Summary = dict[str, dict[str, tuple[float, float, float]]]
CLASSICAL = ("nearest", "linear", "median", "regression", "weighted-regression")


def score_stacks(
    sets: list[str], *, draws: int = 5, model: str | None = None, adapt_seconds: float = 0.0, echo: Any = print
) -> Summary:
    """Mean PSNR (dB), SAM (°), NDVI MAE of every method per stack over ``draws`` draws; per-stack tables echoed."""
    from tqdm import tqdm

    summary: Summary = {}
    for name in sets:
        cube = scored_part(name)
        started = time.perf_counter()
        tables, honesty = [], []
        for seed in tqdm(range(draws), desc=name, unit="draw"):
            table, pairs = score_draw(cube, seed, model, adapt_seconds)
            tables.append(table)
            honesty += pairs
        errors = [abs(e - m) for e, m in honesty if np.isfinite(e) and np.isfinite(m)]
        echo(
            f"\n{name} (scored: {describe_part(name)}): {cube.sizes['time']} dates, {cube.sizes['y']} x "
            f"{cube.sizes['x']} px, {draws} draws, "
            f"{time.perf_counter() - started:.0f} s; self-check estimate vs measured PSNR: mean |diff| "
            f"{np.mean(errors) if errors else float('nan'):.2f} dB over {len(errors)} dates"
        )
        echo(f"  {'method':<20} {'PSNR (dB)':>15} {'SAM (°)':>13} {'NDVI MAE':>15}")
        for method in tables[0]:
            values = {k: np.array([d[method][k] for d in tables]) for k in ("psnr", "sam", "ndvi_mae")}
            summary.setdefault(name, {})[method] = tuple(float(v.mean()) for v in values.values())  # type: ignore[assignment]
            echo(
                f"  {method:<20} {values['psnr'].mean():8.2f} ± {values['psnr'].std():4.2f} "
                f"{values['sam'].mean():6.2f} ± {values['sam'].std():4.2f} "
                f"{values['ndvi_mae'].mean():8.4f} ± {values['ndvi_mae'].std():.4f}"
            )
    return summary


def summary_markdown(summary: Summary) -> str:
    """The network against the best classical filler per stack (Markdown), and means over the real stacks."""
    lines = [
        "| stack (scored part) | best classical | PSNR (dB) | SAM (°) | cmsn PSNR (dB) | cmsn SAM (°) | gap (dB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    gaps, real = [], [name for name in summary if name in STACKS]
    for name, rows in summary.items():
        best = max(CLASSICAL, key=lambda method: rows[method][0])  # noqa: B023
        gap = rows["cmsn"][0] - rows[best][0]
        if name in STACKS:
            gaps.append(gap)
        lines.append(
            f"| {name} ({describe_part(name)}) | {best} | {rows[best][0]:.2f} | {rows[best][1]:.2f} | "
            f"{rows['cmsn'][0]:.2f} | {rows['cmsn'][1]:.2f} | {gap:+.2f} |"
        )
    if real:
        lines += ["", f"Mean over the real stacks ({', '.join(real)}):", "", "| method | PSNR (dB) | SAM (°) |"]
        lines.append("|---|---:|---:|")
        for method in summary[real[0]]:
            psnr = np.mean([summary[s][method][0] for s in real])
            lines.append(f"| {method} | {psnr:.2f} | {np.mean([summary[s][method][1] for s in real]):.2f} |")
        lines += ["", f"cmsn minus the best classical filler of each real stack: mean {np.mean(gaps):+.2f} dB, "
                  f"worst {min(gaps):+.2f} dB."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=5, help="pasted-cloud draws per stack (seeds 0..draws-1)")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated stacks")
    parser.add_argument("--model", default=None, help="checkpoint to score (default: the packaged one)")
    parser.add_argument(
        "--adapt", type=float, default=0.0, metavar="SECONDS",
        help="also score the network adapted to each observed cube by fit() for this long (adds row 'adapted')",
    )  # fmt: skip
    args = parser.parse_args()
    summary = score_stacks(args.sets.split(","), draws=args.draws, model=args.model, adapt_seconds=args.adapt)
    print("\n" + summary_markdown(summary))


if __name__ == "__main__":
    main()
