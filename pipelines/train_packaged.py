"""The recipe of the packaged checkpoint ``cmsn_cube/weights/cmsn-small.pt``, end to end.

1. ``stores``: write the training scenes (the embedded synthetic scene at several seeds, sizes, land-cover
   mixes and cloud levels; never the evaluation seed) to ``stores/train/``.
2. ``train``: ``cmsn-cube train`` on those stores (the project's own command; arguments in :data:`TRAIN_ARGS`).
3. ``package``: score the best checkpoint on an unseen embedded scene (seed :data:`EVAL_SEED`) and on the
   CBERS-4 series with pasted real cloud shapes, then write the checkpoint with ``save_checkpoint`` (so its
   card's sha256 matches) and the human model card ``cmsn-small.md``.

Run (2 CPU threads, tuned allocator as in DEVELOPERS.md)::

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1 \\
        python pipelines/train_packaged.py              # all stages
    python pipelines/train_packaged.py --stage package  # re-score and re-package an existing run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STORES = ROOT / "stores" / "train"
RUN_DIR = ROOT / "outputs" / "train" / "cmsn-small"
EVAL_STORE = ROOT / "stores" / "eval-1234.zarr"
CBERS = ROOT.parent / "shared" / "data" / "cbers_timeseries"
NAME = "cmsn-small"
#: Never a training seed: the scene the quality bar is measured on.
EVAL_SEED = 1234
BASELINES = ("nearest", "linear", "median", "regression")

_MIXED = {"water": 0.08, "forest": 0.27, "cropland": 0.45, "bare_soil": 0.08, "urban": 0.08}
_URBAN = {"water": 0.05, "forest": 0.15, "cropland": 0.3, "bare_soil": 0.15, "urban": 0.35}
_NATURAL = {"water": 0.2, "forest": 0.45, "cropland": 0.2, "bare_soil": 0.1, "urban": 0.05}
_FARMLAND = {"water": 0.05, "forest": 0.1, "cropland": 0.7, "bare_soil": 0.1, "urban": 0.05}
#: (seed, size, land cover, cloud fractions of the scene's own clouds T1, T2, T3).
TRAIN_SCENES: tuple[tuple[int, int, dict[str, float], tuple[float, float, float]], ...] = (
    (11, 768, _MIXED, (0.25, 0.15, 0.10)),
    (12, 768, _URBAN, (0.30, 0.20, 0.10)),
    (13, 768, _NATURAL, (0.15, 0.25, 0.10)),
    (14, 768, _FARMLAND, (0.25, 0.10, 0.20)),
    (15, 512, _MIXED, (0.10, 0.05, 0.05)),
    (16, 512, _URBAN, (0.35, 0.25, 0.15)),
    (17, 512, _NATURAL, (0.25, 0.15, 0.10)),
    (18, 512, _FARMLAND, (0.05, 0.10, 0.05)),
)
assert EVAL_SEED not in {seed for seed, *_ in TRAIN_SCENES}

#: Arguments of ``cmsn-cube train`` after the store paths.
TRAIN_ARGS: tuple[str, ...] = (
    "--out", str(RUN_DIR.relative_to(ROOT)),
    "--patch-size", "128",
    "--overlap", "32",
    "--batch-size", "8",
    "--steps", "3000",
    "--lr", "2e-3",
    "--schedule", "cosine",
    "--levels", "0.30,0.20,0.15",
    "--lambda-cloudy", "4",
    "--delta", "0.1",
    "--xi", "2",
    "--time-budget", "3300",
    "--seed", "0",
    "--device", "cpu",
    "--threads", "1",
    "--num-workers", "1",
)  # fmt: skip


def store_paths() -> list[Path]:
    return [STORES / f"seed{seed}-{size}.zarr" for seed, size, *_ in TRAIN_SCENES]


def write_stores() -> list[Path]:
    """Write the training scenes (skipping those already on disk)."""
    from cmsn_cube.sources.synthetic import synthetic_scene
    from cmsn_cube.store import write_cube

    for (seed, size, cover, clouds), path in zip(TRAIN_SCENES, store_paths(), strict=True):
        if not path.exists():
            scene = synthetic_scene(height=size, width=size, seed=seed, land_cover=cover, cloud_fractions=clouds)
            write_cube(scene, path)
    return store_paths()


def run_training() -> None:
    from cmsn_cube.cli import main
    from cmsn_cube.testing import SHARED_DATA_ENV, shared_data_dir

    # the real cloud shapes are read only from a folder named explicitly (the library never looks beside itself)
    if shared_data_dir() is not None:
        os.environ.setdefault(SHARED_DATA_ENV, str(shared_data_dir()))

    args = ["train", *[str(p.relative_to(ROOT)) for p in store_paths()], *TRAIN_ARGS]
    print("cmsn-cube " + shlex.join(args), flush=True)
    os.chdir(ROOT)
    main(args, standalone_mode=False)


#: Fine-tuning on real data: where it writes, and its settings (windows of 48 px fit the smallest real stack).
FINETUNE_DIR = ROOT / "outputs" / "train" / f"{NAME}-real"
FINETUNE: dict[str, Any] = {
    "patch_size": 48,
    "overlap": 24,
    "batch_size": 8,
    "levels": (0.30, 0.20, 0.15),
    "steps": 13000,
    "lr": 1e-3,
    "schedule": "cosine",
    "time_budget": 3300,
    "seed": 0,
}
#: synthetic scenes kept in the fine-tuning mix (a third of the windows with the real stacks' four)
FINETUNE_SCENES = 2
#: rows of the NAIP 5 m training part held out to pick the best fine-tuning step
FINETUNE_VALIDATION_ROWS = (312, 360)


def run_finetuning(init: Path) -> None:
    """Fine-tune the synthetic-data checkpoint ``init`` on the training parts of the real stacks and two
    synthetic scenes: clear-pixel normalisation, full-resolution regression prior, radiometric augmentation,
    every source the same share of each epoch."""
    import sys

    import torch

    from cmsn_cube.model.checkpoint import build_model, load_model
    from cmsn_cube.samples import TripletWindowDataset
    from cmsn_cube.store import open_cube
    from cmsn_cube.testing import SHARED_DATA_ENV, shared_data_dir
    from cmsn_cube.train import epoch_loader, train

    sys.path.insert(0, str(ROOT / "pipelines"))
    from real_stacks import STACKS, training_part

    if shared_data_dir() is None:
        raise SystemExit("fine-tuning needs the real stacks of ../shared/data (or $CMSN_SHARED_DATA)")
    os.environ.setdefault(SHARED_DATA_ENV, str(shared_data_dir()))
    torch.set_num_threads(2)
    settings = dict(FINETUNE)
    size, overlap, levels = settings.pop("patch_size"), settings.pop("overlap"), settings.pop("levels")
    batch_size, seed = settings.pop("batch_size"), settings.pop("seed")

    def windows(cube: Any, offset: int, **options: Any) -> TripletWindowDataset:
        return TripletWindowDataset(cube, size=size, overlap=overlap, levels=levels, seed=seed + offset, **options)

    parts = {name: training_part(name) for name in STACKS}
    train_sets = [
        windows(cube, k, rows=(0, FINETUNE_VALIDATION_ROWS[0] - overlap))
        if name == "naip-5m" else windows(cube, k)
        for k, (name, cube) in enumerate(parts.items())
    ]  # fmt: skip
    scenes = [open_cube(path).load() for path in store_paths()[:FINETUNE_SCENES]]
    train_sets += [windows(scene, 10 + k, truth="cube") for k, scene in enumerate(scenes)]
    val_sets = [windows(parts["naip-5m"], 99, rows=FINETUNE_VALIDATION_ROWS)]
    for name, dataset in zip([*parts, *(f"synthetic {k}" for k in range(len(scenes)))], train_sets, strict=True):
        print(f"{name}: {dataset.summary()}")
    loader = epoch_loader(train_sets, batch_size=batch_size, seed=seed, radiometric=True, balance=True)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(val_sets), batch_size=batch_size)
    pretrained = load_model(init)
    # same weights, new input handling: clear-pixel normalisation and the full-resolution regression prior
    model = build_model({**pretrained.config, "normalisation": "clear-pixels", "prior_factor": 1})
    model.load_state_dict(pretrained.state_dict())
    description = {
        "pretrained": {"checkpoint": str(init), "sha256": _sha256(init)},
        "real_stacks": {
            name: {"part": str(STACKS[name][1]), "windows": len(d)} for name, d in zip(parts, train_sets, strict=False)
        },
        "synthetic_stores": [str(p.relative_to(ROOT)) for p in store_paths()[:FINETUNE_SCENES]],
        "validation": f"naip-5m training part, rows {FINETUNE_VALIDATION_ROWS}",
        **FINETUNE,
        "radiometric": True,
        "balance": True,
    }
    train(model, loader, val_loader, checkpoint_dir=FINETUNE_DIR, device="cpu", training_data=description, **settings)


def _sha256(path: Path) -> str:
    from cmsn_cube.model.checkpoint import file_sha256

    return file_sha256(path)


def _records(table: Any) -> dict[str, dict[str, float]]:
    """Band-mean metrics per method and region, rounded, for the JSON card."""
    means = table.xs("mean", level="band")
    out: dict[str, dict[str, float]] = {}
    for (method, region), row in means.iterrows():
        for metric in ("psnr", "ssim", "mae", "rmse", "sam", "ndvi_mae", "coverage"):
            out.setdefault(method, {})[f"{metric}_{region}"] = round(float(row[metric]), 4)
    return out


def _markdown(table: Any, region: str = "common") -> str:
    """Band-mean table of one region in Markdown, with each method's coverage of all cloudy pixels."""
    means = table.xs((region, "mean"), level=("region", "band"))
    coverage = table.xs(("cloudy", "mean"), level=("region", "band"))["coverage"]
    lines = [
        "| method | PSNR (dB) | SSIM | SAM (°) | MAE | RMSE | NDVI MAE | cloudy pixels filled |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, row in means.iterrows():
        lines.append(
            f"| {method} | {row['psnr']:.2f} | {row['ssim']:.4f} | {row['sam']:.3f} | {row['mae']:.4f} | "
            f"{row['rmse']:.4f} | {row['ndvi_mae']:.4f} | {100 * coverage[method]:.1f} % |"
        )
    return "\n".join(lines)


def evaluate_embedded(checkpoint: Path) -> Any:
    """cmsn vs the baselines on the unseen embedded scene (its own clouds, scored against its truth)."""
    from cmsn_cube.evaluate import cmsn_method, evaluate
    from cmsn_cube.sources.synthetic import synthetic_scene
    from cmsn_cube.store import open_cube, write_cube

    if not EVAL_STORE.exists():
        write_cube(synthetic_scene(height=512, width=512, seed=EVAL_SEED), EVAL_STORE)
    methods = [cmsn_method(checkpoint), *BASELINES]
    return evaluate(open_cube(EVAL_STORE).load(), methods=methods, echo=print)


def cbers_triplets(cube: Any) -> list[tuple[int, int, int]]:
    """Consecutive, non-overlapping triplets of dates without real cloud or missing data."""
    masked = (cube["cloud_mask"] | cube["reflectance"].isnull().any("band")).mean(("y", "x")).values
    clear = [bool(v == 0) for v in masked]
    triplets, start = [], 0
    while start + 3 <= len(clear):
        if all(clear[start : start + 3]):
            triplets.append((start, start + 1, start + 2))
            start += 3
        else:
            start += 1
    return triplets


def evaluate_cbers(checkpoint: Path) -> tuple[Any, list[Any], list[tuple[int, int, int]]]:
    """cmsn vs the baselines on CBERS-4 AWFI (64 m): pasted real cloud shapes on clear date triplets."""
    from cmsn_cube.evaluate import cmsn_method, evaluate
    from cmsn_cube.sources.cbers import open_cbers_series

    cube = open_cbers_series(CBERS).load()
    triplets = cbers_triplets(cube)
    methods = [cmsn_method(checkpoint), *BASELINES]
    tables = [evaluate(cube.isel(time=list(t)), methods=methods, truth="pasted", seed=0, echo=None) for t in triplets]
    first = tables[0]
    print(f"CBERS triplet {triplets[0]}:")
    from cmsn_cube.evaluate import format_table

    print(format_table(first))
    return first, tables, triplets


def _pooled_cbers(tables: list[Any]) -> str:
    """Mean over triplets of the cloudy band-mean PSNR/SSIM/SAM per method (Markdown)."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for table in tables:
        means = table.xs(("common", "mean"), level=("region", "band"))
        for method, row in means.iterrows():
            rows.setdefault(method, []).append((row["psnr"], row["ssim"], row["sam"]))
    lines = [
        "| method | mean PSNR (dB) | mean SSIM | mean SAM (°) | triplets won (PSNR) |",
        "|---|---:|---:|---:|---:|",
    ]
    best_per_triplet = [
        max(rows, key=lambda m: rows[m][i][0])
        for i in range(len(tables))  # noqa: B023
    ]
    for method, values in rows.items():
        array = np.array(values)
        wins = sum(1 for winner in best_per_triplet if winner == method)
        lines.append(
            f"| {method} | {array[:, 0].mean():.2f} | {array[:, 1].mean():.4f} | {array[:, 2].mean():.3f} | "
            f"{wins}/{len(tables)} |"
        )
    return "\n".join(lines)


def package() -> Path:
    """Score ``RUN_DIR/best.pt``, then write the packaged checkpoint, its JSON card and the Markdown card."""

    from cmsn_cube.model.checkpoint import WEIGHTS_DIR, file_sha256, load_checkpoint, load_model, save_checkpoint

    best = RUN_DIR / "best.pt"
    payload = load_checkpoint(best)
    metadata = dict(payload["metadata"])
    embedded = evaluate_embedded(best)
    cbers_first, cbers_tables, triplets = evaluate_cbers(best)
    from cmsn_cube.sources.cbers import open_cbers_series

    times = open_cbers_series(CBERS)["time"].values
    cbers_dates = [str(times[i])[:10] for i in triplets[0]]
    train_command = "cmsn-cube " + shlex.join(
        ["train", *[str(p.relative_to(ROOT)) for p in store_paths()], *TRAIN_ARGS]
    )
    metadata.update(
        recipe={
            "pipeline": "python pipelines/train_packaged.py",
            "train_command": train_command,
            "scenes": [
                {"seed": seed, "size": size, "land_cover": cover, "cloud_fractions": list(clouds)}
                for seed, size, cover, clouds in TRAIN_SCENES
            ],
            "hardware": (
                f"{platform.machine()} CPU ({os.cpu_count()} cores): {TRAIN_ARGS[TRAIN_ARGS.index('--threads') + 1]} "
                f"torch thread + {TRAIN_ARGS[TRAIN_ARGS.index('--num-workers') + 1]} loader worker"
            ),
        },
        evaluation={
            "embedded_unseen": {"scene": f"synthetic_scene(512, 512, seed={EVAL_SEED})", **_records(embedded)},
            "cbers": {
                "series": "CBERS-4 AWFI 64 m, ../shared/data/cbers_timeseries",
                "dates": cbers_dates,
                "pasted_seed": 0,
                **_records(cbers_first),
            },
        },
    )
    # the loss history travels in the card, so `cmsn-cube demo` can draw the packaged model's loss curves
    history = json.loads((RUN_DIR / "history.json").read_text())
    metadata["history"] = {
        part: [{key: round(value, 6) if isinstance(value, float) else value for key, value in record.items()}
               for record in records]
        for part, records in history.items()
    }  # fmt: skip
    model = load_model(best)
    target = WEIGHTS_DIR / f"{NAME}.pt"
    save_checkpoint(target, model, metadata=metadata)
    training = metadata["training"]
    size_mb = target.stat().st_size / 1e6
    text = f"""# {NAME}: the packaged CMSN checkpoint

`{target.name}` ({size_mb:.2f} MB, sha256 `{file_sha256(target)}`), {model.num_parameters:,} parameters,
architecture `{model.config["architecture"]}` (width {model.config["width"]}, depth {model.config["depth"]},
fusion depth {model.config["fusion_depth"]}, skip width {model.config["skip_width"]}), bands
{", ".join(model.config["bands"])} (TOA reflectance in [0, 1]). Load it with `load_model("{NAME}")`; it is the
default of `cmsn-cube reconstruct` and `cmsn-cube evaluate --methods cmsn`.

## How it was trained

Recipe: `python pipelines/train_packaged.py` (writes the stores, trains, scores, packages). The training call:

```
{train_command}
```

- Data: the embedded synthetic scene at seeds {", ".join(str(s) for s, *_ in TRAIN_SCENES)} (sizes
  {", ".join(f"{z}²" for _, z, *_ in TRAIN_SCENES)}), four land-cover mixes and different cloud levels; the
  evaluation seed {EVAL_SEED} is not among them. Truth is each scene's cloud-free `truth`; the model sees
  the scene's own clouds plus clouds pasted onto clear pixels (shapes from the other dates' real masks, the
  UKIS Landsat reference masks, or fractal noise) up to 30 %, 20 %, 15 % masked for T1, T2, T3. Windows of
  128 px, batch 8, random flips and quarter turns, new pasted clouds every epoch; the last 20 % of rows of
  every scene is the validation hold-out.
