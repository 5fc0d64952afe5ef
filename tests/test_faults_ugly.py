"""Ugly faults made plain: what used to give a traceback, several lines or a raw exception naming no file.

Each case is issue 31's item 6: the library raises a :mod:`cmsn_cube.exceptions` error naming the cause and the
file, and the command line prints one ``error:`` line (usage errors exit 2).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from test_faults import one_line_error

from cmsn_cube.cli import main
from cmsn_cube.cube import make_cube, validate_cube
from cmsn_cube.exceptions import (
    BandMismatchError,
    CheckpointError,
    CubeValidationError,
    ReflectanceRangeError,
    StoreError,
    TimeAxisError,
)
from cmsn_cube.model import CMSN, load_checkpoint, save_checkpoint
from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import WRITE_ID_ATTR, append_cube, drop_dates, open_cube, write_cube


@pytest.fixture(scope="module")
def scene() -> xr.Dataset:
    return synthetic_scene(height=64, width=64, seed=3)


@pytest.fixture()
def store(tmp_path, scene) -> str:
    return write_cube(scene, tmp_path / "scene.zarr")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", CMSN(width=4, depth=1, skip_width=2))


def later(scene: xr.Dataset, days: int = 100) -> xr.Dataset:
    """``scene``'s dates shifted ``days`` later: dates an append accepts."""
    return scene.assign_coords(time=scene["time"] + np.timedelta64(days, "D"))


def same_data(a: xr.Dataset, b: xr.Dataset) -> None:
    """Equal values, coordinates and attributes, but for the id each write draws."""
    xr.testing.assert_identical(a.drop_attrs(deep=False), b.drop_attrs(deep=False))
    assert {k: v for k, v in a.attrs.items() if k != WRITE_ID_ATTR} == {
        k: v for k, v in b.attrs.items() if k != WRITE_ID_ATTR
    }


# ------------------------------------------------------------------------------------------ stores


def test_an_append_to_a_missing_store_names_it(scene, tmp_path):
    missing = tmp_path / "missing.zarr"
    with pytest.raises(StoreError, match=f"no store at {missing}; write it with write_cube first"):
        append_cube(later(scene), missing)
    assert not missing.exists()


def test_an_append_of_digital_numbers_is_refused_and_leaves_the_store_as_it_was(scene, store):
    before = open_cube(store).load()
    digital = later(scene)
    digital = digital.assign(reflectance=digital["reflectance"] * 10_000).chunk({"time": 1})  # lazy: not validated
    with pytest.raises(ReflectanceRangeError, match=f"reflectance appended to {store} .*digital numbers"):
        append_cube(digital, store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rolled back at once, not left for open_store to warn about
        same_data(open_cube(store).load(), before)
    append_cube(later(scene).chunk({"time": 1}), store)  # the next append starts from the original dates
    assert open_cube(store).sizes["time"] == 6


def test_drop_dates_removes_dates_and_keeps_the_others_values(scene, store):
    original = open_cube(store).load()
    appended = later(scene)
    append_cube(appended, store)
    assert drop_dates(store, appended["time"].values) == store
    same_data(open_cube(store).load(), original)
    drop_dates(store, original["time"].values[1])
    xr.testing.assert_equal(open_cube(store).load(), original.isel(time=[0, 2]))
    with pytest.raises(CubeValidationError, match=f"store {store} has no date 2001-01-01"):
        drop_dates(store, np.datetime64("2001-01-01"))
    with pytest.raises(CubeValidationError, match="empty store"):
        drop_dates(store, open_cube(store)["time"].values)
    assert open_cube(store).sizes["time"] == 2


def test_info_names_a_truncated_chunk(store):
    chunk = Path(store) / "reflectance" / "c" / "2" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    run = CliRunner().invoke(main, ["info", store])
    line = one_line_error(run)
    assert store in line and "chunk reflectance/c/2/0/0/0 cannot be decoded" in line, line


# ------------------------------------------------------------------------------------------ checkpoints


def test_a_truncated_checkpoint_is_named(checkpoint, store, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])  # cut in the zip's data
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated} is truncated or not a torch file"):
        load_checkpoint(truncated)
    run = CliRunner().invoke(main, ["reconstruct", store, str(tmp_path / "o.zarr"), "--model", str(truncated)])
    assert "is truncated or not a torch file" in one_line_error(run)


