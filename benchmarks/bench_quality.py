"""The quality yardstick: scenes the scored model never saw, and whether the stated uncertainty holds.

Every real multi-date four-band stack of ../shared/data is scored whole (``pipelines/real_stacks.py``):
``cbers`` (24 dates), ``s2-sr`` (7), ``naip-30m`` and ``naip-5m`` (10), ``romania`` (the first 40 of its 140
dates, for time), ``kranj`` (4, real no-data gaps), ``ny`` (Landsat 8 path/row 013032, 8 dates on one grid).
Clouds of two kinds: real shapes pasted on clear pixels (``pasted``: the UKIS Landsat masks and the stack's own,
25/15/10 % per date in turn), and where a stack has real masks on its own dates (``romania``: Sentinel-2 SCL;
``ny``: Landsat BQA) the masks of its cloudy dates moved onto its clear dates (``own``). Plus the embedded
generator at seeds no training run used (from 5000), with its own clouds scored against the truth beneath.

The methods: the classical fillers of :mod:`cmsn_cube.baselines` (``regression`` as ``reconstruct()`` runs it,
on overlapping tiles; ``scene-regression`` the same filler on the whole scene at once); ``reference``, the 30-line regression of
issue 27 (per helper a least-squares gain and offset in a 31 px window, the scene's fit below 50 common
pixels, helpers weighted by 1 / residual variance); ``weighted-regression`` (the network's prior alone); the
network alone (``cmsn``) and the default path (``auto``). The network is scored only on stacks its checkpoint
never saw in any form: ``--unseen`` (default: what the packaged ``cmsn-small`` was never trained on, the
``romania``, ``kranj`` and ``ny`` stacks and the generator seeds); on the others its rows read "seen".

Per stack (mean over the draws, and the worst draw): PSNR pooled over the bands (dB; AllClear's and
UnCRtainTS' convention), band-mean PSNR (dB), SSIM, SAM (°), NDVI MAE, on the pasted pixels every method filled.
The uncertainty of ``auto`` and of the forced ``regression``: the share of errors within 1 and 2 stated sigma
(targets 68.3 % and 95.4 %), the calibration error UCE (reflectance) and the rank correlation of sigma and
|error|. The self-check: mean |estimated - measured| band-mean PSNR per date (dB).

Usage: ``python benchmarks/bench_quality.py [--draws 3] [--sets ...] [--seeds 20] [--sizes 512,1024]``
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
import real_stacks  # noqa: E402

CLASSICAL = ("nearest", "linear", "median", "regression", "scene-regression", "reference", "weighted-regression")
NETWORK = ("cmsn", "blend", "auto")
#: stack -> (reader, cloud kinds)
STACKS: dict[str, tuple[Callable[[], xr.Dataset], tuple[str, ...]]] = {
    "cbers": (real_stacks.cbers, ("pasted",)),
    "s2-sr": (real_stacks.s2_sr, ("pasted",)),
    "naip-30m": (real_stacks.naip_30m, ("pasted",)),
    "naip-5m": (real_stacks.naip_5m, ("pasted",)),
    "romania": (lambda: real_stacks.romania().isel(time=slice(0, 40)), ("pasted", "own")),
    "kranj": (real_stacks.kranj, ("pasted",)),
    "ny": (real_stacks.new_york, ("pasted", "own")),
}
#: What the packaged cmsn-small never saw (it was fine-tuned on parts of cbers, s2-sr and the NAIP stacks).
PACKAGED_UNSEEN = ("romania", "kranj", "ny", "synthetic")
#: Generator seeds of the yardstick: above every seed a training run used (11-36, 97, 1234).
FIRST_SEED = 5000


def reference_regression(values: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """Issue 27's 30-line regression, as specified there (the yardstick the project's fillers must match)."""
    from scipy import ndimage

    def box_mean(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        num, den = (ndimage.uniform_filter(v, size=31, mode="constant") for v in (w * a, w))
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / den, np.round(den * 31 * 31)

    out = np.full_like(values, np.nan)
    for t in range(values.shape[0]):
        total, weight = np.zeros(values.shape[1:]), np.zeros(values.shape[2:])
        for s in (s for s in range(values.shape[0]) if s != t and (gap[t] & ~gap[s]).any()):
            both = (~gap[t] & ~gap[s]).astype(np.float64)
            predictions, residual = [], np.zeros(values.shape[2:])
            for b in range(values.shape[1]):
                x, y = (np.nan_to_num(values[d, b]).astype(np.float64) * both for d in (s, t))
                (mx, count), (my, _) = box_mean(x, both), box_mean(y, both)
                mxx, mxy, myy = (box_mean(v, both)[0] for v in (x * x, x * y, y * y))
                with np.errstate(invalid="ignore", divide="ignore"):
                    gain = (mxy - mx * my) / (mxx - mx * mx)
                    res = np.maximum(myy - my * my - gain * (mxy - mx * my), 0)
                local = (count >= 50) & np.isfinite(gain) & (mxx - mx * mx > 1e-10)
                sx, sy = x[both > 0], y[both > 0]
                g_gain = np.cov(sx, sy, bias=True)[0, 1] / np.var(sx) if sx.size > 1 and np.var(sx) > 0 else 1.0
                g_off = sy.mean() - g_gain * sx.mean() if sx.size else 0.0
                g_res = np.mean((sy - g_gain * sx - g_off) ** 2) if sx.size else 1.0
                offset = np.where(local, my - gain * mx, g_off)
                predictions.append(np.where(local, gain, g_gain) * values[s, b] + offset)
                residual += np.where(local, res, g_res)
            w = np.where(gap[t] & ~gap[s], 1 / (residual / values.shape[1] + 1e-6), 0)
            total, weight = total + np.stack(predictions) * w, weight + w
        with np.errstate(invalid="ignore", divide="ignore"):
            out[t] = np.clip(total / weight, 0, 1)
    return out


def _fill(observed: xr.Dataset, method: str, model: str | None, seed: int) -> xr.Dataset:
    """One method's reconstruction of ``observed``: ``reconstructed`` (and ``uncertainty`` where it has one)."""
    from cmsn_cube.baselines import BASELINES, gaps_of
    from cmsn_cube.inference import reconstruct

    if method in ("nearest", "linear", "median"):
        return BASELINES[method](observed).to_dataset(name="reconstructed")
    if method == "scene-regression":  # the regression on the whole scene at once: what tiles may cost it
        return BASELINES["regression"](observed).to_dataset(name="reconstructed")
    if method == "reference":
        gap, values = gaps_of(observed).values, observed.reflectance.values.astype(np.float32)
        filled = np.where(gap[:, None], reference_regression(values, gap), values)
        return xr.Dataset({"reconstructed": observed.reflectance.copy(data=filled.astype(np.float32))})
    forced = {} if method == "auto" else {"method": method}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reconstruct(observed, model=model, check_seed=seed, **forced).compute()