- Optimisation: AdamW, peak lr {training["lr"]}, {training["schedule"]} schedule, gradient clipping
  {training["grad_clip"]}, loss weights {json.dumps(training["loss_weights"])} (λ on cloudy pixels, δ on the
  frequency loss, ξ on the refinement loss).
- Steps: {training["steps"]} ({training["epochs"]} epochs), wall time {training["train_seconds"] / 60:.1f} min
  on {metadata["recipe"]["hardware"]}, torch {training["torch"]}; no GPU.
- Best validation (held-out rows, pasted + real clouds): PSNR cloudy
  {metadata["metrics"].get("psnr_cloudy", float("nan")):.2f} dB, SSIM cloudy
  {metadata["metrics"].get("ssim_cloudy", float("nan")):.4f} at step {metadata["metrics"].get("step")}.

## Evaluation

### Embedded scene, unseen seed {EVAL_SEED} (512 × 512, its own clouds 25 %, 15 %, 10 %)

`cmsn-cube synth stores/eval-1234.zarr --seed {EVAL_SEED}` then
`cmsn-cube evaluate stores/eval-1234.zarr --methods cmsn,{",".join(BASELINES)}`; band means over the cloudy
pixels that every method filled (the `common` region of the table: the classical fillers leave pixels that are
cloudy on all three dates empty, the network fills them too, last column):

