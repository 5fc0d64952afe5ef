"""Fixtures shared by the whole suite: tiny embedded scenes, a store on disk, a no-compute Dask scheduler."""

from __future__ import annotations

import dask
import pytest
import xarray as xr

from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import write_cube


@pytest.fixture(scope="session")
def small_scene() -> xr.Dataset:
    """A 96 x 96, three-date embedded scene (seed 3), in memory."""
    return synthetic_scene(height=96, width=96, seed=3)


@pytest.fixture()
def scene_store(tmp_path, small_scene) -> str:
    """``small_scene`` written to a real Zarr store on disk."""
    return write_cube(small_scene, tmp_path / "scene.zarr")


class ComputeForbidden(AssertionError):
    """Raised by :func:`no_compute` when something computes a Dask graph."""


@pytest.fixture()
def no_compute():
    """A Dask scheduler that raises on any compute: proves a function stays lazy."""

    def refuse(*args, **kwargs):
        raise ComputeForbidden("a Dask graph was computed where the code must stay lazy")

    with dask.config.set(scheduler=refuse):
        yield
