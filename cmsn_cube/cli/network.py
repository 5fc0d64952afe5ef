"""``cmsn-cube`` commands that run the network: ``reconstruct``, ``train`` and ``fit``."""

from __future__ import annotations

from pathlib import Path

import click

from cmsn_cube.cli.group import main
from cmsn_cube.cli.options import COUNT, POSITIVE, SEED, FloatList, device_option, workers_option
from cmsn_cube.selfcheck import METHODS  # numpy only: --help stays instant


@main.command()
@click.argument("store", type=str)
@click.argument("out", type=str)
@click.option("--model", default=None, help="Packaged model name or checkpoint path (default: the packaged model).")
@click.option(
    "--scheduler",
    default=None,
    help="Address of an existing Dask scheduler (tcp://host:8786); default: a LocalCluster.",
)
@workers_option(default=None, help="LocalCluster worker processes (default: one per core).")
@click.option("--tile", type=click.IntRange(min=16), default=256, help="Window size fed to the network, in pixels.")
@click.option(
    "--overlap",
    type=click.IntRange(min=0),
    default=32,
    help="Pixels shared by neighbouring windows (blended); less than half a tile.",
)
@click.option("--batch-size", type=COUNT, default=4, help="Windows per forward pass.")
@click.option(
    "--chunk",
    type=COUNT,
    default=1024,
    help="Width of the output chunks in pixels, rounded down to whole strides (1024 -> 896); each chunk is one "
    "row of tiles high (224 px with the defaults).",
)
@device_option
@click.option(
    "--fill-unobserved",
    is_flag=True,
    help="Also fill gaps that no date of their triplet observed (flagged 3 in 'filled'); default: left NaN (2).",
)
@click.option(
    "--method",
    type=click.Choice(["auto", *METHODS]),
    default="auto",
    help="Filler of the gaps: per date the best in the scene self-check (auto) of the network, two classical "
    "local regressions and the blend (mean of the network and the regression), or one of them.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace another Zarr store at OUT (never the input, never a non-store)."
)
def reconstruct(
    store: str,
    out: str,
    model: str | None,
    scheduler: str | None,
    workers: int | None,
    tile: int,
    overlap: int,
    batch_size: int,
    chunk: int,
    device: str | None,
    fill_unobserved: bool,
    method: str,
    overwrite: bool,
) -> None:
    """Remove clouds from every date of STORE and write reconstruction + NDVI to OUT (Zarr), resumably.

    OUT is written only when it is empty, or holds this command's unfinished output of the same input, model and
    tiling (resumed); a finished one is left as it is.
    """
    from cmsn_cube.cluster import get_client
    from cmsn_cube.inference import reconstruct as reconstruct_cube
    from cmsn_cube.inference import reconstruction_state, write_reconstruction
    from cmsn_cube.outputs import exclusive_writer
    from cmsn_cube.store import open_cube

    result = reconstruct_cube(
        open_cube(store),
        model=model,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        chunk=chunk,
        fill_unobserved=fill_unobserved,
        method=method,
    )
    with exclusive_writer(out):  # held from the check to the end: a second run into OUT is refused at once
        state = reconstruction_state(result, out, overwrite=overwrite)
        if state == "complete":
            click.echo(f"{out} is already complete for this input, model and tiling: nothing to do")
            return
        with get_client(scheduler, workers=workers, dashboard=True) as client:
            click.echo(f"Dask dashboard: {client.dashboard_link}")
            if state == "resume":
                click.echo(f"resuming {out}: regions already written are kept")
            write_reconstruction(result, out, overwrite=overwrite)
    filler = result.attrs["model"] if method in ("auto", "cmsn") else f"{method}, no network"
    click.echo(f"wrote {out}: {', '.join(str(name) for name in result.data_vars)} ({filler})")
    if method == "auto":
        from cmsn_cube.selfcheck import format_quality, quality_table
        from cmsn_cube.store import open_reconstruction

        click.echo(format_quality(quality_table(open_reconstruction(out))))