def score(
    observed: xr.Dataset, truth: xr.DataArray, scored: Any, methods: list[str], model: str | None, seed: int
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[tuple[float, float]]]:
    """Scores per method, uncertainty figures per method that has one, (estimated, measured) PSNR per date."""
    from cmsn_cube.metrics import common_pixels, evaluate_reconstruction, psnr
    from cmsn_cube.uncertainty import calibration_error, coverage, rank_correlation

    results = {method: _fill(observed, method, model, seed) for method in methods}
    common = common_pixels(scored, [r.reconstructed for r in results.values()])
    reference = np.asarray(truth.values)
    table, spread = {}, {}
    for method, result in results.items():
        row = evaluate_reconstruction(result.reconstructed, truth, common).loc[("cloudy", "mean")]
        values = np.asarray(result.reconstructed.values)
        filled = np.stack([values[:, b][common] for b in range(values.shape[1])])
        truths = np.stack([reference[:, b][common] for b in range(values.shape[1])])
        errors = filled - truths
        table[method] = {
            "pooled": psnr(filled, truths),
            "psnr": float(row["psnr"]),
            "ssim": float(row["ssim"]),
            "sam": float(row["sam"]),
            "ndvi_mae": float(row["ndvi_mae"]),
        }
        if "uncertainty" in result:
            sigma = np.stack([np.asarray(result.uncertainty.values)[:, b][common] for b in range(values.shape[1])])
            within_1, within_2 = coverage(errors, sigma)
            spread[method] = {
                "within_1": within_1,
                "within_2": within_2,
                "uce": calibration_error(errors, sigma),
                "rank": rank_correlation(errors, sigma),
            }
    honesty = []
    if "auto" in results:
        auto = results["auto"]
        for date in range(observed.sizes["time"]):
            if common[date].sum() < 100:
                continue
            values, used = auto.reconstructed.values[date], int(auto.method_used.values[date])
            measured = np.mean([psnr(values[b][common[date]], reference[date, b][common[date]]) for b in range(4)])
            honesty.append((float(auto.quality.values[date, used, 0]), float(measured)))
    return table, spread, honesty


