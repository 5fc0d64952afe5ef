"""The recipe of the packaged checkpoint ``cmsn_cube/weights/cmsn-small.pt``, end to end.

1. ``stores``: write the training scenes (the embedded synthetic scene at several seeds, sizes, land-cover
   mixes and cloud levels; never the evaluation seed) to ``stores/train/``.
2. ``train``: pretraining, ``cmsn-cube train`` on those stores (arguments in :data:`TRAIN_ARGS`), 55 min.
3. ``finetune``: from that checkpoint (``--init``), training on the training parts of the real stacks of
   ../shared/data (``pipelines/real_stacks.py``) and two synthetic scenes, with clear-pixel normalisation,
   the full-resolution regression prior, radiometric augmentation and balanced sources (:data:`FINETUNE`).
4. ``package``: score the best fine-tuned checkpoint on an unseen embedded scene (seed :data:`EVAL_SEED`) and
   on the scored parts of the real stacks (``benchmarks/bench_quality.py``), then write the checkpoint with
   ``save_checkpoint`` (so its card's sha256 matches) and the human model card ``cmsn-small.md``.

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
from real_stacks import STACKS, training_part  # this folder: the script's own

ROOT = Path(__file__).resolve().parent.parent
STORES = ROOT / "stores" / "train"
RUN_DIR = ROOT / "outputs" / "train" / "cmsn-small"
EVAL_STORE = ROOT / "stores" / "eval-1234.zarr"
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
    # fine-tuning phase 5: more, smaller scenes, for variety of the generator's layouts
    *(
        (seed, 384, cover, clouds)
        for seed, cover, clouds in zip(
            range(21, 37),
            [_MIXED, _URBAN, _NATURAL, _FARMLAND] * 4,
            [(0.25, 0.15, 0.10), (0.30, 0.10, 0.20), (0.15, 0.25, 0.10), (0.35, 0.20, 0.15)] * 4,
            strict=True,
        )
    ),
)
#: Pretraining used the first eight scenes only.
PRETRAIN_SCENES = 8
#: A synthetic scene kept out of training and evaluation: phase 5 picks its best step on it and the NAIP rows.
VALIDATION_SCENE_SEED = 97
assert not {EVAL_SEED, VALIDATION_SCENE_SEED} & {seed for seed, *_ in TRAIN_SCENES}

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

    args = ["train", *[str(p.relative_to(ROOT)) for p in store_paths()[:PRETRAIN_SCENES]], *TRAIN_ARGS]
    print("cmsn-cube " + shlex.join(args), flush=True)
    os.chdir(ROOT)
    main(args, standalone_mode=False)


#: Fine-tuning on real data, in phases, each from the best checkpoint of the one before (windows of 48 px fit
#: the smallest real stack). Phase 1 learns the real stacks with a third of synthetic windows (two scenes); it
#: gave +1.6 dB over the best classical filler on the real stacks but kept only +0.7 dB on the embedded scene
#: (+2.5 dB before), so phase 2 gives the synthetic scenes half the windows (four scenes) at a lower rate.
FINETUNE_PHASES: tuple[dict[str, Any], ...] = (
    {"scenes": 2, "steps": 13000, "lr": 1e-3, "time_budget": 3300},
    {"scenes": 4, "steps": 4000, "lr": 3e-4, "time_budget": 1500},
    # wider windows for the synthetic scenes' larger structures: only the stacks tall enough for them
    {
        "scenes": 4,
        "steps": 2400,
        "lr": 2e-4,
        "time_budget": 900,
        "patch_size": 96,
        "overlap": 32,
        "batch_size": 4,
        "stacks": ("s2-sr", "naip-5m"),
    },
    # every synthetic scene, wider still
    {
        "scenes": 8,
        "steps": 2000,
        "lr": 1.5e-4,
        "time_budget": 840,
        "patch_size": 112,
        "overlap": 32,
        "batch_size": 4,
        "stacks": ("s2-sr", "naip-5m"),
    },
    # all 24 synthetic scenes; the best step is picked on a held-out synthetic scene as well as the NAIP rows
    {
        "scenes": 24,
        "steps": 2400,
        "lr": 1.5e-4,
        "time_budget": 1200,
        "patch_size": 112,
        "overlap": 32,
        "batch_size": 4,
        "stacks": ("s2-sr", "naip-5m"),
        "validate_on_synthetic": True,
    },
)
#: Settings every phase shares.
FINETUNE: dict[str, Any] = {
    "patch_size": 48,
    "overlap": 24,
    "batch_size": 8,
    "levels": (0.30, 0.20, 0.15),
    "schedule": "cosine",
    "seed": 0,
}
#: rows of the NAIP 5 m training part held out to pick the best fine-tuning step
FINETUNE_VALIDATION_ROWS = (312, 360)


def finetune_dir(phase: int) -> Path:
    """Where fine-tuning phase ``phase`` (from 1) writes its checkpoints."""
    return ROOT / "outputs" / "train" / (f"{NAME}-real" if phase == 1 else f"{NAME}-real-{phase}")


def run_finetuning(init: Path, phase: int) -> Path:
    """Fine-tune ``init`` (phase 1: the synthetic-data checkpoint) on the training parts of the real stacks and
    synthetic scenes (:data:`FINETUNE_PHASES`): clear-pixel normalisation, full-resolution regression prior,
    radiometric augmentation, every source the same share of each epoch. Returns the phase's best checkpoint."""

    import torch

    from cmsn_cube.model.checkpoint import build_model, load_model
    from cmsn_cube.samples import TripletWindowDataset
    from cmsn_cube.store import open_cube
    from cmsn_cube.testing import SHARED_DATA_ENV, shared_data_dir
    from cmsn_cube.train import epoch_loader, train

    if shared_data_dir() is None:
        raise SystemExit("fine-tuning needs the real stacks of ../shared/data (or $CMSN_SHARED_DATA)")
    os.environ.setdefault(SHARED_DATA_ENV, str(shared_data_dir()))
    torch.set_num_threads(2)
    settings = {**FINETUNE, **FINETUNE_PHASES[phase - 1]}
    n_scenes, stacks = settings.pop("scenes"), settings.pop("stacks", tuple(STACKS))
    size, overlap, levels = settings.pop("patch_size"), settings.pop("overlap"), settings.pop("levels")
    batch_size, seed = settings.pop("batch_size"), settings.pop("seed")
    validate_on_synthetic = settings.pop("validate_on_synthetic", False)

    def windows(cube: Any, offset: int, **options: Any) -> TripletWindowDataset:
        return TripletWindowDataset(cube, size=size, overlap=overlap, levels=levels, seed=seed + offset, **options)

    parts = {name: training_part(name) for name in stacks}
    train_sets = [
        windows(cube, k, rows=(0, FINETUNE_VALIDATION_ROWS[0] - overlap))
        if name == "naip-5m" else windows(cube, k)
        for k, (name, cube) in enumerate(parts.items())
    ]  # fmt: skip
    scenes = [open_cube(path).load() for path in store_paths()[:n_scenes]]
    train_sets += [windows(scene, 10 + k, truth="cube") for k, scene in enumerate(scenes)]
    # one validation for every phase: 48 px windows of the held-out NAIP rows
    validation_part = parts["naip-5m"] if "naip-5m" in parts else training_part("naip-5m")
    val_sets = [
        TripletWindowDataset(
            validation_part, size=FINETUNE["patch_size"], overlap=FINETUNE["overlap"], levels=levels,
            seed=seed + 99, rows=FINETUNE_VALIDATION_ROWS,
        )
    ]  # fmt: skip
    if validate_on_synthetic:
        from cmsn_cube.sources.synthetic import synthetic_scene

        held_out = synthetic_scene(height=384, width=384, seed=VALIDATION_SCENE_SEED)
        val_sets.append(
            TripletWindowDataset(
                held_out,
                size=FINETUNE["patch_size"],
                overlap=FINETUNE["overlap"],
                levels=levels,
                seed=seed + 98,
                truth="cube",
            )
        )
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
        "synthetic_stores": [str(p.relative_to(ROOT)) for p in store_paths()[:n_scenes]],
        "validation": f"naip-5m training part, rows {FINETUNE_VALIDATION_ROWS}"
        + (f"; synthetic scene seed {VALIDATION_SCENE_SEED}, 384 x 384 px" if validate_on_synthetic else ""),
        "phase": phase,
        **FINETUNE,
        **FINETUNE_PHASES[phase - 1],
        "radiometric": True,
        "balance": True,
    }
    out = finetune_dir(phase)
    train(
        model,
        loader,
        val_loader,
        checkpoint_dir=out,
        device="cpu",
        training_data=description,
        overwrite=True,
        **settings,
    )  # a phase run again starts afresh
    return out / "best.pt"


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
    from cmsn_cube.metrics import SSIM_NAME

    means = table.xs((region, "mean"), level=("region", "band"))
    coverage = table.xs(("cloudy", "mean"), level=("region", "band"))["coverage"]
    lines = [
        f"| method | PSNR (dB) | {SSIM_NAME} | SAM (°) | MAE | RMSE | NDVI MAE | cloudy pixels filled |",
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


def evaluate_real(checkpoint: Path) -> tuple[Any, str]:
    """The real-data yardstick (``benchmarks/bench_quality.py``, 3 draws) on the stacks the checkpoint never saw.

    The packaged checkpoint is fine-tuned on parts of cbers, s2-sr and the NAIP stacks: only the others, and
    the generator seeds, score it (``bench_quality.PACKAGED_UNSEEN``).
    """
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_quality import STACKS, report, run_yardstick

    tables = run_yardstick(list(STACKS), draws=3, seeds=20, model=str(checkpoint))
    return tables, report(*tables)


def package() -> Path:
    """Score the last fine-tuning phase's ``best.pt``, then write the packaged checkpoint, its JSON card and the
    Markdown card."""

    from cmsn_cube.model.checkpoint import WEIGHTS_DIR, file_sha256, load_checkpoint, load_model, save_checkpoint

    last_dir = finetune_dir(len(FINETUNE_PHASES))
    best = last_dir / "best.pt"
    payload = load_checkpoint(best)
    metadata = dict(payload["metadata"])
    embedded = evaluate_embedded(best)
    real, real_table = evaluate_real(best)
    pretrain_command = "cmsn-cube " + shlex.join(
        ["train", *[str(p.relative_to(ROOT)) for p in store_paths()[:PRETRAIN_SCENES]], *TRAIN_ARGS]
    )
    pretrained = json.loads((finetune_dir(1) / "best.json").read_text())["training"]["training_data"]["pretrained"]
    metadata.update(
        recipe={
            "pipeline": "python pipelines/train_packaged.py",
            "pretrain_command": pretrain_command,
            "pretrained": pretrained,
            "finetune": {key: list(v) if isinstance(v, tuple) else v for key, v in FINETUNE.items()},
            "finetune_phases": list(FINETUNE_PHASES),
            "scenes": [
                {"seed": seed, "size": size, "land_cover": cover, "cloud_fractions": list(clouds)}
                for seed, size, cover, clouds in TRAIN_SCENES
            ],
            "hardware": f"{platform.machine()} CPU ({os.cpu_count()} cores), 2 torch threads",
        },
        evaluation={
            "embedded_unseen": {"scene": f"synthetic_scene(512, 512, seed={EVAL_SEED})", **_records(embedded)},
            "real_stacks": {
                "benchmark": "python benchmarks/bench_quality.py --draws 3",
                **{
                    f"{name} ({kind})": {
                        method: {metric: float(np.mean([d[method][metric] for d in draws])) for metric in draws[0][method]}
                        for method in draws[0]
                    }
                    for (name, kind), draws in real[0].items()
                },
            },
        },
    )  # fmt: skip
    # the loss history travels in the card, so `cmsn-cube demo` can draw the packaged model's loss curves
    history = json.loads((last_dir / "history.json").read_text())
    metadata["history"] = {
        part: [{key: round(value, 6) if isinstance(value, float) else value for key, value in record.items()}
               for record in records]
        for part, records in history.items()
    }  # fmt: skip
    model = load_model(best)
    target = WEIGHTS_DIR / f"{NAME}.pt"
    save_checkpoint(target, model, metadata=metadata, overwrite=True)  # this pipeline makes the packaged model
    training = metadata["training"]
    size_mb = target.stat().st_size / 1e6
    config = model.config
    phase_lines = []
    for phase, settings in enumerate(FINETUNE_PHASES, start=1):
        card = json.loads((finetune_dir(phase) / "best.json").read_text())["training"]
        seeds = ", ".join(str(seed) for seed, *_ in TRAIN_SCENES[: settings["scenes"]])
        phase_lines.append(
            f"   - phase {phase}: synthetic scenes of seeds {seeds} beside the real stacks "
            f"{', '.join(settings.get('stacks', tuple(STACKS)))}, windows of {settings.get('patch_size', FINETUNE['patch_size'])} px, "
            f"peak lr {settings['lr']}, {card['steps']} steps, {card['train_seconds'] / 60:.1f} min"
        )
    phase_lines = "\n".join(phase_lines)  # type: ignore[assignment]
    text = f"""# {NAME}: the packaged CMSN checkpoint

`{target.name}` ({size_mb:.2f} MB, sha256 `{file_sha256(target)}`), {model.num_parameters:,} parameters,
architecture `{config["architecture"]}` (width {config["width"]}, depth {config["depth"]}, fusion depth
{config["fusion_depth"]}, skip width {config["skip_width"]}), bands {", ".join(config["bands"])} (reflectance in
[0, 1], TOA or surface reflectance). Load it with `load_model("{NAME}")`; it is the default of
`cmsn-cube reconstruct` and `cmsn-cube evaluate --methods cmsn`.

## What it is

The network's output is a classical local regression plus a learned residual. For each cloudy pixel of a date,
every other date predicts it through a gain and an offset fitted per band in a 31 × 31 px window (on pixels clear
in both dates), and the predictions are averaged, weighted by how well each fit explains its window: that is
the `weighted-regression` filler, computed at full resolution inside the network. The coarse decoder adds a
residual to it, and the refinement stage adds another. There is no output activation (no tanh). Each date of a
tile is standardised by its own clear pixels, band by band ({config["normalisation"]} normalisation), and the
output is brought back with the same statistics, so a gain and an offset per date and band (TOA against
surface reflectance, another sensor, haze) change nothing.

## How it was trained

Recipe: `python pipelines/train_packaged.py` (stages `stores`, `train`, `finetune`, `package`).

1. Pretraining on the embedded synthetic scene (stage `train`, 55 min on 2 CPU cores, fixed band statistics
   and a coarse regression prior at the time), checkpoint sha256 `{pretrained["sha256"]}`:

   ```
   {pretrain_command}
   ```

2. Fine-tuning (stage `finetune`) from those weights with clear-pixel normalisation and the full-resolution
   prior, on the **training parts** of the real stacks of ../shared/data (`pipelines/real_stacks.py`: CBERS-4
   dates 1-12, the north half of the Sentinel-2 surface-reflectance stack, the north half of NAIP at 30 m and
   at 5 m) and synthetic scenes, every source the same share of each epoch; windows of
   {FINETUNE["patch_size"]} px, batch {FINETUNE["batch_size"]}, real cloud shapes (UKIS Landsat masks, CBERS'
   own) pasted up to 30 %, 20 %, 15 % for T1, T2, T3, random flips and quarter turns, and per-date, per-band
   gain/offset/haze changes; AdamW, {FINETUNE["schedule"]} schedule, in {len(FINETUNE_PHASES)} phases, each from
   the best checkpoint of the one before:

{phase_lines}

   The best step of the last phase on its validation ({training["training_data"]["validation"]}: PSNR cloudy
   {metadata["metrics"].get("psnr_cloudy", float("nan")):.2f} dB at step {metadata["metrics"].get("step")}), on
   {metadata["recipe"]["hardware"]}, torch {training["torch"]}.

## Evaluation on real data

`python benchmarks/bench_quality.py --draws 5`: real cloud shapes pasted at 25 %, 15 %, 10 % on the **scored
parts** of the stacks (never seen in training), 5 draws, every method scored on the pasted pixels all of them
filled; band-mean PSNR and SAM:

{real_table}

### Embedded scene, unseen seed {EVAL_SEED} (512 × 512, its own clouds 25 %, 15 %, 10 %)

`cmsn-cube synth stores/eval-1234.zarr --seed {EVAL_SEED}` then
`cmsn-cube evaluate stores/eval-1234.zarr --methods cmsn,{",".join(BASELINES)}`; band means over the cloudy
pixels every method filled:

{_markdown(embedded)}
"""
    (WEIGHTS_DIR / f"{NAME}.md").write_text(text)
    print(f"wrote {target} ({size_mb:.2f} MB), {target.with_suffix('.json')}, {WEIGHTS_DIR / (NAME + '.md')}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["all", "stores", "train", "finetune", "package"], default="all")
    parser.add_argument("--init", type=Path, default=RUN_DIR / "best.pt", help="checkpoint the fine-tuning starts from")
    parser.add_argument("--phases", default="1,2,3,4,5", help="fine-tuning phases to run (1: from --init)")
    args = parser.parse_args()
    stage = args.stage
    started = time.monotonic()
    if stage in ("all", "stores", "train", "finetune"):
        write_stores()
    if stage in ("all", "train"):
        run_training()
    if stage in ("all", "finetune"):
        init = args.init
        for phase in (int(p) for p in args.phases.split(",")):
            init = run_finetuning(init if phase == 1 else finetune_dir(phase - 1) / "best.pt", phase)
    if stage in ("all", "package"):
        package()
    print(f"done in {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
