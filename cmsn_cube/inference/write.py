"""Writing a reconstruction to Zarr region by region, resumably: the record, the markers, the state of a store.

A store records what it is made from (:func:`record`); each output chunk is written by its own task, which then
leaves a marker inside the store (:func:`write_region`), so a killed write resumes from the regions written.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Literal

import dask
import numpy as np
import xarray as xr

from cmsn_cube.exceptions import StoreError, check_positive
from cmsn_cube.inference.graph import Index, compute_regions, computed_chunks, region_graph
from cmsn_cube.inference.inputs import check_gaps, check_observed
from cmsn_cube.store import check_chunk_files, naming_damaged_chunks

#: Attribute of a reconstruction store: what it was made from (:func:`record`); a resume needs the same.
RECORD_ATTR = "cmsn_cube_reconstruction"

WriteState = Literal["new", "resume", "complete", "replace"]


def region_marker(path: str, key: str) -> str:
    """Return the marker left in store ``path`` once region ``key`` is written.

    Inside the store, so that deleting or replacing the store deletes them too.
    """
    from cmsn_cube.store import REGIONS_FOLDER

    return f"{path}/{REGIONS_FOLDER}/{key}"


def _writing_every_chunk(array: Any) -> Any:
    """Return the Zarr ``array`` set to write a chunk equal to the fill value too (a checked store expects it).

    Set on the array, not with ``zarr.config.set``: that changes one global for every thread, and a region
    finished on another thread set it back while this one was writing (an all-zero ``filled`` chunk went missing).
    """
    return array.with_config({"write_empty_chunks": True})


def write_region(*arrays: np.ndarray, path: str, index: dict[str, tuple[slice, ...]], key: str) -> str:
    """Write one block of every variable straight into the Zarr arrays, then leave a marker (for resuming).

    ``arrays`` come in the order of ``index``, which gives each variable's region.
    """
    import fsspec
    import zarr

    group = zarr.open_group(path, mode="r+")
    for (name, where), values in zip(index.items(), arrays, strict=True):
        _writing_every_chunk(group[name])[where] = values
    with fsspec.open(region_marker(path, key), "w", auto_mkdir=True) as marker:
        marker.write("done")
    return key


def store_chunks(result: xr.Dataset, name: Any) -> tuple[int, ...]:
    """Return the Zarr chunks of variable ``name``: one date, and the Dask chunks along y/x (one region each).

    Read from the variable itself: the dataset's ``chunks`` also count coordinates, and a store's per-date
    coordinates (``cloud_fraction``, ``sensor``, ``slc_off``) come back in chunks of one date.
    """
    chunks = result[name].variable.chunksizes
    return tuple(
        1 if d == "time" else chunks[d][0] if d in chunks and d in ("y", "x") else result.sizes[d]
        for d in result[name].dims
    )


def record(result: xr.Dataset) -> dict[str, Any]:
    """Return what a reconstruction store is made from: input, model, times, grid, tiling, variables and chunks."""
    from cmsn_cube.cube import crs_of

    return {
        "input_fingerprint": result.attrs.get("input_fingerprint"),
        "model_sha256": result.attrs.get("model_sha256"),
        "tiling": result.attrs.get("tiling"),
        "times": [str(t) for t in result["time"].values.astype("datetime64[s]")],
        "sizes": {str(dim): int(size) for dim, size in result.sizes.items()},
        "grid": [float(v) for v in (result.y[0], result.y[-1], result.x[0], result.x[-1])],
        "crs": str(crs_of(result)),
        "chunks": {str(name): list(store_chunks(result, name)) for name in result.data_vars},
    }


def reconstruction_state(result: xr.Dataset, path: str | os.PathLike[str], *, overwrite: bool = False) -> WriteState:
    """Tell what :func:`write_reconstruction` would do at ``path``, or raise the error it would raise.

    ``"new"``: nothing there (or an empty folder); ``"resume"``: this tool's unfinished output of the same
    input, model, times, grid and tiling; ``"complete"``: the same, finished (a rerun is a no-op);
    ``"replace"``: another Zarr store, replaced because ``overwrite`` is set.

    Raises
    ------
    StoreError
        ``path`` is the reconstruction's own input (even with ``overwrite``), is not a Zarr store (never
        deleted), or holds another store and ``overwrite`` is not set (the message says what differs).
    """
    import zarr

    from cmsn_cube.store import COMPLETE_ATTR, same_store, store_path, writable_kind

    path = store_path(path)
    source = result.attrs.get("input_store")
    if source and same_store(source, path):
        raise StoreError(f"{path} is the input of this reconstruction: write it to another path")
    if writable_kind(path) != "zarr":
        return "new"
    try:
        group = zarr.open_group(path, mode="r")
        attrs, members = dict(group.attrs), set(group.array_keys())
    except Exception:  # a damaged store is a foreign one
        attrs, members = {}, set()
    text = attrs.get(RECORD_ATTR)
    stored = json.loads(text) if isinstance(text, str) else None
    wanted = json.loads(json.dumps(record(result)))
    if stored == wanted:
        if attrs.get(COMPLETE_ATTR) is not True:
            return "resume"
        try:  # finished, unless a chunk file went missing since
            check_chunk_files(path, remedy="pass overwrite=True (--overwrite) to write it again")
        except StoreError:
            if overwrite:
                return "replace"
            raise
        return "complete"
    if overwrite:
        return "replace"
    if stored is None:
        what = "a cube" if "reflectance" in members else "a Zarr store that is not a reconstruction of cmsn-cube"
        raise StoreError(f"{path} holds {what}; pass overwrite=True (--overwrite) to replace it")
    differs = sorted(key for key in wanted if stored.get(key) != wanted[key])
    raise StoreError(
        f"{path} holds a reconstruction with another {', '.join(differs)}; "
        "pass overwrite=True (--overwrite) to replace it, or write to another path"
    )


def write_reconstruction(
    result: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    max_regions: int | None = None,
) -> str:
    """Write a (lazy) reconstruction to Zarr region by region; a killed run resumes from the regions written.

    Nothing is lost: the reconstruction's own input is never written over, and any other store at ``path``
    only with ``overwrite``, never a folder that is not a Zarr store. The store records what it is made from
    (input fingerprint, model, times, grid, tiling, chunks); calling this again with the same reconstruction
    resumes an unfinished store (each output chunk is written by its own task, which then leaves a marker
    inside the store) and leaves a finished one as it is. The store opens (:func:`cmsn_cube.open_reconstruction`)
    only once every region is written. On a Dask client the regions stream through the workers in raster
    order, a few per worker thread at a time, so memory does not grow with the scene; without one the
    configured local scheduler computes them all at once.

    Parameters
    ----------
    result : xarray.Dataset
        Output of :func:`reconstruct`.
    path : str or path-like
        Store location (local folder or fsspec URL).
    overwrite : bool
        Replace another Zarr store at ``path`` (another input, model or tiling, or not a reconstruction).
    progress : bool
        Show a progress bar over regions.
    max_regions : int, optional
        Write at most this many regions and stop, leaving the store resumable (for batch jobs with a time
        limit: each job writes a share, the last one completes the store).

    Returns
    -------
    str
        The store's path.

    Raises
    ------
    StoreError
        See :func:`reconstruction_state`; or a chunk of the input store is missing or corrupt (named).
    NoDataError
        The input has no clear pixel on any date. A warning names the share of pixels observed on no date.
    """
    from cmsn_cube.outputs import exclusive_writer
    from cmsn_cube.store import store_path

    check_positive(max_regions=max_regions)
    path = store_path(path)
    with exclusive_writer(path):
        return _write_reconstruction(
            _with_coordinates_computed(result), path, overwrite=overwrite, progress=progress, max_regions=max_regions
        )


def _write_reconstruction(
    result: xr.Dataset, path: str, *, overwrite: bool, progress: bool, max_regions: int | None
) -> str:
    """:func:`write_reconstruction` once the output's lock is held."""
    from cmsn_cube.store import filesystem, mark_store_complete

    state = reconstruction_state(result, path, overwrite=overwrite)
    if state == "complete":
        return path
    values = _small_variables(result)
    source = f"the input {result.attrs['input_store']}" if "input_store" in result.attrs else "the cube"
    check_observed(values["observed_dates"], what=source, stacklevel=4)  # stacklevel: the user's call
    if "gap_pixels" in values:
        check_gaps(values["gap_pixels"], what=source, stacklevel=4)
    _start_store(result, path, values, new=state in ("new", "replace"))
    computed = computed_chunks({name: result[name].data for name in values}, values)
    spatial = _spatial_variables(result, values)
    pending = _pending_regions(spatial, path, resume=state == "resume")
    finishing = max_regions is None or len(pending) <= max_regions
    _write_regions(spatial, path, pending[:max_regions], computed=computed, progress=progress)
    if not finishing:
        return path
    fs, root = filesystem(path)
    markers = region_marker(root, "").rstrip("/")
    if fs.exists(markers):
        fs.rm(markers, recursive=True)
    mark_store_complete(path)
    return path


