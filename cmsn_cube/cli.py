"""The ``cmsn-cube`` command line: each command is a thin call into one public function.

Heavy libraries (torch, Earth Engine, Dask distributed) are imported inside the commands that need them, so
``cmsn-cube --help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cmsn_cube.exceptions import CMSNCubeError


class _Group(click.Group):
    """Turn our own errors into one clear line and exit code 1 instead of a traceback wall."""

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except CMSNCubeError as error:
            click.secho(f"error: {error}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cmsn-cube")
def main() -> None:
    """Remove clouds from multi-temporal Landsat cubes (xarray + Zarr + Dask + PyTorch CMSN)."""


@main.command()
@click.argument("store", type=click.Path(path_type=Path), default=Path("stores/synthetic.zarr"))
@click.option("--height", default=512, help="Scene height in pixels (30 m).")
@click.option("--width", default=512, help="Scene width in pixels (30 m).")
@click.option("--dates", "n_dates", default=3, help="Number of acquisitions, 16 days apart.")
@click.option("--cloud", "cloud_fractions", default="0.25,0.15,0.10", help="Cloud fraction per date, comma-separated (repeated to --dates).")
@click.option("--sensor", type=click.Choice(["LANDSAT_5", "LANDSAT_8"]), default="LANDSAT_8")
@click.option("--seed", default=0, help="Random seed: the same seed gives the same scene.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def synth(store: Path, height: int, width: int, n_dates: int, cloud_fractions: str, sensor: str, seed: int, overwrite: bool) -> None:
    """Write the embedded synthetic Landsat scene (with its cloud-free truth) to a Zarr STORE."""
    from cmsn_cube.cube import write_cube
    from cmsn_cube.sources.synthetic import synthetic_scene

    levels = [float(v) for v in cloud_fractions.split(",") if v.strip()]
    levels = [levels[i % len(levels)] for i in range(n_dates)]
    cube = synthetic_scene(height=height, width=width, n_dates=n_dates, cloud_fractions=levels, sensor=sensor, seed=seed)
    path = write_cube(cube, store, overwrite=overwrite)
    click.echo(f"wrote {path}: {n_dates} dates x {height} x {width} px, {sensor}, seed {seed}")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
def info(store: Path) -> None:
    """Print a store's dates, sensors, bands, cloud fraction per date, CRS and size."""
    from cmsn_cube.report import describe_store

    click.echo(describe_store(store))


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("outputs/demo"), help="Folder for figures and the report.")
@click.option("--store", type=click.Path(path_type=Path), default=Path("stores/demo.zarr"), help="Zarr store the demo writes.")
@click.option("--size", default=512, help="Scene height and width in pixels.")
@click.option("--seed", default=0, help="Scene seed.")
def demo(out_dir: Path, store: Path, size: int, seed: int) -> None:
    """Run the end-to-end demo on the embedded synthetic scene."""
    from cmsn_cube.demo import run_demo

    run_demo(out_dir, store=store, height=size, width=size, seed=seed, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
