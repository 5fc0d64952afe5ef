"""``cmsn-cube import``: a folder or glob of GeoTIFF/NetCDF files into a validated cube store.

The command is :func:`cmsn_cube.sources.files.open_files` (itself :func:`cmsn_cube.sources.stack.open_stack`,
the Python API) followed by :func:`cmsn_cube.store.write_cube`: one code path, lazy reads streamed to the store.
"""

from __future__ import annotations

from typing import Any

import click

from cmsn_cube.cli.group import main
from cmsn_cube.cli.options import COUNT, SeparatedList

#: The four bands ``--bands`` must name.
_BAND_NAMES = ("blue", "green", "red", "nir")


class BandMap(click.ParamType):
    """``blue=1,green=2,red=3,nir=4``: the 1-based position of each band in every file."""

    name = "bands"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, int]:
        """Return ``value`` as ``{"blue": 1, ...}``, or fail naming what is wrong."""
        if isinstance(value, dict):
            return value
        pairs: dict[str, int] = {}
        for item in str(value).split(","):
            name, _, position = item.partition("=")
            name = name.strip().lower()
            if name not in _BAND_NAMES or not position.strip().isdigit() or int(position) < 1:
                self.fail(
                    f"{item.strip()!r} is not band=position (bands {', '.join(_BAND_NAMES)}; positions 1, 2, ...)"
                )
            pairs[name] = int(position)
        missing = [band for band in _BAND_NAMES if band not in pairs]
        if missing:
            self.fail(f"{value!r} lacks {', '.join(missing)}: give blue=N,green=N,red=N,nir=N", param, ctx)
        return pairs