def _with_coordinates_computed(result: xr.Dataset) -> xr.Dataset:
    """Return ``result`` with its lazy non-dimension coordinates computed.

    The per-date coordinates of a pulled store (cloud fraction, sensor, SLC-off) come lazily, a date a chunk:
    they are a few bytes, and the template writes only what is in memory.
    """
    lazy = [name for name, coord in result.coords.items() if name not in result.dims and coord.chunks is not None]
    return result.assign_coords({name: result[name].variable.compute() for name in lazy})


def _small_variables(result: xr.Dataset) -> dict[str, np.ndarray]:
    """Compute ``observed_dates`` and the variables without y/x (the self-check's scores and choice) in one read.

    One read of the input's mask and no-data pattern (an empty scene is refused before anything is written);
    these values are written directly and handed to the region tasks as values.
    """
    names = ["observed_dates", *(str(name) for name in result.data_vars if not {"y", "x"} <= set(result[name].dims))]
    with naming_damaged_chunks(result.attrs.get("input_store")):
        return dict(zip(names, dask.compute(*(result[name].data for name in names)), strict=True))


def _start_store(result: xr.Dataset, path: str, values: dict[str, np.ndarray], *, new: bool) -> None:
    """Write the store's template when ``new`` (replacing what is there), then the small ``values``.

    The values are written on a resume too: a run killed right after the template never wrote them.
    """
    import zarr

    from cmsn_cube.store import remove_store, store_compressors, write_template

    if new:
        remove_store(path)
        template = result.copy()
        for name, variable in template.data_vars.items():
            variable.encoding = {"chunks": store_chunks(result, name), "compressors": store_compressors()}
        template.attrs[RECORD_ATTR] = json.dumps(record(result))
        write_template(template, path)
    group = zarr.open_group(path, mode="r+")
    for name, value in values.items():
        _writing_every_chunk(group[name])[...] = value


