"""Helpers for tests and examples: tiny cubes, Zarr stores of them, and the shared real-data folder.

Users can import these in their own tests (``from cmsn_cube.testing import tiny_scene``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import xarray as xr

#: Environment variable that points at the shared real-data folder (``cbers_timeseries/``, ``cloud_masks_ukis/``...).
SHARED_DATA_ENV = "CMSN_SHARED_DATA"


def shared_data_dir() -> Path | None:
    """Return the shared real-data folder, or None when it is not there.

    ``$CMSN_SHARED_DATA`` wins; otherwise ``../shared/data`` next to the repository (the layout of the
    development machines: ``<root>/main`` is the repository, ``<root>/shared/data`` the data).
    """
    override = os.environ.get(SHARED_DATA_ENV)
    if override:
        path = Path(override)
        return path if path.is_dir() else None
    path = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
    return path if path.is_dir() else None


def shared_data_path(name: str) -> Path | None:
    """``shared_data_dir() / name`` when it exists, else None (e.g. ``shared_data_path("cbers_timeseries")``)."""
    root = shared_data_dir()
    if root is None:
        return None
    path = root / name
    return path if path.exists() else None


def tiny_scene(*, size: int = 96, n_dates: int = 3, seed: int = 0, **options: Any) -> xr.Dataset:
    """Return a small embedded synthetic scene (``size`` x ``size`` px) with its ``truth``.

    ``options`` go to :func:`cmsn_cube.sources.synthetic.synthetic_scene`.
    """
    from cmsn_cube.sources.synthetic import synthetic_scene

    return synthetic_scene(height=size, width=size, n_dates=n_dates, seed=seed, **options)


def tiny_store(path: str | os.PathLike[str], cube: xr.Dataset | None = None, *, chunk: int = 64, **options: Any) -> str:
    """Write ``cube`` (default :func:`tiny_scene` with ``options``) to a Zarr store at ``path``, small chunks."""
    from cmsn_cube.store import write_cube

    cube = tiny_scene(**options) if cube is None else cube
    return write_cube(cube, path, chunks={"time": 1, "band": 4, "y": chunk, "x": chunk}, overwrite=True)


#: The file a benchmark leaves in a working folder it made its own (see :func:`claim_workdir`).
WORKDIR_MARK = ".cmsn-cube-benchmark"


def claim_workdir(path: str | os.PathLike[str], owner: str) -> Path:
    """Return a working folder that ``owner`` (a benchmark's name) may replace things in.

    That is a new or empty folder, or one it claimed before. A folder with other content is refused, so a
    benchmark never deletes what it did not write.

    Raises
    ------
    FileExistsError
        ``path`` holds files and was not claimed by ``owner``.
    """
    folder = Path(path)
    mark = folder / WORKDIR_MARK
    if folder.exists() and any(folder.iterdir()) and not (mark.is_file() and mark.read_text() == owner):
        raise FileExistsError(
            f"{folder} is not empty and was not made by {owner}: give a new or empty folder as --workdir"
        )
    folder.mkdir(parents=True, exist_ok=True)
    mark.write_text(owner)
    return folder