class Number(click.ParamType):
    """A number, or a fraction: ``--scale 1/255``, ``--scale 2.75e-5``."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        """Return ``value`` as a float (``a/b`` divided)."""
        if isinstance(value, (int, float)):
            return float(value)
        numerator, slash, denominator = str(value).partition("/")
        try:
            number = float(numerator) / (float(denominator) if slash else 1.0)
        except (ValueError, ZeroDivisionError):
            self.fail(f"{value!r} is not a number or a fraction (e.g. 1e-4, 1/255)", param, ctx)
        return number


@main.command("import")
@click.argument("inputs", nargs=-1, required=True, metavar="FILES_OR_GLOB...")
@click.argument("out", metavar="OUT.zarr")
@click.option(
    "--bands",
    type=BandMap(),
    default=None,
    help="Band positions in each file: blue=1,green=2,red=3,nir=4 (not for Landsat ..._SR_B<n>.TIF files).",
)
@click.option("--mask-band", type=COUNT, default=None, help="Position of a cloud-mask band in each file.")
@click.option(
    "--cloud-values",
    type=SeparatedList(int, kind="integers"),
    default=None,
    help="Values of --mask-band that are cloud, e.g. 1 or 3,8,9,10.",
)
@click.option("--qa-band", type=COUNT, default=None, help="Position of a quality band in each file, decoded as --qa.")
@click.option(
    "--qa",
    "qa_kind",
    type=click.Choice(["landsat-c2", "landsat-c1", "scl"]),
    default="landsat-c2",
    help="How --qa-band is decoded: Collection 2 QA_PIXEL bits, Collection 1 BQA, Sentinel-2 SCL classes.",
)
@click.option(
    "--dates-from",
    default="name",
    help="name: the date in each file name (YYYYMMDD, YYYY-MM-DD or YYYYDOY); csv:PATH: rows file,date; time: "
    "a NetCDF file's time axis (the default with --variables).",
)
@click.option(
    "--dates",
    "date_list",
    type=SeparatedList(),
    default=None,
    help="One file of every date (--bands-per-date): its dates in the file's order, 2018-04-29,2018-05-13,...",
)
@click.option("--bands-per-date", type=COUNT, default=None, help="One file of every date: bands of each date.")
@click.option(
    "--variables",
    type=SeparatedList(),
    default=None,
    help="One NetCDF file of one (time, y, x) variable per band: B2,B3,B4,B8,SCL (--bands counts within them).",
)
@click.option(
    "--scale",
    type=Number(),
    default=None,
    help="Reflectance = DN x scale + offset, e.g. 1e-4 or 1/255 (default: the files').",
)
@click.option("--offset", type=Number(), default=None, help="See --scale.")
@click.option("--nodata", type=Number(), default=None, help="DN of missing pixels (default: the files'), e.g. 0.")
@click.option(
    "--align",
    type=click.Choice(["first"]),
    default=None,
    help="first: resample every date onto the first date's grid (bilinear; nearest for masks and QA), then crop "
    "to the pixels every date covers (for dates whose grids lie apart).",
)
@click.option("--crop-to-common", is_flag=True, help="Crop files of different sizes to their common upper-left extent.")
@click.option("--sensor", default=None, help="Sensor name recorded per date (default LANDSAT_<n> from Landsat names).")
@click.option("--chunk", type=COUNT, default=None, help="Tile size (px) of the lazy reads [default: 1024].")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def import_(
    inputs: tuple[str, ...],
    out: str,
    bands: dict[str, int] | None,
    mask_band: int | None,
    cloud_values: tuple[int, ...] | None,
    qa_band: int | None,
    qa_kind: str,
    dates_from: str,
    date_list: tuple[str, ...] | None,
    bands_per_date: int | None,
    variables: tuple[str, ...] | None,
    scale: float | None,
    offset: float | None,
    nodata: float | None,
    align: str | None,
    crop_to_common: bool,
    sensor: str | None,
    chunk: int | None,
    overwrite: bool,
) -> None:
    """Read GeoTIFF/NetCDF files (a folder, a glob, a list) into a validated cube store OUT.zarr.

    One file per date (--bands), or Landsat Collection 2 Level-2 band files as USGS ships them
    (..._SR_B2.TIF ... _SR_B5.TIF + _QA_PIXEL.TIF: bands, scale and cloud mask from the names), or Level-1
    band files (..._B2.TIF ... _B5.TIF + _BQA.TIF); one file of every date (--bands-per-date, --dates); one
    NetCDF file of one variable per band (--variables). Dates on grids apart: --align first.
    """
    from cmsn_cube.exceptions import OutputExistsError
    from cmsn_cube.sources.files import IMPORT_CHUNK, describe, open_files
    from cmsn_cube.store import writable_kind, write_cube

    if mask_band is not None and qa_band is not None:
        raise click.BadParameter("give --mask-band or --qa-band, not both", param_hint="'--mask-band'")
    if mask_band is not None and not cloud_values:
        raise click.BadParameter("give --cloud-values (the mask band's cloud values)", param_hint="'--mask-band'")
    if not (dates_from in ("name", "time") or dates_from.startswith("csv:")):
        raise click.BadParameter(f"{dates_from!r} is neither name nor csv:PATH", param_hint="'--dates-from'")
    if writable_kind(out) == "zarr" and not overwrite:  # before reading anything; write_cube checks again
        raise OutputExistsError(f"store {out} exists; pass --overwrite to replace it")
    cube = open_files(
        list(inputs),
        bands=bands,
        mask_band=mask_band,
        cloud_values=cloud_values or (),
        qa_band=qa_band,
        qa=qa_kind,
        dates_from=dates_from,
        scale=scale,
        offset=offset,
        crop_to_common=crop_to_common,
        sensor=sensor,
        chunks=chunk or IMPORT_CHUNK,
        align=align,
        nodata=nodata,
        dates=list(date_list) if date_list else None,
        bands_per_date=bands_per_date,
        variables=list(variables) if variables else None,
    )
    path = write_cube(cube, out, overwrite=overwrite)
    about = describe(cube)
    click.echo(
        f"wrote {path}: {about['dates']} dates {about['first']} .. {about['last']} x {about['height']} x "
        f"{about['width']} px, {about['scale_m']:g} m pixels, {about['crs']}, {', '.join(about['sensors'])}"
    )
