"""The ``cmsn-cube`` command line: each command is a thin call into one public function.

Heavy libraries (torch, Earth Engine, Dask distributed) are imported inside the commands that need them, so
``cmsn-cube --help`` is instant.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import click

from cmsn_cube.exceptions import CMSNCubeError
from cmsn_cube.selfcheck import METHODS  # numpy only: --help stays instant


class _Group(click.Group):
    """Every error as one line (``error: ...``) and a non-zero exit, warnings as one line; no traceback wall.

    Set ``CMSN_CUBE_DEBUG=1`` to see the traceback of an unexpected error.
    """

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        warnings.showwarning = _one_line_warning
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # a bad option value: one line too, with where to read the options
            command = error.ctx.command_path if error.ctx is not None else "cmsn-cube"
            _fail(f"{' '.join(error.format_message().split())} (see `{command} --help`)", code=2)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except CMSNCubeError as error:
            _fail(str(error))
        except KeyboardInterrupt:
            _fail("interrupted; run the same command again to resume where it stopped", code=130)
        except Exception as error:  # a bug or an error a library raised: still one line, the traceback on request
            if os.environ.get("CMSN_CUBE_DEBUG"):
                raise
            _fail(f"{type(error).__name__}: {' '.join(str(error).split())} (CMSN_CUBE_DEBUG=1 shows the traceback)")


#: Click types of the numeric options: counts and sizes at least 1, rates above 0.
_COUNT = click.IntRange(min=1)
_POSITIVE = click.FloatRange(min=0, min_open=True)


def _fail(message: str, *, code: int = 1) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
    click.secho(f"warning: {message}", fg="yellow", err=True)


@click.group(cls=_Group, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cmsn-cube")
def main() -> None:
    """Remove clouds from multi-temporal Landsat cubes (xarray + Zarr + Dask + PyTorch CMSN)."""


@main.command()
@click.argument("store", type=str, default="stores/synthetic.zarr")
@click.option("--height", type=_COUNT, default=512, help="Scene height in pixels (30 m).")
@click.option("--width", type=_COUNT, default=512, help="Scene width in pixels (30 m).")
@click.option(
    "--dates", "n_dates", type=click.IntRange(min=3), default=3, help="Number of acquisitions, 16 days apart."
)
@click.option(
    "--cloud",
    "cloud_fractions",
    default="0.25,0.15,0.10",
    help="Cloud fraction per date, comma-separated (repeated to --dates).",
)
@click.option("--sensor", type=click.Choice(["LANDSAT_5", "LANDSAT_8"]), default="LANDSAT_8")
@click.option("--seed", default=0, help="Random seed: the same seed gives the same scene.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def synth(
    store: str, height: int, width: int, n_dates: int, cloud_fractions: str, sensor: str, seed: int, overwrite: bool
) -> None:
    """Write the embedded synthetic Landsat scene (with its cloud-free truth) to a Zarr STORE."""
    from cmsn_cube.sources.synthetic import synthetic_scene
    from cmsn_cube.store import write_cube

    levels = [float(v) for v in cloud_fractions.split(",") if v.strip()]
    levels = [levels[i % len(levels)] for i in range(n_dates)]
    cube = synthetic_scene(
        height=height, width=width, n_dates=n_dates, cloud_fractions=levels, sensor=sensor, seed=seed
    )
    path = write_cube(cube, store, overwrite=overwrite)
    click.echo(f"wrote {path}: {n_dates} dates x {height} x {width} px, {sensor}, seed {seed}")


@main.command()
@click.argument("store", type=str)
def info(store: str) -> None:
    """Print a store's dates, sensors, bands, cloud fraction per date, CRS and size."""
    from cmsn_cube.report import describe_store

    click.echo(describe_store(store))


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("outputs/demo"),
    help="Folder for figures, tables and report.md.",
)
@click.option("--store", type=str, default="stores/demo.zarr", help="Zarr store the demo writes.")
@click.option("--size", type=click.IntRange(min=64), default=512, help="Scene height and width in pixels.")
@click.option("--seed", default=2026, help="Scene seed (not one the packaged model was trained on).")
@click.option("--model", default=None, help="Checkpoint path or packaged name (default: the packaged model).")
@click.option(
    "--adapt-seconds",
    type=click.FloatRange(min=0),
    default=0.0,
    help="First fine-tune the model on the scene's own clear pixels for this long (s).",
)
@click.option("--workers", type=_COUNT, default=2, help="Dask LocalCluster worker processes.")
def demo(
    out_dir: Path, store: str, size: int, seed: int, model: str | None, adapt_seconds: float, workers: int
) -> None:
    """Run the end-to-end demo on the embedded synthetic scene: figures, tables and report.md."""
    from cmsn_cube.demo import run_demo

    run_demo(
        out_dir,
        store=store,
        size=size,
        seed=seed,
        model=model,
        adapt_seconds=adapt_seconds,
        workers=workers,
        echo=click.echo,
    )


