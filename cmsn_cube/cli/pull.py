"""``cmsn-cube pull``: Landsat from Earth Engine (xee) or a STAC catalog (odc-stac) into a Zarr cube."""

from __future__ import annotations

from pathlib import Path

import click

from cmsn_cube.cli.group import fail, main
from cmsn_cube.cli.options import COUNT, POSITIVE, FloatList


@main.command()
@click.option("--region", help="Region name in --config (e.g. wuhan, new_south_wales).")
@click.option(
    "--config", type=click.Path(path_type=Path), default=None, help="Regions file (default: the packaged regions)."
)
@click.option(
    "--bbox", type=FloatList(4, kind="numbers (W,S,E,N in degrees)"), help="W,S,E,N in degrees (instead of --region)."
)
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
    "--levels", type=FloatList(), default="0.25,0.15,0.10", help="Target cloud fraction per kept date (with --bbox)."
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
@click.option("--n-dates", type=COUNT, help="Keep the N clearest dates instead of --levels (with --stac).")
@click.option(
    "--timeout",
    type=POSITIVE,
    help="Seconds each HTTP request to the catalog or an asset may wait for an answer (--stac) [default: 30].",
)
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
    timeout: float | None,
) -> None:
    """Pull Landsat TOA or surface reflectance into a Zarr cube, from Earth Engine (via xee) or a STAC catalog.

    From Earth Engine: a region of --config, or --bbox + dates. --dry-run prints the plan, Earth Engine collection
    included, offline. With --stac URL (or a local catalog.json), Level-2 surface reflectance comes from a STAC
    catalog via odc-stac.
    """
    if stac:
        _pull_stac(
            ctx,
            stac,
            collection,
            product,
            bbox,
            start,
            end,
            levels,
            n_dates,
            max_cloud,
            timeout,
            out,
            overwrite,
            dry_run,
        )
        return
    stac_only = (("collection", collection), ("max-cloud", max_cloud), ("timeout", timeout))
    given = [f"--{name}" for name, value in stac_only if value is not None]
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
    timeout: float | None,
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
        from cmsn_cube.sources.stac import DEFAULT_COLLECTION, DEFAULT_TIMEOUT_S, load_stac, plan_stac

        timeout = timeout or DEFAULT_TIMEOUT_S

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
            timeout=timeout,
        )
        click.echo(plan.describe())
        if dry_run:
            return
        from cmsn_cube.store import write_cube

        path = write_cube(
            load_stac(plan, timeout=timeout), out or "stores/stac.zarr", overwrite=overwrite, progress=True
        )
    except ImportError as error:  # the stac extra is missing: its message names the pip command
        fail(str(error))
    click.echo(f"wrote {path}")