@main.command("train")
@click.argument("stores", nargs=-1, required=True, type=str)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder (best.pt, last.pt).")
@click.option("--init", default=None, help="Checkpoint path or packaged model name to fine-tune.")
@click.option("--epochs", type=COUNT, default=None, help="Passes over the training windows.")
@click.option("--steps", type=COUNT, default=None, help="Optimizer steps in total (default 1000 without --epochs).")
@click.option("--lr", type=POSITIVE, default=2e-3, help="Peak AdamW learning rate.")
@click.option(
    "--weight-decay", type=click.FloatRange(min=0), default=1e-4, help="AdamW weight decay (convolution kernels)."
)
@click.option("--schedule", type=click.Choice(["cosine", "onecycle", "constant"]), default="cosine")
@click.option(
    "--warmup-steps", type=click.IntRange(min=0), default=None, help="Warm-up of the cosine schedule (default 5 %)."
)
@click.option("--batch-size", type=COUNT, default=8, help="Windows per step.")
@click.option("--patch-size", type=click.IntRange(min=16), default=128, help="Window side in pixels.")
@click.option("--overlap", type=click.IntRange(min=0), default=32, help="Pixels shared by neighbouring windows.")
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.2,
    help="Share of each store's rows held out for validation.",
)
@click.option("--truth", type=click.Choice(["auto", "cube", "observed"]), default="auto", help="Training truth.")
@click.option("--levels", type=FloatList(3), default="0.25,0.15,0.10", help="Masked fraction for T1,T2,T3.")
@click.option("--lambda-cloudy", type=click.FloatRange(min=0), default=None, help="λ: weight of cloudy pixels in MTGL.")
@click.option("--delta", type=click.FloatRange(min=0), default=None, help="δ: weight of the frequency loss MTFR.")
@click.option("--xi", type=click.FloatRange(min=0), default=None, help="ξ: weight of the refinement loss.")
@click.option("--width", type=COUNT, default=None, help="Channels at 1/4 resolution (new model).")
@click.option("--depth", type=COUNT, default=None, help="Fourier blocks before the fusion (new model).")
@click.option(
    "--fusion-depth", type=click.IntRange(min=0), default=None, help="Fourier blocks after the fusion (new model)."
)
@click.option("--skip-width", type=COUNT, default=None, help="Channels of the full-resolution path (new model).")
@click.option("--time-budget", type=POSITIVE, default=None, help="Seconds of wall clock; stops cleanly.")
@click.option("--patience", type=COUNT, default=None, help="Early stopping after this many epochs without gain.")
@click.option("--seed", type=SEED, default=0, help="Seed of clouds, shuffling, augmentation and initialisation.")
@device_option
@click.option("--num-workers", type=click.IntRange(min=0), default=0, help="DataLoader worker processes.")
@click.option("--threads", type=COUNT, default=None, help="Torch CPU threads (default: torch's choice).")
@click.option("--no-augment", is_flag=True, help="No random flips and quarter turns.")
@click.option("--radiometric", is_flag=True, help="Per-date, per-band gain/offset/haze augmentation.")
@click.option("--balance", is_flag=True, help="Every store gives the same share of each epoch's windows.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt (same stores and windows).")
@click.option("--overwrite", is_flag=True, help="Start a new run in an OUT that holds an earlier run's checkpoints.")
def train_command(
    stores: tuple[str, ...],
    out: Path,
    lambda_cloudy: float | None,
    delta: float | None,
    xi: float | None,
    no_augment: bool,
    steps: int | None,
    epochs: int | None,
    **options: object,
) -> None:
    """Train (or fine-tune with --init) a CMSN on windows of one or more cube STORES; checkpoints go to --out."""
    from cmsn_cube.train import train_on_stores

    weights = {"lambda_cloudy": lambda_cloudy, "delta": delta, "xi": xi}
    if steps is None and epochs is None:
        steps = 1000
    result = train_on_stores(
        list(stores),
        out=out,
        steps=steps,
        epochs=epochs,
        augment=not no_augment,
        loss_weights={key: value for key, value in weights.items() if value is not None},
        **options,  # type: ignore[arg-type]
    )
    best = result.best_metrics or {}
    click.echo(
        f"{result.steps} steps, {result.epochs} epochs in {result.elapsed_s:.0f} s on {result.device} "
        f"({result.stop_reason}); best validation PSNR cloudy {best.get('psnr_cloudy', float('nan')):.2f} dB, "
        f"SSIM cloudy {best.get('ssim_cloudy', float('nan')):.4f}"
    )
    click.echo(f"wrote {result.best_checkpoint} (use with --model), {out / 'loss.png'}")


@main.command("fit")
@click.argument("store", type=str)
@click.option("--model", default=None, help="Checkpoint path or packaged model name to adapt (default: packaged).")
@click.option("--steps", type=COUNT, default=1000, help="Optimizer steps at most.")
@click.option("--time-budget", type=POSITIVE, default=240.0, help="Seconds of wall clock for the whole fit.")
@click.option("--lr", type=POSITIVE, default=5e-4, help="Peak AdamW learning rate.")
@click.option("--seed", type=SEED, default=0, help="Seed of the pasted clouds, shuffling and torch.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Checkpoint [default: STORE-fitted.pt].")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already at --out.")
def fit_command(
    store: str,
    model: str | None,
    steps: int,
    time_budget: float,
    lr: float,
    seed: int,
    out: Path | None,
    overwrite: bool,
) -> None:
    """Adapt a checkpoint to the cube in STORE (path or URL) from its own clear pixels; write the checkpoint.

    An existing checkpoint at --out is kept unless --overwrite is given (checked before the fit starts).
    """
    from cmsn_cube.adapt import fit, fitted_path

    result = fit(
        store,
        model=model,
        steps=steps,
        time_budget=time_budget,
        lr=lr,
        seed=seed,
        out=out or fitted_path(store),
        overwrite=overwrite,
    )
    click.echo(result.summary())
