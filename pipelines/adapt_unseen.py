"""Issue 8's measurement: does adapting the packaged model to an unseen scene beat the packaged model?

Two scenes the packaged checkpoint never saw:

(a) ``embedded``: the embedded scene with land-cover proportions outside its training mixes (25 % water, 30 %
    bare soil, 20 % urban, 5 % forest), a new seed, labelled LANDSAT_5. Scored on the scene's own *real* clouds
    against its cloud-free ``truth``: those pixels are cloudy in the cube, so the fit never had their values
    (fit learns only from clear observations; the cube's ``truth`` is dropped before fitting).
(b) ``cbers``: the real CBERS-4 AWFI series (24 dates, 64 m). Real cloud shapes are pasted on its clear pixels
    (``make_scoring_cube``, seed 7) *before* fitting, so the fit sees exactly the cube a user would have, with
    the evaluation pixels already hidden under clouds: it can never train on them. The fit pastes its own,
    different clouds (its own seed) on the remaining clear pixels.

Each scene is written to a Zarr store and fitted from the store (lazy window reads), within ``--time-budget``
seconds on this machine. Every method is scored in the cloudy (scored) pixels of the whole scene and, separately,
of the fit's validation block (rows the training sampler never read at all).

Run::

    python pipelines/adapt_unseen.py                      # packaged model, both scenes
    python pipelines/adapt_unseen.py --quick              # smoke test with a tiny model and small scenes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "stores" / "adapt"
BASELINES = ("nearest", "linear", "median", "regression")
#: Outside every land-cover mix of pipelines/train_packaged.py (most water 0.2, bare soil 0.15, urban 0.35).
UNSEEN_LAND_COVER = {"water": 0.25, "forest": 0.05, "cropland": 0.2, "bare_soil": 0.3, "urban": 0.2}
#: Not a training seed (11-18) nor the packaged evaluation seed (1234).
UNSEEN_SEED = 4321
CBERS_PASTE_SEED = 7


def embedded_scene(size: int) -> tuple[xr.Dataset, str]:
    from cmsn_cube.sources.synthetic import synthetic_scene

    cube = synthetic_scene(height=size, width=size, seed=UNSEEN_SEED, sensor="LANDSAT_5", land_cover=UNSEEN_LAND_COVER)
    return cube, f"embedded seed {UNSEEN_SEED}, {size}x{size}, LANDSAT_5, water/bare/urban-heavy"


def cbers_scene() -> tuple[xr.Dataset, str]:
    from cmsn_cube.clouds import make_scoring_cube
    from cmsn_cube.sources.cbers import open_cbers_series
    from cmsn_cube.testing import shared_data_path

    folder = shared_data_path("cbers_timeseries")
    if folder is None:
        raise SystemExit("../shared/data/cbers_timeseries is not here")
    observed, truth, scored = make_scoring_cube(open_cbers_series(folder).load(), seed=CBERS_PASTE_SEED)
    # evaluate's truth="cube" mode scores cloud_mask pixels where truth is finite: only the pasted ones qualify
    return observed.assign(truth=truth), "CBERS-4 AWFI 64 m, 24 dates, 50x50, real shapes pasted (seed 7)"


def score(cube: xr.Dataset, methods: dict[str, Any], rows: tuple[int, int]) -> dict[str, dict[str, float]]:
    """Cloudy-pixel PSNR/SSIM/SAM of every method, on the whole scene and on the hold-out block rows.

    Every method is scored on the same pixels: the cloudy ones that all of them filled (the baselines leave
    pixels cloudy on every date empty).
    """
    from cmsn_cube.baselines import BASELINES as FUNCTIONS
    from cmsn_cube.evaluate import scoring_setup
    from cmsn_cube.metrics import common_pixels, evaluate_reconstruction

    observed, truth, scored = scoring_setup(cube, truth="cube")
    functions = {**{b: FUNCTIONS[b] for b in BASELINES}, **methods}
    reconstructions = {name: method(observed) for name, method in functions.items()}
    common = common_pixels(scored, reconstructions.values())
    block = np.zeros_like(common)
    block[:, rows[0] : rows[1]] = common[:, rows[0] : rows[1]]
    results = {}
    for name, reconstructed in reconstructions.items():
        whole = evaluate_reconstruction(reconstructed, truth, common).loc[("cloudy", "mean")]
        held = evaluate_reconstruction(reconstructed, truth, block).loc[("cloudy", "mean")]
        results[name] = {
            "psnr": float(whole["psnr"]),
            "ssim": float(whole["ssim"]),
            "sam": float(whole["sam"]),
            "psnr_block": float(held["psnr"]),
            "n_pixels": int(whole["n_pixels"]),
            "n_block": int(held["n_pixels"]),
        }
    return results


def network(model: Any, name: str) -> Any:
    from cmsn_cube.inference import reconstruct

    def run(cube: xr.Dataset) -> xr.DataArray:
        return reconstruct(cube, model=model)["reconstructed"].compute()

    run.__name__ = name
    return run


def measure(
    label: str, cube: xr.Dataset, description: str, *, model: Any, options: dict[str, Any], folder: Path
) -> dict[str, Any]:
    from cmsn_cube.adapt import fit
    from cmsn_cube.store import write_cube

    store = write_cube(cube, folder / f"{label}.zarr", overwrite=True)
    started = time.monotonic()
    fitted = fit(store, model=model, out=folder / f"{label}-fitted.pt", overwrite=True, **options)
    wall = time.monotonic() - started
    rows = tuple(fitted.card["split"]["validation_rows"])
    results = score(cube, {"packaged": network(model, "packaged"), "adapted": network(fitted.model, "adapted")}, rows)
    return {
        "scene": label,
        "description": description,
        "fit_wall_s": wall,
        "fit_steps": fitted.steps,
        "stop_reason": fitted.stop_reason,
        "holdout_windows_psnr": [fitted.before["psnr_cloudy"], fitted.after["psnr_cloudy"]],
        "validation_rows": list(rows),
        "checkpoint": str(fitted.checkpoint),
        "methods": results,
    }


def table(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'scene':<9} {'method':<26} {'PSNR cloudy':>12} {'SSIM cloudy':>12} {'SAM':>7} {'PSNR hold-out':>14}"
        f"\n{'':<9} {'':<26} {'(dB)':>12} {'(1)':>12} {'(deg)':>7} {'block (dB)':>14}"
    )
    lines = [head]
    for record in records:
        methods = record["methods"]
        best = max(BASELINES, key=lambda b: methods[b]["psnr"])
        for name, shown in ((best, f"best baseline: {best}"), ("packaged", "packaged"), ("adapted", "adapted")):
            m = methods[name]
            lines.append(
                f"{record['scene']:<9} {shown:<26} {m['psnr']:12.2f} {m['ssim']:12.4f} {m['sam']:7.2f} "
                f"{m['psnr_block']:14.2f}"
            )
        gain = methods["adapted"]["psnr"] - methods["packaged"]["psnr"]
        gain_block = methods["adapted"]["psnr_block"] - methods["packaged"]["psnr_block"]
        lines.append(
            f"{record['scene']:<9} {'gain vs packaged':<26} {gain:+12.2f} {'':>12} {'':>7} {gain_block:+14.2f}"
        )
        lines.append(
            f"{'':<9} fit {record['fit_wall_s']:.0f} s wall ({record['fit_steps']} steps, {record['stop_reason']}); "
            f"scored px {m['n_pixels']} (block {m['n_block']}); {record['description']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="source checkpoint (default: the packaged cmsn-small)")
    parser.add_argument("--scenes", default="embedded,cbers")
    parser.add_argument("--size", type=int, default=512, help="embedded scene side in pixels")
    parser.add_argument("--time-budget", type=float, default=280.0, help="seconds per fit (issue: <= 300)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="tiny model, 128-px scene, 6 steps (smoke test)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    model: Any = args.model
    options = {"steps": args.steps, "time_budget": args.time_budget, "lr": args.lr, "seed": args.seed}
    if args.quick:
        from cmsn_cube.model import CMSN
        from cmsn_cube.model.checkpoint import save_checkpoint

        model = save_checkpoint(Path(tempfile.mkdtemp()) / "tiny.pt", CMSN(width=8, depth=1, skip_width=4))
        args.size, options = 128, {**options, "steps": 6, "validate_every": 3}
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for label in args.scenes.split(","):
        cube, description = embedded_scene(args.size) if label == "embedded" else cbers_scene()
        records.append(measure(label, cube, description, model=model, options=options, folder=args.out))
        print(table(records[-1:]), flush=True)
    print("\n" + table(records))
    (args.out / "adapt_unseen.json").write_text(json.dumps(records, indent=1))
    print(f"wrote {args.out / 'adapt_unseen.json'}")


if __name__ == "__main__":
    main()
