"""The pull: choose the dates of a cube, and the whole chain plan -> collection -> xee -> cube -> dates -> Zarr."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from cmsn_cube.cube import validate_cube
from cmsn_cube.exceptions import MissingDateError
from cmsn_cube.qa import DEFAULT_CLOUD_LEVELS, cloud_fraction, select_dates
from cmsn_cube.sources._common import iso_day
from cmsn_cube.sources.earthengine.auth import initialize_earthengine
from cmsn_cube.sources.earthengine.collection import open_xee
from cmsn_cube.sources.earthengine.convert import xee_to_cube
from cmsn_cube.sources.earthengine.plan import PullPlan
from cmsn_cube.store import write_cube

if TYPE_CHECKING:  # pragma: no cover
    import ee


def choose_dates(
    cube: xr.Dataset,
    *,
    levels: Sequence[float] = DEFAULT_CLOUD_LEVELS,
    dates: Sequence[str | dt.date] | None = None,
    progress: bool = False,
) -> xr.Dataset:
    """Keep the dates nearest the target cloud levels (or exactly ``dates``), with their cloud fraction.

    Computes the cloud fraction of every date (reads QA and reflectance once); the returned cube stays lazy.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube with ``cloud_mask`` (or ``qa_pixel``).
    levels : sequence of float
        Target cloud fractions, one date each (default 25 %, 15 %, 10 %).
    dates : sequence of str, optional
        Keep these days instead (the seed's dates); each must be in the cube.
    progress : bool
        Show a progress bar while the fractions are computed.

    Returns
    -------
    xarray.Dataset
        The chosen dates in time order, with a ``cloud_fraction(time)`` coordinate.

    Raises
    ------
    MissingDateError
        A requested day is not in the cube.
    NoDataError
        Fewer usable dates than levels.
    """
    validate_cube(cube)
    if dates:
        days = cube["time"].values.astype("datetime64[D]")
        wanted = [np.datetime64(iso_day(d, "dates"), "D") for d in dates]
        missing = [str(d) for d in wanted if d not in days]
        if missing:
            available = ", ".join(str(d) for d in days)
            raise MissingDateError(f"no acquisition on {', '.join(missing)}; the window has {available}")
        positions = sorted(int(np.flatnonzero(days == d)[0]) for d in wanted)
        fractions = _compute(cloud_fraction(cube.isel(time=positions)), progress=progress)
        return cube.isel(time=positions).assign_coords(cloud_fraction=("time", fractions.values))
    fractions = _compute(cloud_fraction(cube), progress=progress)
    positions = select_dates(fractions, levels)
    return cube.isel(time=positions).assign_coords(cloud_fraction=("time", fractions.values[positions]))


def _compute(array: xr.DataArray, *, progress: bool) -> xr.DataArray:
    """Compute ``array``, with a progress bar when asked."""
    if not progress:
        return array.compute()
    from tqdm.dask import TqdmCallback

    with TqdmCallback(desc="cloud fraction per date", unit="task"):
        return array.compute()


def pull_region(
    plan: PullPlan,
    out: str | os.PathLike[str],
    *,
    project: str | None = None,
    chunks: Mapping[str, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    collection: ee.ImageCollection | None = None,
) -> str:
    """Pull a region into a Zarr store: initialize, open with xee, convert, choose dates, write.

    Parameters
    ----------
    plan : PullPlan
        From :func:`plan_pull` or :func:`plan_region`.
    out : path-like
        Store path (``stores/<region>.zarr``) or fsspec URL.
    project : str, optional
        Earth Engine Cloud project (see :func:`initialize_earthengine`).
    chunks : mapping, optional
        Dask chunks of the opened collection (default :data:`DEFAULT_XEE_CHUNKS`).
    overwrite : bool
        Replace an existing store.
    progress : bool
        Show progress while cloud fractions are computed and the store is written.
    collection : ee.ImageCollection, optional
        Use this collection instead of :func:`collection_for_plan`.

    Returns
    -------
    str
        The store's path.
    """
    initialize_earthengine(project)
    ds = open_xee(plan, chunks=chunks, collection=collection)
    cube = xee_to_cube(ds, sensor=plan.sensor, product=plan.product)
    cube = choose_dates(cube, levels=plan.levels, dates=plan.dates, progress=progress)
    cube.attrs.update(region=plan.name, bbox=list(plan.bbox), window=f"{plan.start}/{plan.end}")
    if plan.wrs_path is not None and plan.wrs_row is not None:
        cube.attrs["wrs_path_row"] = f"{plan.wrs_path:03d}/{plan.wrs_row:03d}"
    return write_cube(cube, out, overwrite=overwrite, progress=progress)
