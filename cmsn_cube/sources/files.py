"""A cube from a folder or glob of GeoTIFF/NetCDF files: what ``cmsn-cube import`` reads, through :func:`open_stack`.

Two layouts:

* one file per date (any GeoTIFF/NetCDF, its bands given by ``bands``), the date in the file name
  (``YYYYMMDD``, ``YYYY-MM-DD`` or ``YYYYDOY``) or in a CSV of ``file,date`` rows;
* one file per band per date, as USGS ships Landsat Collection 2 Level-2 (``LC08_L2SP_PPPRRR_YYYYMMDD_..._SR_B2.TIF``
  ... ``_SR_B5.TIF`` and ``_QA_PIXEL.TIF``): grouped by scene, ``SR_B2..B5`` (Landsat 8/9) or ``SR_B1..B4``
  (Landsat 4-7) as blue, green, red, NIR, reflectance = DN x 2.75e-5 - 0.2 unless the files declare their own
  scale, ``QA_PIXEL`` decoded into ``cloud_mask``.

Both are read lazily (tiles of :data:`IMPORT_CHUNK` px), so :func:`cmsn_cube.store.write_cube` streams a large
stack; every error names the file and the reason in one line.

>>> cube = open_files(["scenes/"], bands=None)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import datetime as dt
import glob
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from cmsn_cube.exceptions import ArgumentError, BandMismatchError, MissingDateError
from cmsn_cube.sources.stack import open_stack

__all__ = ["IMPORT_CHUNK", "LANDSAT_C2_SR", "RASTER_SUFFIXES", "date_from_name", "find_files", "open_files"]

#: Tile size (px) of the lazy reads: a 1024 x 1024 tile of one band is 2 MiB of uint16.
IMPORT_CHUNK = 1024

#: What a folder contributes: GeoTIFF and NetCDF files (other files, MTL texts, XML, are left alone).
RASTER_SUFFIXES = (".tif", ".tiff", ".nc", ".nc4", ".cdf")

#: Landsat Collection 2 surface reflectance = DN x scale + offset (USGS Collection 2 Level-2 Science Product Guide).
LANDSAT_C2_SR = (2.75e-5, -0.2)

#: A Landsat Collection 2 band file: scene id, then ``SR_B<n>`` or ``QA_PIXEL``.
_LANDSAT_BAND = re.compile(
    r"^(?P<scene>L(?P<kind>[COTEM])(?P<mission>0[4-9])_\w+?)_(?P<band>SR_B\d+|QA_PIXEL)\.TIFF?$", re.IGNORECASE
)

#: A Landsat Level-1 band file (Collection 1 or 2, full or shortened names): scene id, then ``B<n>``, ``BQA``
#: (Collection 1 quality) or ``QA_PIXEL`` (Collection 2).
_LANDSAT_L1_BAND = re.compile(
    r"^(?P<scene>L(?P<kind>[COTEM])(?P<mission>0[4-9])_L1\w*?)_(?P<band>B\d+|BQA|QA_PIXEL)\.TIFF?$", re.IGNORECASE
)

#: Level-1 bands of blue, green, red, NIR per Landsat mission.
_LANDSAT_L1_BANDS = {mission: tuple(band[3:] for band in names) for mission, names in
                     {"04": ("SR_B1", "SR_B2", "SR_B3", "SR_B4"), "05": ("SR_B1", "SR_B2", "SR_B3", "SR_B4"),
                      "07": ("SR_B1", "SR_B2", "SR_B3", "SR_B4"), "08": ("SR_B2", "SR_B3", "SR_B4", "SR_B5"),
                      "09": ("SR_B2", "SR_B3", "SR_B4", "SR_B5")}.items()}  # fmt: skip

#: Any other file of a Landsat Collection 2 scene (``_ST_B10.TIF``, ``_QA_RADSAT.TIF``...): not read.
_LANDSAT_OTHER = re.compile(r"^L[COTEM]0[4-9]_L[0-9A-Z]{3}_\d{6}_\d{8}_\d{8}_\d{2}_(T1|T2|RT|A1|A2)_\w+\.TIFF?$", re.I)

#: Surface-reflectance bands of blue, green, red, NIR per Landsat mission.
_LANDSAT_SR_BANDS = {
    "04": ("SR_B1", "SR_B2", "SR_B3", "SR_B4"),
    "05": ("SR_B1", "SR_B2", "SR_B3", "SR_B4"),
    "07": ("SR_B1", "SR_B2", "SR_B3", "SR_B4"),
    "08": ("SR_B2", "SR_B3", "SR_B4", "SR_B5"),
    "09": ("SR_B2", "SR_B3", "SR_B4", "SR_B5"),
}

#: Dates in file names: a pre-collection Landsat scene id (``LC80200392015216LGN00``: year and day of year),
#: ``YYYY-MM-DD``, ``YYYYMMDD``, ``YYYYDOY``; the first that is a real date wins.
_DATE_PATTERNS = (
    (re.compile(r"L[COTEM]\d\d{6}(\d{4})(\d{3})[A-Z]{3}\d{2}"), "%Y%j"),
    (re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)"), "%Y%m%d"),
    (re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)"), "%Y%m%d"),
    (re.compile(r"(?<!\d)(\d{4})(\d{3})(?!\d)"), "%Y%j"),
)


def find_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Return the files of ``inputs``: files, folders' GeoTIFF/NetCDF files (and their subfolders'), globs expanded.

    Raises
    ------
    MissingDateError
        An input that is no file or folder and matches nothing, or no file at all.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _rasters_under(path)
            if not found:
                raise MissingDateError(f"{path} holds no GeoTIFF or NetCDF file ({', '.join(RASTER_SUFFIXES)})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif glob.has_magic(str(item)):
            matched = sorted(
                found
                for p in glob.glob(str(item))
                for found in (_rasters_under(Path(p)) if Path(p).is_dir() else [Path(p)] if Path(p).is_file() else [])
            )  # a glob of scene folders: their files
            if not matched:
                raise MissingDateError(f"{item} matches no file")
            files.extend(matched)
        else:
            raise MissingDateError(f"{path} does not exist")
    if not files:
        raise MissingDateError("no file given")
    return list(dict.fromkeys(Path(os.path.abspath(p)) for p in files))  # each once (links stay links)


def _rasters_under(folder: Path) -> list[Path]:
    """Return the GeoTIFF/NetCDF files of ``folder`` and its subfolders, hidden folders and Zarr stores skipped.

    USGS archives unpack one folder per scene.
    """
    found: list[Path] = []
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(f for f in folders if not f.startswith(".") and not f.endswith(".zarr"))
        found.extend(
            Path(root) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in RASTER_SUFFIXES
        )
    return sorted(found)


def date_from_name(path: str | os.PathLike[str]) -> np.datetime64:
    """Return the acquisition date in a file name (``YYYYMMDD``, ``YYYY-MM-DD``, ``YYYYDOY``), or raise.

    The first date of the name is taken: Landsat names give the acquisition date before the processing date.

    Examples
    --------
    >>> str(date_from_name("LC08_L2SP_001070_20190114_20200830_02_T2_SR_B2.TIF"))
    '2019-01-14'
    >>> str(date_from_name("s2_2018-07-08.tif")), str(date_from_name("LC80200392015216LGN00_B2.TIF"))
    ('2018-07-08', '2015-08-04')
    """
    name = Path(path).name
    for pattern, layout in _DATE_PATTERNS:
        for match in pattern.finditer(name):
            try:
                day = dt.datetime.strptime("".join(match.groups()), layout)
            except ValueError:
                continue  # digits that are no date (a path/row, a tile id)
            if 1950 <= day.year <= 2100:
                return np.datetime64(day.date(), "D")
    raise MissingDateError(
        f"{name} has no date in its name (YYYYMMDD, YYYY-MM-DD or YYYYDOY): rename it or give --dates-from csv:PATH"
    )


def _dates_from_csv(path: Path, files: Sequence[Path]) -> dict[Path, np.datetime64]:
    """Read ``file,date`` rows (file names or paths; a header row is skipped) and return each file's date."""
    if not path.is_file():
        raise MissingDateError(f"date table {path} does not exist")
    table: dict[str, np.datetime64] = {}
    with path.open(newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise ArgumentError(f"{path.name} line {number}: expected file,date, got {','.join(row)!r}")
            try:
                table[Path(row[0].strip()).name] = np.datetime64(row[1].strip(), "D")
            except ValueError:
                if number == 1:
                    continue  # a header
                raise ArgumentError(
                    f"{path.name} line {number}: {row[1].strip()!r} is not a date (YYYY-MM-DD)"
                ) from None
    missing = [f.name for f in files if f.name not in table]
    if missing:
        raise MissingDateError(f"{missing[0]} has no date in {path.name} (rows are file,date)")
    return {f: table[f.name] for f in files}


#: Units of a CF time axis (``days since 2015-08-01``) in seconds.
_TIME_UNITS = {"days": 86400.0, "day": 86400.0, "hours": 3600.0, "hour": 3600.0, "minutes": 60.0, "seconds": 1.0}


def netcdf_times(path: str | os.PathLike[str], variable: str) -> list[np.datetime64]:
    """Return the dates of a NetCDF variable's time axis (CF ``<unit> since <date>``), read through GDAL.

    No NetCDF library is needed: GDAL gives the axis values and units as metadata of the ``variable`` subdataset.
    """
    import warnings

    import rasterio

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(f'NETCDF:"{path}":{variable}') as raster:
                tags = raster.tags()
    except rasterio.errors.RasterioError as error:
        raise MissingDateError(f"{path.name} has no variable {variable} GDAL can read: {error}") from None
    axis = tags.get("NETCDF_DIM_EXTRA", "").strip("{}").split(",")[0]
    values, units = tags.get(f"NETCDF_DIM_{axis}_VALUES"), tags.get(f"{axis}#units", "")
    match = re.match(r"\s*(\w+)\s+since\s+(\d{4}-\d{1,2}-\d{1,2})(?:[ T](\d{1,2}:\d{2}(?::\d{2})?))?", units)
    if not axis or values is None or match is None or match[1].lower() not in _TIME_UNITS:
        raise MissingDateError(
            f"{path.name}: variable {variable} has no time axis of CF units '<days|hours|...> since <date>' "
            f"(axis {axis or 'none'}, units {units!r}): give the dates"
        )
    year, month, day = (int(v) for v in match[2].split("-"))
    origin = np.datetime64(f"{year:04d}-{month:02d}-{day:02d}T{match[3] or '00:00'}", "s")
    unit = _TIME_UNITS[match[1].lower()]
    steps = [float(v) for v in values.strip("{}").split(",") if v.strip()]
    return [(origin + np.timedelta64(int(round(v * unit)), "s")).astype("datetime64[D]") for v in steps]


def _file_dates(files: Sequence[Path], dates_from: str) -> dict[Path, np.datetime64]:
    if dates_from == "name":
        return {f: date_from_name(f) for f in files}
    if dates_from.startswith("csv:"):
        return _dates_from_csv(Path(dates_from[4:]), files)
    raise ArgumentError(f"dates_from must be 'name' or 'csv:PATH', got {dates_from!r}")


def is_landsat_band_layout(files: Sequence[Path]) -> bool:
    """Tell the one-file-per-band Landsat Collection 2 layout (any ``..._SR_B<n>.TIF``/``_QA_PIXEL.TIF``)."""
    return any(_LANDSAT_BAND.match(f.name) or _LANDSAT_L1_BAND.match(f.name) for f in files)


def open_files(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    bands: Mapping[str, int] | None = None,
    mask_band: int | None = None,
    cloud_values: Sequence[int] = (),
    qa_band: int | None = None,
    qa: str = "landsat-c2",
    dates_from: str = "name",
    scale: float | None = None,
    offset: float | None = None,
    crop_to_common: bool = False,
    sensor: str | None = None,
    chunks: int | None = IMPORT_CHUNK,
    align: str | None = None,
    nodata: float | None = None,
    dates: Sequence[Any] | None = None,
    bands_per_date: int | None = None,
    variables: Sequence[str] | None = None,
) -> xr.Dataset:
    """Read a folder, glob or list of GeoTIFF/NetCDF files into a validated (lazy) cube through :func:`open_stack`.

    Parameters
    ----------
    inputs : sequence of path-like or glob patterns
        Files, folders (their ``.tif``/``.tiff``/``.nc`` files, subfolders included) or glob patterns.
    bands : mapping, optional
        Position (1-based) of ``blue``, ``green``, ``red``, ``nir`` in each file (one file per date); not for
        the Landsat one-file-per-band layout, whose bands are known from the file names.
    mask_band, cloud_values, qa_band, qa, scale, offset, crop_to_common
        As :func:`open_stack`. Landsat layout: ``QA_PIXEL`` is the QA band (``landsat-c2``); the scale and
        offset default to :data:`LANDSAT_C2_SR` where the files declare none.
    dates_from : str
        ``name`` (each file name's date, :func:`date_from_name`), ``csv:PATH`` (rows ``file,date``) or ``time``
        (the time axis of a NetCDF file's first variable, :func:`netcdf_times`; the default with ``variables``).
    align, nodata
        As :func:`open_stack`: ``align="first"`` resamples every date onto the first date's grid.
    dates, bands_per_date
        One file holding every date, its bands date-major (``bands_per_date`` bands per date): the dates, in
        the file's order.
    variables : sequence of str, optional
        One NetCDF file of one ``(time, y, x)`` variable per band: the variables (``bands``, ``qa_band`` count
        within them); the dates are the file's time axis unless ``dates`` are given.
    sensor : str, optional
        Recorded per date; default ``LANDSAT_<n>`` from Landsat names, else ``OTHER``.
    chunks : int, optional
        Tile size of the lazy reads; None reads everything into memory.

    Returns
    -------
    xarray.Dataset
        A cube whose dates are in time order, ``attrs["scale_m"]`` the files' pixel size.

    Raises
    ------
    MissingDateError
        A missing file, a file without a date, a date without one of its bands, two files of one date.
    CMSNCubeError
        Whatever :func:`open_stack` refuses (a file that is no raster, grids that differ, a wrong scale...).
    """
    files = find_files(inputs)
    if is_landsat_band_layout(files):
        if bands is not None or mask_band is not None or qa_band is not None:
            raise ArgumentError(
                "Landsat Collection 2 band files (..._SR_B<n>.TIF, _QA_PIXEL.TIF) give their own bands and QA: "
                "leave out --bands, --mask-band and --qa-band"
            )
        return _open_landsat(
            files,
            dates_from=dates_from,
            scale=scale,
            offset=offset,
            crop=crop_to_common,
            sensor=sensor,
            chunks=chunks,
            align=align,
            nodata=nodata,
        )
    if bands is None:
        raise ArgumentError("give the band positions (--bands blue=1,green=2,red=3,nir=4) of these files")
    single: dict[str, Any] = {"align": align, "nodata": nodata, "chunks": chunks, "sensor": sensor or "OTHER"}
    single.update(scale=scale, offset=offset, mask_band=mask_band, cloud_values=cloud_values, qa_band=qa_band, qa=qa)
    if variables or dates is not None or bands_per_date is not None:
        if len(files) != 1:
            raise ArgumentError(
                f"{len(files)} files given: dates (--dates), bands per date (--bands-per-date) and variables "
                "(--variables) are for one file holding every date"
            )
        if variables:
            if dates is None and dates_from not in ("name", "time"):
                raise ArgumentError("the dates of a NetCDF file's variables come from its time axis, or --dates")
            dates = dates if dates is not None else netcdf_times(files[0], variables[0])
            return open_stack(files[0], dates=dates, bands=bands, variable=list(variables), **single)
        if dates is None:
            raise ArgumentError(f"{files[0].name} holds every date: give its dates (--dates, in the file's order)")
        return open_stack(files[0], dates=dates, bands=bands, bands_per_date=bands_per_date, **single)
    named = _file_dates(files, dates_from)
    ordered = sorted(files, key=lambda f: (named[f], f.name))
    _refuse_repeated_dates([(named[f], f) for f in ordered])
    return open_stack(
        ordered,
        dates=[named[f] for f in ordered],
        bands=bands,
        scale=scale,
        offset=offset,
        mask_band=mask_band,
        cloud_values=cloud_values,
        qa_band=qa_band,
        qa=qa,
        sensor=sensor or "OTHER",
        crop_to_common=crop_to_common,
        chunks=chunks,
        align=align,
        nodata=nodata,
    )


def _refuse_repeated_dates(dated: Sequence[tuple[np.datetime64, Path]]) -> None:
    for (first_date, first), (date, path) in zip(dated, dated[1:], strict=False):
        if date == first_date:
            raise MissingDateError(
                f"{first.name} and {path.name} are both dated {date}: give one file (or scene) per date"
            )


def _open_landsat(
    files: Sequence[Path],
    *,
    dates_from: str,
    scale: float | None,
    offset: float | None,
    crop: bool,
    sensor: str | None,
    chunks: int | None,
    align: str | None = None,
    nodata: float | None = None,
) -> xr.Dataset:
    """Group Landsat band files by scene and read each scene's B/G/R/NIR (+ QA) as one date.

    Collection 2 Level-2 ``SR_B<n>`` (+ ``QA_PIXEL``), or Level-1 ``B<n>`` (+ ``BQA``, Collection 1, or
    ``QA_PIXEL``), whichever the first band file is.
    """
    level1 = not any(_LANDSAT_BAND.match(f.name) for f in files)
    pattern = _LANDSAT_L1_BAND if level1 else _LANDSAT_BAND
    scenes: dict[str, dict[str, Path]] = {}
    missions: dict[str, str] = {}
    for path in files:
        match = pattern.match(path.name)
        if match is None and _LANDSAT_OTHER.match(path.name):
            continue  # the scene's other files: thermal, QA_RADSAT, SR_QA_AEROSOL, ...
        if match is None:
            raise BandMismatchError(
                f"{path.name} is no Landsat Collection 2 band file (..._SR_B<n>.TIF or _QA_PIXEL.TIF) like the "
                "other files: import it apart"
            )
        scene = match["scene"].upper()
        scenes.setdefault(scene, {})[match["band"].upper()] = path
        missions[scene] = match["mission"]
    dates = _file_dates([next(iter(bands.values())) for bands in scenes.values()], dates_from)
    scene_dates = {scene: dates[next(iter(bands.values()))] for scene, bands in scenes.items()}
    order = sorted(scenes, key=lambda scene: (scene_dates[scene], scene))
    _refuse_repeated_dates([(scene_dates[s], Path(s)) for s in order])
    qa_name = "BQA" if level1 and any("BQA" in scenes[s] for s in order) else "QA_PIXEL"
    with_qa = [s for s in order if qa_name in scenes[s]]
    groups, sensors = [], []
    for scene in order:
        needed = list((_LANDSAT_L1_BANDS if level1 else _LANDSAT_SR_BANDS)[missions[scene]])
        needed += [qa_name] if with_qa else []
        absent = [band for band in needed if band not in scenes[scene]]
        if absent:
            found = ", ".join(sorted(scenes[scene]))
            raise MissingDateError(
                f"{scene} ({scene_dates[scene]}) has no {'/'.join(absent)} file (found {found}): every date needs "
                f"{', '.join(needed)}"
            )
        groups.append([scenes[scene][band] for band in needed])
        sensors.append(sensor or f"LANDSAT_{int(missions[scene])}")
    if scale is None and offset is None and not level1 and not _declares_scale(groups[0][0]):
        scale, offset = LANDSAT_C2_SR
    return open_stack(
        groups,
        dates=[scene_dates[s] for s in order],
        bands={"blue": 1, "green": 2, "red": 3, "nir": 4},
        scale=scale,
        offset=offset,
        qa_band=5 if with_qa else None,
        qa="landsat-c1" if qa_name == "BQA" else "landsat-c2",
        sensor=sensors,
        crop_to_common=crop,
        chunks=chunks,
        align=align,
        nodata=nodata,
    )


def _declares_scale(path: Path) -> bool:
    """Tell whether a file declares a scale or offset of its own (GDAL's scale/offset, not 1 and 0)."""
    import rasterio

    try:
        with rasterio.open(path) as raster:
            return any(s != 1 for s in raster.scales) or any(o != 0 for o in raster.offsets)
    except rasterio.errors.RasterioError:
        return False  # open_stack names the file and the reason


def describe(cube: xr.Dataset) -> dict[str, Any]:
    """Return what ``cmsn-cube import`` prints of a cube: dates, size, CRS, pixel size, sensors."""
    return {
        "dates": cube.sizes["time"],
        "first": str(cube["time"].values[0])[:10],
        "last": str(cube["time"].values[-1])[:10],
        "height": cube.sizes["y"],
        "width": cube.sizes["x"],
        "crs": str(cube.rio.crs),
        "scale_m": float(cube.attrs.get("scale_m", float("nan"))),
        "sensors": sorted({str(s) for s in cube["sensor"].values}),
    }