class _FloatList(click.ParamType):
    """Comma-separated floats: ``W,S,E,N`` for --bbox, ``0.25,0.15,0.10`` for --levels."""

    name = "floats"

    def __init__(self, count: int | None = None) -> None:
        self.count = count

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(float(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not comma-separated numbers", param, ctx)
        if self.count is not None and len(values) != self.count:
            self.fail(f"{value!r} must have {self.count} comma-separated numbers (W,S,E,N in degrees)", param, ctx)
        return values


@main.command()
@click.option("--region", help="Region name in --config (e.g. wuhan, new_south_wales).")
@click.option(
    "--config", type=click.Path(path_type=Path), default=None, help="Regions file (default: the packaged regions)."
)
@click.option("--bbox", type=_FloatList(4), help="W,S,E,N in degrees (instead of --region).")
@click.option("--start", help="First day, e.g. 2013-04-15 (with --bbox).")
@click.option("--end", help="Last day, included (with --bbox).")
@click.option(
    "--sensor",
    type=click.Choice(["LANDSAT_5", "LANDSAT_7", "LANDSAT_8", "LANDSAT_9"]),
    default="LANDSAT_8",
    help="With --bbox. Landsat 7 after 2003-05-31 is SLC-off: its stripes are filled like clouds.",
)
@click.option(
    "--product",
    type=click.Choice(["toa", "sr"]),
    help="toa: TOA reflectance (C02/T1_TOA); sr: Level-2 surface reflectance (C02/T1_L2), scaled to [0, 1]. "
    "Default: the region's product, else toa.",
)
@click.option("--wrs-path", type=int, help="WRS-2 path filter (with --bbox).")
@click.option("--wrs-row", type=int, help="WRS-2 row filter (with --bbox).")
@click.option(
    "--levels", type=_FloatList(), default="0.25,0.15,0.10", help="Target cloud fraction per kept date (with --bbox)."
)
@click.option("--seed-dates", is_flag=True, help="Keep the region's listed dates instead of choosing by cloud level.")
@click.option("--out", type=str, help="Store (path or URL); default stores/<region>.zarr.")
@click.option("--project", help="Earth Engine Cloud project (default: EE_PROJECT or the credentials').")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (collection, bands, dates, grid, size) and stop; offline."
)
@click.option(
    "--stac",
    help="Read a STAC catalog instead of Earth Engine: an API URL or a catalog.json path (needs cmsn-cube[stac]).",
)
@click.option("--collection", help="STAC collection id (with --stac; default landsat-c2-l2).")
@click.option(
    "--max-cloud",
    type=click.FloatRange(0, 1),
    help="Leave out scenes with eo:cloud_cover above this fraction (--stac).",
)
@click.option("--n-dates", type=_COUNT, help="Keep the N clearest dates instead of --levels (with --stac).")
@click.pass_context
def pull(
    ctx: click.Context,
    region: str | None,
    config: Path | None,
    bbox: tuple[float, ...] | None,
    start: str | None,
    end: str | None,
    sensor: str,
    product: str | None,
    wrs_path: int | None,
    wrs_row: int | None,
    levels: tuple[float, ...],
    seed_dates: bool,
    out: str | None,
    project: str | None,
    overwrite: bool,
    dry_run: bool,
    stac: str | None,
    collection: str | None,
    max_cloud: float | None,
    n_dates: int | None,
) -> None:
    """Pull Landsat TOA or surface reflectance from Earth Engine (via xee) into a Zarr cube: a region of --config,
    or --bbox + dates. --dry-run prints the plan, Earth Engine collection included, offline.
    With --stac URL (or a local catalog.json), Level-2 surface reflectance comes from a STAC catalog via odc-stac.
    """
    if stac:
        _pull_stac(
            ctx, stac, collection, product, bbox, start, end, levels, n_dates, max_cloud, out, overwrite, dry_run
        )
        return
    given = [f"--{name}" for name, value in (("collection", collection), ("max-cloud", max_cloud)) if value is not None]
    given += ["--n-dates"] if n_dates is not None else []
    if given:
        raise click.UsageError(f"{', '.join(given)} only apply with --stac URL")
    from cmsn_cube.sources.earthengine import REGIONS_FILE, plan_pull, plan_region, pull_region

    if region and bbox:
        raise click.UsageError("give --region or --bbox, not both")
    if region:
        plan = plan_region(
            region,
            config=config or REGIONS_FILE,
            use_dates=seed_dates,
            product=product,  # type: ignore[arg-type]
        )
    elif bbox and start and end:
        plan = plan_pull(
            sensor=sensor,  # type: ignore[arg-type]  # click.Choice guarantees the Literal
            start=start,
            end=end,
            bbox=bbox,
            wrs_path=wrs_path,
            wrs_row=wrs_row,
            name="bbox",
            levels=levels,
            product=product or "toa",  # type: ignore[arg-type]
        )  # type: ignore[arg-type]
    else:
        raise click.UsageError("give --region NAME, or --bbox W,S,E,N with --start and --end")
    click.echo(plan.describe())
    if dry_run:
        return
    path = pull_region(plan, out or f"stores/{plan.name}.zarr", project=project, overwrite=overwrite)
    click.echo(f"wrote {path}")


def _pull_stac(
    ctx: click.Context,
    stac: str,
    collection: str | None,
    product: str | None,
    bbox: tuple[float, ...] | None,
    start: str | None,
    end: str | None,
    levels: tuple[float, ...],
    n_dates: int | None,
    max_cloud: float | None,
    out: str | None,
    overwrite: bool,
    dry_run: bool,
) -> None:
    """``pull --stac``: plan from the catalog's metadata, print it, then load with odc-stac and write the store."""
    from click.core import ParameterSource

    def explicit(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)

    earth_engine_only = ("region", "sensor", "wrs_path", "wrs_row", "seed_dates", "project")
    wrong = [f"--{name.replace('_', '-')}" for name in earth_engine_only if explicit(name)]
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)} apply to Earth Engine pulls, not to --stac")
    if not (bbox and start and end):
        raise click.UsageError("--stac needs --bbox W,S,E,N with --start and --end")
    if n_dates is not None and explicit("levels"):
        raise click.UsageError("give --levels or --n-dates, not both")
    try:
        from cmsn_cube.sources.stac import DEFAULT_COLLECTION, load_stac, plan_stac

        plan = plan_stac(
            stac,
            bbox=bbox,
            start=start,
            end=end,
            collection=collection or DEFAULT_COLLECTION,
            product=product or "sr",
            max_cloud=max_cloud,
            levels=None if n_dates else levels,
            n_dates=n_dates,
        )
        click.echo(plan.describe())
        if dry_run:
            return
        from cmsn_cube.store import write_cube

        path = write_cube(load_stac(plan), out or "stores/stac.zarr", overwrite=overwrite, progress=True)
    except ImportError as error:  # the stac extra is missing: its message names the pip command
        _fail(str(error))
    click.echo(f"wrote {path}")