def scoring_cubes(name: str, kind: str, draws: int) -> list[tuple[xr.Dataset, xr.DataArray, Any, int]]:
    """The draws of one stack (or generator seed) and cloud kind: (observed, truth, scored pixels, seed)."""
    from cmsn_cube.clouds import make_scoring_cube
    from cmsn_cube.sources.synthetic import synthetic_scene

    if name.startswith("synthetic"):
        size, seed = (int(v) for v in name.split("-")[1:])
        cube = synthetic_scene(height=size, width=size, seed=seed, sensor="LANDSAT_8")
        return [(cube.drop_vars("truth"), cube["truth"].where(cube["cloud_mask"]), cube["cloud_mask"].values, seed)]
    cube = STACKS[name][0]()
    masks = real_stacks.DATA / "cloud_masks_ukis"
    sources = {"pasted": {"reference_masks": masks if masks.is_dir() else None}, "own": {"sources": ("store",)}}
    draws_out = []
    for seed in range(draws):
        observed, truth, scored = make_scoring_cube(cube, seed=seed, **sources[kind])  # type: ignore[arg-type]
        draws_out.append((observed, truth, scored.values, seed))
    return draws_out


Tables = tuple[
    dict[tuple[str, str], list[dict[str, dict[str, float]]]],
    dict[tuple[str, str], list[dict[str, dict[str, float]]]],
    dict[tuple[str, str], list[tuple[float, float]]],
]


def run_yardstick(
    sets: list[str],
    *,
    draws: int = 3,
    seeds: int = 20,
    sizes: tuple[int, ...] = (512,),
    model: str | None = None,
    unseen: tuple[str, ...] = PACKAGED_UNSEEN,
    network: bool = True,
) -> Tables:
    """Score every method on ``sets`` and the generator seeds: per-draw scores, uncertainty, self-check pairs."""
    from tqdm import tqdm

    jobs = [(name, kind) for name in sets if name for kind in STACKS[name][1]]
    jobs += [(f"synthetic-{size}-{FIRST_SEED + k}", "own") for size in sizes for k in range(seeds)]
    rows: dict[tuple[str, str], list[dict[str, dict[str, float]]]] = {}
    spreads: dict[tuple[str, str], list[dict[str, dict[str, float]]]] = {}
    honesty: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for name, kind in tqdm(jobs, desc="yardstick", unit="set"):
        family = "synthetic" if name.startswith("synthetic") else name
        methods = list(CLASSICAL) + ([m for m in NETWORK if family in unseen] if network else [])
        started = time.perf_counter()
        for observed, truth, scored, seed in scoring_cubes(name, kind, draws):
            table, spread, pairs = score(observed, truth, scored, methods, model, seed)
            key = (family if family != "synthetic" else name.rsplit("-", 1)[0], kind)
            rows.setdefault(key, []).append(table)
            spreads.setdefault(key, []).append(spread)
            honesty.setdefault(key, []).extend(pairs)
        tqdm.write(f"{name} ({kind}): {time.perf_counter() - started:.0f} s")
    return rows, spreads, honesty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=3, help="pasted-cloud draws per real stack (seeds 0..draws-1)")
    parser.add_argument("--sets", default=",".join(STACKS), help="comma-separated real stacks")
    parser.add_argument("--seeds", type=int, default=20, help="generator seeds per size (from 5000)")
    parser.add_argument("--sizes", default="512", help="generator scene sizes (px), e.g. 512,1024")
    parser.add_argument("--model", default=None, help="checkpoint to score (default: the packaged one)")
    parser.add_argument("--unseen", default=",".join(PACKAGED_UNSEEN), help="stacks the checkpoint never saw")
    parser.add_argument("--no-network", action="store_true", help="classical fillers only (fast)")
    args = parser.parse_args()
    tables = run_yardstick(
        args.sets.split(","),
        draws=args.draws,
        seeds=args.seeds,
        sizes=tuple(int(v) for v in args.sizes.split(",") if v),
        model=args.model,
        unseen=tuple(args.unseen.split(",")),
        network=not args.no_network,
    )
    print(report(*tables))


