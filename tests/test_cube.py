"""Cube schema validation (one test per kind of bad input) and Zarr stores (round trip, append, interruption)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from cmsn_cube.cube import BANDS, SENSOR_BANDS, crs_of, make_cube, set_crs, validate_cube
from cmsn_cube.exceptions import (
    BandMismatchError,
    CubeValidationError,
    DimensionError,
    DTypeError,
    GridError,
    MissingCRSError,
    ReflectanceRangeError,
    StoreError,
    TimeAxisError,
)
from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import append_cube, open_cube, write_cube


def tiny_cube(n_dates: int = 3, size: int = 8) -> xr.Dataset:
    rng = np.random.default_rng(0)
    return make_cube(
        rng.uniform(0, 0.5, (n_dates, 4, size, size)).astype("float32"),
        time=np.datetime64("2020-01-01") + np.arange(n_dates) * np.timedelta64(16, "D"),
        y=3_000_000 - 30 * np.arange(size) - 15,
        x=500_000 + 30 * np.arange(size) + 15,
        crs="EPSG:32650",
        sensor="LANDSAT_8",
        cloud_mask=rng.random((n_dates, size, size)) < 0.2,
    )


def test_valid_cube_passes_and_has_schema():
    cube = tiny_cube()
    assert validate_cube(cube) is cube
    assert cube.reflectance.dims == ("time", "band", "y", "x")
    assert list(cube.band.values) == list(BANDS)
    assert crs_of(cube).to_epsg() == 32650


def test_missing_dim_is_named():
    cube = tiny_cube().isel(time=0)
    with pytest.raises(DimensionError, match="time"):
        validate_cube(cube)


def test_wrong_dim_order_says_how_to_transpose():
    cube = tiny_cube()
    bad = cube.assign(reflectance=cube.reflectance.transpose("band", "time", "y", "x"))
    with pytest.raises(DimensionError, match=r"transpose\('time', 'band', 'y', 'x'\)"):
        validate_cube(bad)


def test_wrong_band_names():
    cube = tiny_cube().assign_coords(band=["B2", "B3", "B4", "B5"])
    with pytest.raises(BandMismatchError, match="B2"):
        validate_cube(cube)


def test_integer_reflectance_is_rejected():
    cube = tiny_cube()
    bad = cube.assign(reflectance=(cube.reflectance * 10000).astype("uint16"))
    with pytest.raises(DTypeError, match="float32"):
        validate_cube(bad)


def test_unscaled_digital_numbers_are_rejected():
    cube = tiny_cube()
    bad = cube.assign(reflectance=(cube.reflectance * 10000 + 7000).astype("float32"))
    with pytest.raises(ReflectanceRangeError, match="unscaled digital numbers"):
        validate_cube(bad)


def test_missing_crs():
    cube = tiny_cube().drop_vars("spatial_ref")
    for name in cube.data_vars:
        cube[name].encoding.pop("grid_mapping", None)
    with pytest.raises(MissingCRSError, match="no CRS"):
        validate_cube(cube)


def test_unsorted_times():
    cube = tiny_cube()
    with pytest.raises(TimeAxisError, match="sortby"):
        validate_cube(cube.isel(time=[1, 0, 2]))


def test_duplicate_times():
    cube = tiny_cube()
    dup = cube.assign_coords(time=[cube.time.values[0]] * 2 + [cube.time.values[2]])
    with pytest.raises(TimeAxisError, match="duplicate"):
        validate_cube(dup)


def test_irregular_grid():
    cube = tiny_cube()
    x = cube.x.values.copy()
    x[-1] += 7
    with pytest.raises(GridError, match="x is not a regular grid"):
        validate_cube(cube.assign_coords(x=x))


def test_not_a_dataset():
    with pytest.raises(CubeValidationError, match="xarray.Dataset"):
        validate_cube(tiny_cube().reflectance)  # type: ignore[arg-type]


def test_too_few_dates():
    with pytest.raises(DimensionError, match="at least 3"):
        validate_cube(tiny_cube(n_dates=2), min_dates=3)


def test_validation_of_lazy_cube_does_not_compute(no_compute):
    cube = tiny_cube().chunk({"time": 1})
    validate_cube(cube)  # metadata only: the no_compute scheduler would raise otherwise


def test_sensor_band_table():
    assert [SENSOR_BANDS["LANDSAT_5"][b] for b in BANDS] == ["B1", "B2", "B3", "B4"]
    assert [SENSOR_BANDS["LANDSAT_8"][b] for b in BANDS] == ["B2", "B3", "B4", "B5"]


# ------------------------------------------------------------------------------------------------- stores


def test_cube_opens_with_several_dates_per_chunk_up_to_a_byte_budget(tmp_path, monkeypatch):
    import cmsn_cube.store as store

    scene = synthetic_scene(height=40, width=56, n_dates=7, seed=2)
    path = write_cube(scene, tmp_path / "s.zarr")
    on_disk = open_cube(path, chunks={})
    assert set(on_disk.reflectance.chunks[0]) == {1}, "written one date a chunk"
    # default: every date in one chunk (7 small dates fit), the chunks on disk along y and x
    merged = open_cube(path)
    assert merged.reflectance.chunks[0] == (7,) and merged.cloud_mask.chunks[0] == (7,)
    assert merged.reflectance.chunks[2:] == on_disk.reflectance.chunks[2:]
    # a budget of three dates of reflectance: chunks of three dates, the last one shorter
    per_date = 4 * 40 * 56 * np.dtype(on_disk.reflectance.dtype).itemsize
    monkeypatch.setattr(store, "DATES_CHUNK_BYTES", 3 * per_date + 1)
    assert open_cube(path).reflectance.chunks[0] == (3, 3, 1)
    xr.testing.assert_identical(open_cube(path).reflectance.load(), on_disk.reflectance.load())


def test_zarr_round_trip_keeps_values_crs_attrs_times(tmp_path):
    scene = synthetic_scene(height=40, width=56, seed=5, sensor="LANDSAT_5")
    path = write_cube(scene, tmp_path / "s.zarr")
    reopened = open_cube(path)
    assert reopened.reflectance.chunks is not None, "stores must open lazily"
    xr.testing.assert_identical(
        reopened.reflectance.load().reset_coords(drop=True), scene.reflectance.reset_coords(drop=True)
    )
    np.testing.assert_array_equal(reopened.qa_pixel.values, scene.qa_pixel.values)
    np.testing.assert_array_equal(reopened.cloud_mask.values, scene.cloud_mask.values)
    assert crs_of(reopened) == crs_of(scene)
    np.testing.assert_array_equal(reopened.time.values, scene.time.values)
    assert list(reopened.sensor.values) == ["LANDSAT_5"] * 3
    assert list(reopened.band.values) == list(BANDS)
    for key in ("source", "scale_m", "seed", "requested_cloud_fractions"):
        assert json.dumps(reopened.attrs[key]) == json.dumps(scene.attrs[key])
    assert reopened.reflectance.rio.transform() == scene.reflectance.rio.transform()


def test_write_refuses_to_clobber_and_overwrites_on_request(tmp_path):
    path = write_cube(tiny_cube(), tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="exists"):
        write_cube(tiny_cube(), path)
    replacement = tiny_cube(n_dates=2)
    write_cube(replacement, path, overwrite=True)
    assert open_cube(path).sizes["time"] == 2
    leftovers = [p.name for p in Path(tmp_path).iterdir() if p.name != "s.zarr"]
    assert leftovers == [], f"temporary stores left behind: {leftovers}"


def test_append_dates(tmp_path):
    full = tiny_cube(n_dates=5)
    path = write_cube(full.isel(time=slice(0, 3)), tmp_path / "s.zarr")
    append_cube(full.isel(time=slice(3, 5)), path)
    reopened = open_cube(path)
    assert reopened.sizes["time"] == 5
    xr.testing.assert_equal(
        reopened.reflectance.load().reset_coords(drop=True), full.reflectance.reset_coords(drop=True)
    )
    np.testing.assert_array_equal(reopened.cloud_mask.values, full.cloud_mask.values)


def test_append_rejects_earlier_dates_and_other_grids(tmp_path):
    full = tiny_cube(n_dates=4)
    path = write_cube(full.isel(time=slice(2, 4)), tmp_path / "s.zarr")
    with pytest.raises(TimeAxisError, match="after"):
        append_cube(full.isel(time=slice(0, 1)), path)
    shifted = full.isel(time=slice(3, 4)).assign_coords(x=full.x + 30)
    shifted = set_crs(shifted.assign_coords(time=shifted.time + np.timedelta64(100, "D")), "EPSG:32650")
    with pytest.raises(GridError, match="different grids"):
        append_cube(shifted, path)


def test_interrupted_write_does_not_open_as_complete(tmp_path):
    # simulate a killed writer of this tool: the data went to disk but the completion flag stayed False
    from cmsn_cube.store import COMPLETE_ATTR

    cube = tiny_cube()
    cube.attrs[COMPLETE_ATTR] = False
    cube.to_zarr(tmp_path / "killed.zarr", consolidated=True)
    with pytest.raises(StoreError, match=r"is incomplete: its write by cmsn_cube\.write_cube was interrupted"):
        open_cube(tmp_path / "killed.zarr")


def test_plain_to_zarr_store_opens_and_reconstructs(tmp_path):
    # issue 29 item 4: a store written by plain xarray to_zarr (no cmsn-cube attrs), default chunking
    # (write_empty_chunks off: all-NaN chunks, e.g. a fully masked tile, may be absent), is an input
    from cmsn_cube.inference import reconstruct

    scene = synthetic_scene(height=96, width=96, seed=4)
    scene["reflectance"][0, :, :32, :32] = np.nan  # a masked chunk of fill values zarr does not write
    scene["cloud_mask"][0, :32, :32] = True
    scene = scene.chunk({"time": 1, "band": 4, "y": 32, "x": 32})
    scene.to_zarr(tmp_path / "plain.zarr", consolidated=True)
    assert not (tmp_path / "plain.zarr" / "reflectance" / "c" / "0" / "0" / "0" / "0").exists()
    assert (tmp_path / "plain.zarr" / "reflectance" / "c" / "0" / "0" / "0" / "1").exists()
    cube = open_cube(tmp_path / "plain.zarr")
    assert cube.sizes == {"time": 3, "band": 4, "y": 96, "x": 96}
    assert crs_of(cube).to_epsg() == 32650
    assert np.isnan(cube.reflectance[0, :, :32, :32].values).all()
    np.testing.assert_array_equal(cube.reflectance[1].values, scene.reflectance[1].values)
    options = {"method": "regression", "tile": 64, "overlap": 8, "chunk": 128}
    result = reconstruct(cube, **options).compute()
    assert result.reconstructed.shape == (3, 4, 96, 96)
    # finite wherever some date observes the pixel (flag 2: observed on no date, NaN by design)
    assert np.isfinite(result.reconstructed.values.transpose(1, 0, 2, 3)[:, result.filled.values != 2]).all()
    assert (result.filled.values[0, :32, :32] != 0).all()  # the absent chunk was read as masked, not observed
    in_memory = reconstruct(scene.compute(), **options).compute()
    np.testing.assert_allclose(result.reconstructed.values, in_memory.reconstructed.values, rtol=0, atol=1e-6)


def test_corrupt_and_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        open_cube(tmp_path / "absent.zarr")
    path = Path(write_cube(tiny_cube(), tmp_path / "s.zarr"))
    (path / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match="cannot read"):
        open_cube(path)


def test_in_memory_cube_is_written_without_the_active_cluster(tmp_path):
    from distributed import Client, LocalCluster

    scene = synthetic_scene(height=64, width=64, seed=5)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            write_cube(scene, tmp_path / "s.zarr")
            # nothing was submitted to the cluster: the in-memory data stayed in this process
            assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter) == 0
    reopened = open_cube(tmp_path / "s.zarr").load()
    xr.testing.assert_equal(reopened["reflectance"], scene["reflectance"])


def test_stores_are_written_with_blosc_lz4(scene_store):
    import zarr

    group = zarr.open_group(scene_store, mode="r")
    for name in ("reflectance", "cloud_mask", "qa_pixel"):
        (codec,) = group[name].compressors
        assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "lz4", (name, codec)


def test_a_benchmark_workdir_is_claimed_never_taken(tmp_path):
    from cmsn_cube.testing import claim_workdir

    mine = claim_workdir(tmp_path / "new", "bench_x")  # a new folder is made and marked
    (mine / "cube.zarr").mkdir()
    assert claim_workdir(mine, "bench_x") == mine  # its own folder again: fine
    with pytest.raises(FileExistsError, match="not made by bench_y"):
        claim_workdir(mine, "bench_y")
    users = tmp_path / "users"
    users.mkdir()
    (users / "cube.zarr").mkdir()
    with pytest.raises(FileExistsError, match="not empty"):
        claim_workdir(users, "bench_x")
    assert sorted(p.name for p in users.iterdir()) == ["cube.zarr"]  # nothing written into it
    assert claim_workdir(tmp_path / "empty", "bench_x").is_dir()