@main.command("evaluate")
@click.argument("store", type=str)
@click.option("--methods", default="nearest,linear,median,regression", help="Comma-separated gap-fillers to score.")
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Folder for evaluation.csv and evaluation.json."
)
@click.option("--seed", default=0, help="Seed of the pasted clouds (stores without a truth variable).")
@click.option(
    "--truth",
    type=click.Choice(["cube", "pasted"]),
    default=None,
    help="Truth source; default: the store's truth variable if any, else pasted clouds.",
)
@click.option("--model", default=None, help="Checkpoint of the cmsn method: packaged name or path.")
def evaluate_command(
    store: str, methods: str, out: Path | None, seed: int, truth: str | None, model: str | None
) -> None:
    """Score gap-filling METHODS (baselines, cmsn) on a cube STORE whose truth is known; print the table."""
    from cmsn_cube.evaluate import evaluate
    from cmsn_cube.store import open_cube

    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    evaluate(open_cube(store), methods=names, seed=seed, truth=truth, out=out, echo=click.echo, model=model)  # type: ignore[arg-type]
    if out is not None:
        click.echo(f"wrote {out / 'evaluation.csv'} and {out / 'evaluation.json'}")


@main.command()
@click.argument("store", type=str)
@click.argument("out", type=str)
@click.option("--model", default=None, help="Packaged model name or checkpoint path (default: the packaged model).")
@click.option(
    "--scheduler",
    default=None,
    help="Address of an existing Dask scheduler (tcp://host:8786); default: a LocalCluster.",
)
@click.option("--workers", type=_COUNT, default=None, help="LocalCluster worker processes (default: one per core).")
@click.option("--tile", type=click.IntRange(min=16), default=256, help="Window size fed to the network, in pixels.")
@click.option(
    "--overlap",
    type=click.IntRange(min=0),
    default=32,
    help="Pixels shared by neighbouring windows (blended); less than half a tile.",
)
@click.option("--batch-size", type=_COUNT, default=4, help="Windows per forward pass.")
@click.option(
    "--chunk",
    type=_COUNT,
    default=1024,
    help="Width of the output chunks in pixels, rounded down to whole strides (1024 -> 896); each chunk is one "
    "row of tiles high (224 px with the defaults).",
)
@click.option("--device", default=None, help="cpu, cuda, ... (default: CUDA when present).")
@click.option(
    "--fill-unobserved",
    is_flag=True,
    help="Also fill gaps that no date of their triplet observed (flagged 3 in 'filled'); default: left NaN (2).",
)
@click.option(
    "--method",
    type=click.Choice(["auto", *METHODS]),
    default="auto",
    help="Filler of the gaps: per date the best of the network and two classical local regressions in the "
    "scene self-check (auto), or one of them.",
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
    state = reconstruction_state(result, out, overwrite=overwrite)
    if state == "complete":
        click.echo(f"{out} is already complete for this input, model and tiling: nothing to do")
        return
    with get_client(scheduler, workers=workers, dashboard=True) as client:
        click.echo(f"Dask dashboard: {client.dashboard_link}")
        if state == "resume":
            click.echo(f"resuming {out}: regions already written are kept")
        write_reconstruction(result, out, overwrite=overwrite)
    click.echo(f"wrote {out}: reconstructed, filled, ndvi, ndvi_observed, observed_dates ({result.attrs['model']})")
    if method == "auto":
        from cmsn_cube.selfcheck import format_quality, quality_table
        from cmsn_cube.store import open_reconstruction

        click.echo(format_quality(quality_table(open_reconstruction(out))))


@main.command("export")
@click.argument("reconstruction", type=str)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace GeoTIFFs of the same names in FOLDER.")
def export_command(reconstruction: str, folder: Path, overwrite: bool) -> None:
    """Write a RECONSTRUCTION store (from `reconstruct`) as cloud-optimised GeoTIFFs in FOLDER: per date the
    reconstructed bands, NDVI and the filled flags.
    """
    from cmsn_cube.export import to_cogs
    from cmsn_cube.store import open_reconstruction

    paths = to_cogs(open_reconstruction(reconstruction), folder, overwrite=overwrite)
    click.echo(f"wrote {len(paths)} GeoTIFFs to {folder}")


@main.command("train")
@click.argument("stores", nargs=-1, required=True, type=str)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder (best.pt, last.pt).")
@click.option("--init", default=None, help="Checkpoint path or packaged model name to fine-tune.")
@click.option("--epochs", type=_COUNT, default=None, help="Passes over the training windows.")
@click.option("--steps", type=_COUNT, default=None, help="Optimizer steps in total (default 1000 without --epochs).")
@click.option("--lr", type=_POSITIVE, default=2e-3, help="Peak AdamW learning rate.")
@click.option(
    "--weight-decay", type=click.FloatRange(min=0), default=1e-4, help="AdamW weight decay (convolution kernels)."
)
@click.option("--schedule", type=click.Choice(["cosine", "onecycle", "constant"]), default="cosine")
@click.option(
    "--warmup-steps", type=click.IntRange(min=0), default=None, help="Warm-up of the cosine schedule (default 5 %)."
)
@click.option("--batch-size", type=_COUNT, default=8, help="Windows per step.")
@click.option("--patch-size", type=click.IntRange(min=16), default=128, help="Window side in pixels.")
@click.option("--overlap", type=click.IntRange(min=0), default=32, help="Pixels shared by neighbouring windows.")
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.2,
    help="Share of each store's rows held out for validation.",
)
@click.option("--truth", type=click.Choice(["auto", "cube", "observed"]), default="auto", help="Training truth.")
@click.option("--levels", type=_FloatList(3), default="0.25,0.15,0.10", help="Masked fraction for T1,T2,T3.")
@click.option("--lambda-cloudy", type=click.FloatRange(min=0), default=None, help="λ: weight of cloudy pixels in MTGL.")
@click.option("--delta", type=click.FloatRange(min=0), default=None, help="δ: weight of the frequency loss MTFR.")
@click.option("--xi", type=click.FloatRange(min=0), default=None, help="ξ: weight of the refinement loss.")
@click.option("--width", type=_COUNT, default=None, help="Channels at 1/4 resolution (new model).")
@click.option("--depth", type=_COUNT, default=None, help="Fourier blocks before the fusion (new model).")
@click.option(
    "--fusion-depth", type=click.IntRange(min=0), default=None, help="Fourier blocks after the fusion (new model)."
)
@click.option("--skip-width", type=_COUNT, default=None, help="Channels of the full-resolution path (new model).")
@click.option("--time-budget", type=_POSITIVE, default=None, help="Seconds of wall clock; stops cleanly.")
@click.option("--patience", type=_COUNT, default=None, help="Early stopping after this many epochs without gain.")
@click.option("--seed", default=0, help="Seed of clouds, shuffling, augmentation and initialisation.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: CUDA when present).")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, help="DataLoader worker processes.")
@click.option("--threads", type=_COUNT, default=None, help="Torch CPU threads (default: torch's choice).")
@click.option("--no-augment", is_flag=True, help="No random flips and quarter turns.")
@click.option("--radiometric", is_flag=True, help="Per-date, per-band gain/offset/haze augmentation.")
@click.option("--balance", is_flag=True, help="Every store gives the same share of each epoch's windows.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
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
@click.option("--steps", type=_COUNT, default=1000, help="Optimizer steps at most.")
@click.option("--time-budget", type=_POSITIVE, default=240.0, help="Seconds of wall clock for the whole fit.")
@click.option("--lr", type=_POSITIVE, default=5e-4, help="Peak AdamW learning rate.")
@click.option("--seed", default=0, help="Seed of the pasted clouds, shuffling and torch.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Checkpoint [default: STORE-fitted.pt].")
def fit_command(
    store: str, model: str | None, steps: int, time_budget: float, lr: float, seed: int, out: Path | None
) -> None:
    """Adapt a checkpoint to the cube in STORE (path or URL) from its own clear pixels; write the checkpoint."""
    from cmsn_cube.adapt import fit, fitted_path

    result = fit(
        store, model=model, steps=steps, time_budget=time_budget, lr=lr, seed=seed, out=out or fitted_path(store)
    )
    click.echo(result.summary())


if __name__ == "__main__":  # pragma: no cover
    main()