def test_a_folder_given_as_checkpoint_is_named(checkpoint, store, tmp_path, monkeypatch):
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "best.pt").write_bytes(checkpoint.read_bytes())
    with pytest.raises(CheckpointError, match=f"{run_folder} is a directory, not a checkpoint file.*best.pt"):
        load_checkpoint(run_folder)
    monkeypatch.chdir(tmp_path)  # a bare name that is a folder here is not taken for a packaged model
    with pytest.raises(CheckpointError, match="run is a directory, not a checkpoint file"):
        load_checkpoint("run")
    run = CliRunner().invoke(main, ["reconstruct", store, str(tmp_path / "o.zarr"), "--model", "run"])
    assert "is a directory, not a checkpoint file" in one_line_error(run)


# ------------------------------------------------------------------------------------------ the command line


@pytest.mark.parametrize(
    "args",
    [
        ["synth", "{tmp}/s.zarr", "--cloud", "abc"],
        ["synth", "{tmp}/s.zarr", "--cloud", ","],
        ["synth", "{tmp}/s.zarr", "--seed", "-1", "--height", "32", "--width", "32"],
        ["evaluate", "{store}", "--methods", ""],
        ["evaluate", "{store}", "--methods", " , "],
        ["evaluate", "{store}", "--seed", "-1", "--truth", "pasted", "--methods", "nearest"],
    ],
)
def test_bad_option_values_are_usage_errors(args, store, tmp_path):
    run = CliRunner().invoke(main, [a.format(tmp=tmp_path, store=store) for a in args])
    line = one_line_error(run)
    assert run.exit_code == 2, line
    assert "Invalid value for" in line, line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("kind", ["store", "folder"])
def test_fit_refuses_a_folder_as_its_checkpoint_before_any_work(kind, store, tmp_path, monkeypatch):
    import cmsn_cube.adapt

    def no_fit(*args, **kwargs):
        raise AssertionError("the fit ran before --out was checked")

    monkeypatch.setattr(cmsn_cube.adapt, "_fit", no_fit)
    out = store if kind == "store" else str(tmp_path)
    run = CliRunner().invoke(main, ["fit", store, "--out", out])
    assert run.exception is None or isinstance(run.exception, SystemExit), run.exception
    line = one_line_error(run)
    assert out in line and "not a file" in line, line


# ------------------------------------------------------------------------------------------ building cubes


def test_five_bands_are_named_by_make_cube(scene):
    reflectance = scene["reflectance"].values
    five = np.concatenate([reflectance, reflectance[:, :1]], axis=1)
    coords = {"time": scene["time"].values, "y": scene["y"].values, "x": scene["x"].values}
    with pytest.raises(BandMismatchError, match=r"5 bands \(shape \(3, 5, 64, 64\)\), expected 4: blue, green"):
        make_cube(five, crs="EPSG:32650", sensor="LANDSAT_8", **coords)
    with pytest.raises(CubeValidationError, match=r"cloud_mask has shape \(2, 64, 64\), expected \(time=3, y=64"):
        make_cube(reflectance, crs="EPSG:32650", sensor="LANDSAT_8", cloud_mask=np.zeros((2, 64, 64), bool), **coords)


def test_time_zone_aware_times_become_naive_utc_or_are_refused(scene):
    paris = pd.DatetimeIndex(["2020-01-01 00:30", "2020-07-01 00:30", "2020-07-17 00:30"]).tz_localize("Europe/Paris")
    utc = np.array(["2019-12-31T23:30", "2020-06-30T22:30", "2020-07-16T22:30"], dtype="datetime64[ns]")
    for times in (paris, list(paris)):
        cube = make_cube(
            scene["reflectance"].values, time=times, y=scene["y"].values, x=scene["x"].values,
            crs="EPSG:32650", sensor="LANDSAT_8",
        )  # fmt: skip
        np.testing.assert_array_equal(cube["time"].values, utc)
    with pytest.raises(TimeAxisError, match=r"times must be naive UTC; got tz-aware times \(Europe/Paris\)"):
        validate_cube(scene.assign_coords(time=paris))
