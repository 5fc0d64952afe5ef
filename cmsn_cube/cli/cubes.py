"""``cmsn-cube`` commands on cube stores: ``synth``, ``info``, ``demo``, ``evaluate`` and ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cmsn_cube.cli.group import main
from cmsn_cube.cli.options import COUNT, SEED, FloatList, workers_option


@main.command()
@click.argument("store", type=str, default="stores/synthetic.zarr")
@click.option("--height", type=COUNT, default=512, help="Scene height in pixels (30 m).")
@click.option("--width", type=COUNT, default=512, help="Scene width in pixels (30 m).")
@click.option(
    "--dates", "n_dates", type=click.IntRange(min=3), default=3, help="Number of acquisitions, 16 days apart."
)
@click.option(
    "--cloud",
    "cloud_fractions",
    type=FloatList(),
    default="0.25,0.15,0.10",
    help="Cloud fraction per date, comma-separated (repeated to --dates).",
)
@click.option("--sensor", type=click.Choice(["LANDSAT_5", "LANDSAT_8"]), default="LANDSAT_8")
@click.option("--seed", type=SEED, default=0, help="Random seed: the same seed gives the same scene.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def synth(
    store: str,
    height: int,
    width: int,
    n_dates: int,
    cloud_fractions: tuple[float, ...],
    sensor: str,
    seed: int,
    overwrite: bool,
) -> None:
    """Write the embedded synthetic Landsat scene (with its cloud-free truth) to a Zarr STORE."""
    from cmsn_cube.sources.synthetic import synthetic_scene
    from cmsn_cube.store import write_cube

    if not cloud_fractions:
        raise click.BadParameter("give at least one cloud fraction", param_hint="'--cloud'")
    levels = [cloud_fractions[i % len(cloud_fractions)] for i in range(n_dates)]
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
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace outputs (in --out, at --store) that an earlier demo did not write; its own are replaced anyway.",
)
@click.option("--size", type=click.IntRange(min=64), default=512, help="Scene height and width in pixels.")
@click.option("--seed", type=SEED, default=2026, help="Scene seed (not one the packaged model was trained on).")
@click.option("--model", default=None, help="Checkpoint path or packaged name (default: the packaged model).")
@click.option(
    "--adapt-seconds",
    type=click.FloatRange(min=0),
    default=0.0,
    help="First fine-tune the model on the scene's own clear pixels for this long (s).",
)
@workers_option(default=2, help="Dask LocalCluster worker processes.")
def demo(out_dir: Path, **options: Any) -> None:
    """Run the end-to-end demo on the embedded synthetic scene: figures, tables and report.md."""
    from cmsn_cube.demo import run_demo

    run_demo(out_dir, echo=click.echo, **options)


def _method_names(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """Split ``--methods`` at commas; none at all is a usage error that gives an example."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        from cmsn_cube.evaluate import DEFAULT_METHODS

        raise click.BadParameter(f"give at least one method, e.g. {','.join(DEFAULT_METHODS)},cmsn")
    return names


@main.command("evaluate")
@click.argument("store", type=str)
@click.option(
    "--methods",
    default="nearest,linear,median,regression",
    callback=_method_names,
    help="Comma-separated gap-fillers to score: the baselines nearest, linear, median, regression, and every "
    "reconstruct --method (cmsn, auto, weighted-regression, blend; their model is --model).",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Folder for evaluation.csv and evaluation.json."
)
@click.option("--seed", type=SEED, default=0, help="Seed of the pasted clouds (stores without a truth variable).")
@click.option(
    "--truth",
    type=click.Choice(["cube", "pasted"]),
    default=None,
    help="Truth source; default: the store's truth variable if any, else pasted clouds.",
)
@click.option("--model", default=None, help="Checkpoint of the cmsn method: packaged name or path.")
def evaluate_command(
    store: str, methods: tuple[str, ...], out: Path | None, seed: int, truth: str | None, model: str | None
) -> None:
    """Score gap-filling METHODS (baselines, cmsn) on a cube STORE whose truth is known; print the table."""
    from cmsn_cube.evaluate import evaluate
    from cmsn_cube.store import open_cube

    evaluate(open_cube(store), methods=methods, seed=seed, truth=truth, out=out, echo=click.echo, model=model)  # type: ignore[arg-type]
    if out is not None:
        click.echo(f"wrote {out / 'evaluation.csv'} and {out / 'evaluation.json'}")


@main.command("export")
@click.argument("reconstruction", type=str)
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace GeoTIFFs of the same names in FOLDER.")
def export_command(reconstruction: str, folder: Path, overwrite: bool) -> None:
    """Write a RECONSTRUCTION store (from `reconstruct`) as cloud-optimised GeoTIFFs in FOLDER.

    Per date: the reconstructed bands, NDVI and the filled flags.
    """
    from cmsn_cube.export import to_cogs
    from cmsn_cube.store import open_reconstruction

    paths = to_cogs(open_reconstruction(reconstruction), folder, overwrite=overwrite)
    click.echo(f"wrote {len(paths)} GeoTIFFs to {folder}")