def report(
    rows: dict[tuple[str, str], list[dict[str, dict[str, float]]]],
    spreads: dict[tuple[str, str], list[dict[str, dict[str, float]]]],
    honesty: dict[tuple[str, str], list[tuple[float, float]]],
) -> str:
    """The Markdown tables: pooled PSNR per stack and method, then the uncertainty and the self-check."""
    methods = [*CLASSICAL, *NETWORK]
    lines = ["| stack (clouds) | " + " | ".join(methods) + " | best classical | auto - best classical |"]
    lines.append("|---|" + "---:|" * (len(methods) + 2))
    gaps = {}
    for (name, kind), draws in rows.items():
        mean = {m: float(np.mean([d[m]["pooled"] for d in draws])) for m in methods if m in draws[0]}
        worst = {m: float(np.min([d[m]["pooled"] for d in draws])) for m in mean}
        best = max((m for m in CLASSICAL if m in mean), key=lambda m: mean[m])  # noqa: B023
        cells = [f"{mean[m]:.2f} ({worst[m]:.2f})" if m in mean else "seen" for m in methods]
        gap = mean["auto"] - mean[best] if "auto" in mean else float("nan")
        gaps[name, kind] = gap
        lines.append(f"| {name} ({kind}) | " + " | ".join(cells) + f" | {best} | {gap:+.2f} |")
    lines.append("")
    lines.append("PSNR pooled over the bands (dB): mean over the draws (worst draw).")
    lines.append("")
    lines.append("| stack (clouds) | method | SAM (°) | SSIM | NDVI MAE | band-mean PSNR (dB) |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for (name, kind), draws in rows.items():
        for m in ("regression", "reference", "cmsn", "blend", "auto"):
            if m in draws[0]:
                values = {k: np.mean([d[m][k] for d in draws]) for k in ("sam", "ssim", "ndvi_mae", "psnr")}
                lines.append(
                    f"| {name} ({kind}) | {m} | {values['sam']:.2f} | {values['ssim']:.4f} | "
                    f"{values['ndvi_mae']:.4f} | {values['psnr']:.2f} |"
                )
    lines += ["", "| stack (clouds) | method | within 1 sigma % | within 2 sigma % | UCE (refl.) | rank corr. |"]
    lines.append("|---|---|---:|---:|---:|---:|")
    for key, draws in spreads.items():
        for m in draws[0]:
            values = {k: np.nanmean([d[m][k] for d in draws]) for k in ("within_1", "within_2", "uce", "rank")}
            lines.append(
                f"| {key[0]} ({key[1]}) | {m} | {100 * values['within_1']:.1f} | {100 * values['within_2']:.1f} | "
                f"{values['uce']:.4f} | {values['rank']:.2f} |"
            )
    lines += ["", "| stack (clouds) | self-check: mean abs(estimate - measured) (dB) | dates |", "|---|---:|---:|"]
    for key, pairs in honesty.items():
        diffs = [abs(e - m) for e, m in pairs if np.isfinite(e) and np.isfinite(m)]
        lines.append(f"| {key[0]} ({key[1]}) | {np.mean(diffs) if diffs else float('nan'):.2f} | {len(diffs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