{_markdown(embedded)}

The same, scored on every cloudy pixel each method filled (`cloudy` region; the network's row includes the
pixels cloudy on every date, which no clear observation helps with):

{_markdown(embedded, "cloudy")}

### Real data: CBERS-4 AWFI series (64 m, another sensor)

Dates {", ".join(cbers_dates)} of the series (positions {triplets[0]}), clear, with real cloud shapes
pasted at 25 %, 15 %, 10 % (`make_scoring_cube`, seed 0), 50 × 50 px:

{_markdown(cbers_first)}

All {len(triplets)} clear consecutive triplets of the series, same pasting:

{_pooled_cbers(cbers_tables)}

The model was trained only on the synthetic 30 m Landsat-like scene; CBERS is 64 m, 50 × 50 px, with other
spectral responses, so these numbers measure transfer, not fit.
"""
    (WEIGHTS_DIR / f"{NAME}.md").write_text(text)
    print(f"wrote {target} ({size_mb:.2f} MB), {target.with_suffix('.json')}, {WEIGHTS_DIR / (NAME + '.md')}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["all", "stores", "train", "finetune", "package"], default="all")
    parser.add_argument("--init", type=Path, default=RUN_DIR / "best.pt", help="checkpoint the fine-tuning starts from")
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE["steps"], help="fine-tuning steps")
    args = parser.parse_args()
    stage = args.stage
    FINETUNE["steps"] = args.finetune_steps
    started = time.monotonic()
    if stage in ("all", "stores", "train", "finetune"):
        write_stores()
    if stage in ("all", "train"):
        run_training()
    if stage in ("all", "finetune"):
        run_finetuning(args.init)
    if stage in ("all", "package"):
        package()
    print(f"done in {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