def _spatial_variables(result: xr.Dataset, values: dict[str, np.ndarray]) -> xr.Dataset:
    """Return the variables written region by region (those not in ``values``), in one chunk off y/x."""
    spatial = result[[str(name) for name in result.data_vars if name not in values]]
    return spatial.chunk({dim: -1 for dim in spatial.dims if dim not in ("y", "x")})


def _pending_regions(spatial: xr.Dataset, path: str, *, resume: bool) -> list[Index]:
    """Return the regions (output chunks along y and x) still to write, in raster order."""
    from cmsn_cube.store import filesystem

    fs, root = filesystem(path)
    everything = [(i, j) for i in range(len(spatial.chunks["y"])) for j in range(len(spatial.chunks["x"]))]
    return [(i, j) for i, j in everything if not (resume and fs.exists(region_marker(root, f"{i}_{j}")))]


def _write_regions(
    spatial: xr.Dataset, path: str, regions: list[Index], *, computed: dict[Any, np.ndarray], progress: bool
) -> None:
    """Write ``regions`` of the ``spatial`` variables: one task per region, streamed (see :func:`compute_regions`).

    ``computed``: chunks of the graph already computed (the small variables), not computed again.
    """
    bounds = {dim: np.cumsum((0, *spatial.chunks[dim])) for dim in ("y", "x")}
    dims = {str(name): tuple(str(d) for d in spatial[name].dims) for name in spatial.data_vars}
    writers = {}
    for i, j in regions:
        where = {"y": slice(*map(int, bounds["y"][i : i + 2])), "x": slice(*map(int, bounds["x"][j : j + 2]))}
        index = {name: tuple(where.get(d, slice(None)) for d in dims[name]) for name in dims}
        writers[i, j] = functools.partial(write_region, path=path, index=index, key=f"{i}_{j}")
    arrays = {name: (dims[name], spatial[name].data) for name in dims}
    graph = region_graph(arrays, writers, label=path, computed=computed)
    with naming_damaged_chunks(spatial.attrs.get("input_store")):
        compute_regions(graph, progress=progress, description=f"writing {os.path.basename(path)}")
