"""Whole-scene reconstruction: laziness, tiling and blending, Dask clusters, region-wise Zarr writes, NDVI."""

from __future__ import annotations

import os

import numpy as np
import psutil
import pytest
import torch
import xarray as xr

from cmsn_cube.cube import date_triplets, make_cube
from cmsn_cube.exceptions import ArgumentError, BandMismatchError, DimensionError, StoreError
from cmsn_cube.inference import AxisTiling, model_channels, model_inputs, reconstruct, write_reconstruction
from cmsn_cube.inference.models import _load_spec
from cmsn_cube.model import CMSN
from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import open_cube, open_store, write_cube


@pytest.fixture(scope="module")
def tiny_model() -> CMSN:
    torch.manual_seed(0)
    return CMSN(width=8, depth=1, fusion_depth=1, skip_width=4).eval()


@pytest.fixture(scope="module")
def scene() -> xr.Dataset:
    return synthetic_scene(height=300, width=270, seed=2)


@pytest.fixture()
def windows_run(monkeypatch) -> list[int]:
    """Counts the windows that go through the model (the real model call, counted)."""
    from cmsn_cube.inference import models

    counts: list[int] = []
    run_model = models._run_model

    def counting(model, windows, device):
        counts.append(windows.shape[0])
        return run_model(model, windows, device)

    monkeypatch.setattr(models, "_run_model", counting)
    return counts


def direct(model: CMSN, cube: xr.Dataset) -> np.ndarray:
    channels, _ = model_inputs(cube)
    with torch.no_grad():
        return model(torch.from_numpy(channels.values[None])).output[0].numpy()


def test_reconstruct_is_lazy(tiny_model, scene_store, no_compute):

    _load_spec.cache_clear()
    result = reconstruct(open_cube(scene_store), model=tiny_model, method="cmsn", tile=64, overlap=8, chunk=64)
    assert result.reconstructed.chunks is not None
    assert _load_spec.cache_info().currsize == 0, "no model may be built before compute"


def test_single_window_equals_model_on_whole_cube(tiny_model):
    cube = synthetic_scene(height=70, width=58, seed=4)
    result = reconstruct(cube, model=tiny_model, method="cmsn", tile=256, fill_unobserved=True).compute()
    np.testing.assert_allclose(result.reconstructed.values, direct(tiny_model, cube), rtol=0, atol=1e-6)


def test_result_does_not_depend_on_chunking(tiny_model, scene):
    small = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=96).compute()
    large = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=1024).compute()
    assert small.reconstructed.shape == scene.reflectance.shape
    np.testing.assert_allclose(small.reconstructed.values, large.reconstructed.values, rtol=0, atol=1e-5)


def blended_in_one_pass(model: CMSN, cube: xr.Dataset, *, tile: int, overlap: int) -> np.ndarray:
    """The reference: every tile of the global grid run on the whole mirrored scene at once, blended, divided."""
    tilings = [AxisTiling.plan(cube.sizes[d], tile=tile, overlap=overlap, chunk=10**9) for d in ("y", "x")]
    rows, cols = (t.block_source(0) for t in tilings)
    channels, to_fill = model_inputs(cube)
    channels = channels.values[:, :, rows][..., cols]
    sums = np.zeros((channels.shape[0], 4, rows.size, cols.size))
    weights = np.zeros((rows.size, cols.size))
    blend = np.outer(tilings[0].weights(), tilings[1].weights())
    for y in tilings[0].starts:
        for x in tilings[1].starts:
            with torch.no_grad():
                window = torch.from_numpy(channels[None, :, :, y : y + tile, x : x + tile])
                sums[..., y : y + tile, x : x + tile] += model(window).output[0].numpy() * blend
            weights[y : y + tile, x : x + tile] += blend
    blended = (sums / weights)[..., : cube.sizes["y"], : cube.sizes["x"]]
    return np.where(to_fill.values[:, None], blended, cube.reflectance.values)


@pytest.mark.parametrize("chunk", [96, 160])
def test_blocks_give_the_one_pass_blend(tiny_model, chunk):
    # 245 = 3 * 80 + 5 rows and 250 = 3 * 80 + 10 columns: the last blocks are shorter than the overlap and
    # hold no tile of their own, only what the tiles before them spill over
    cube = synthetic_scene(height=245, width=250, seed=9)
    result = reconstruct(
        cube, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=chunk, fill_unobserved=True
    ).compute()
    expected = blended_in_one_pass(tiny_model, cube, tile=96, overlap=16)
    np.testing.assert_allclose(result.reconstructed.values, expected, rtol=0, atol=1e-5)


def test_model_channels_zero_gaps_and_refuse_wrong_shapes():
    reflectance = np.full((3, 4, 5, 6), 0.2, dtype="float32")
    reflectance[2, 1, 0, 0] = np.nan  # no data in one band: filled like a cloud
    cloud_mask = np.zeros((3, 5, 6), dtype=bool)
    cloud_mask[0, 4, 5] = True
    channels, to_fill = model_channels(reflectance, cloud_mask)
    assert channels.shape == (3, 5, 5, 6) and channels.dtype == np.float32
    assert to_fill[0, 4, 5] and to_fill[2, 0, 0] and to_fill.sum() == 2
    assert (channels[0, :4, 4, 5] == 0).all() and (channels[2, :4, 0, 0] == 0).all()
    np.testing.assert_array_equal(channels[:, 4], to_fill.astype("float32"))
    with pytest.raises(BandMismatchError, match="4 bands"):
        model_channels(reflectance[:, :3], cloud_mask)
    with pytest.raises(DimensionError, match="cloud_mask"):
        model_channels(reflectance, cloud_mask[:, :4])


def test_store_chunks_of_any_size_give_the_in_memory_result(tiny_model, scene, tmp_path):
    # 64 px chunks on disk, 80 px strides: blocks start mid-chunk and read their overlap from the chunk before
    store = write_cube(scene, tmp_path / "small-chunks.zarr", chunks={"time": 1, "y": 64, "x": 64})
    lazy = reconstruct(open_cube(store), model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=160)
    in_memory = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=160).compute()
    xr.testing.assert_allclose(lazy.compute(), in_memory, rtol=0, atol=1e-6)


def test_chunk_is_rounded_down_to_whole_strides_and_dtypes_hold(tiny_model, scene):
    result = reconstruct(
        scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=200
    )  # stride 80: blocks of 160
    # along y a chunk is one row of tiles, along x a block
    assert result.chunks["y"] == (80, 80, 80, 60) and result.chunks["x"] == (160, 110)
    computed = result.compute()
    for name in result.data_vars:
        assert computed[name].dtype == result[name].dtype, name
    assert computed.filled.dtype == np.uint8 and computed.reconstructed.dtype == np.float32


def test_tiles_with_nothing_to_fill_are_not_run(tiny_model, scene, windows_run):
    mask = np.zeros(scene.cloud_mask.shape, dtype=bool)
    mask[1, 100:121, 100:131] = True  # one cloud, inside tile 1 along both axes (tile k: [80k, 80k + 96))
    cube = scene.assign(cloud_mask=(scene.cloud_mask.dims, mask))
    result = reconstruct(cube, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=160).compute()
    assert sum(windows_run) == 1
    # the cloud gets the same values when far-away tiles run too
    mask[0, 280:, 250:] = True
    windows_run.clear()
    busier = reconstruct(
        cube.assign(cloud_mask=(scene.cloud_mask.dims, mask)),
        model=tiny_model,
        method="cmsn",
        tile=96,
        overlap=16,
        chunk=160,
    ).compute()
    assert sum(windows_run) > 1
    cloud = (1, slice(None), slice(100, 121), slice(100, 131))
    np.testing.assert_array_equal(result.reconstructed.values[cloud], busier.reconstructed.values[cloud])
    observed = scene.reflectance.values
    assert not np.array_equal(result.reconstructed.values[cloud], observed[cloud]), "the cloud must be filled"
    np.testing.assert_array_equal(result.reconstructed.values[0], observed[0])


def test_clear_pixels_untouched_and_every_gap_filled(tiny_model, scene):
    result = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=128).compute()
    clear = result.filled.values == 0
    observed = scene.reflectance.values.transpose(1, 0, 2, 3)
    reconstructed = result.reconstructed.values.transpose(1, 0, 2, 3)
    assert np.array_equal(observed[:, clear], reconstructed[:, clear]), "clear pixels must be bit-identical"
    # every gap that another date observed is filled; the others are NaN and flagged, never invented
    seen_elsewhere = (~scene.cloud_mask.values).any(axis=0)
    assert np.isfinite(reconstructed[:, :, seen_elsewhere]).all()
    np.testing.assert_array_equal(result.filled.values > 0, scene.cloud_mask.values)
    np.testing.assert_array_equal(result.filled.values == 2, scene.cloud_mask.values & ~seen_elsewhere)
    assert (~seen_elsewhere).any() and np.isnan(reconstructed[:, :, ~seen_elsewhere]).all()
    np.testing.assert_array_equal(result.observed_dates.values, (~scene.cloud_mask.values).sum(axis=0))


def test_no_seam_at_tile_borders(tiny_model):
    # fully cloudy date 2: every pixel there comes from the network, so seams would show
    cube = synthetic_scene(height=256, width=256, seed=6)
    mask = cube.cloud_mask.values.copy()
    mask[1] = True
    cube["cloud_mask"] = (cube.cloud_mask.dims, mask)
    tile, overlap = 64, 16
    result = reconstruct(
        cube, model=tiny_model, method="cmsn", tile=tile, overlap=overlap, chunk=128, fill_unobserved=True
    ).compute()
    image = result.reconstructed.values[1].astype("float64")
    steps = np.abs(np.diff(image, axis=-1)).mean(axis=(0, 1))  # mean step between columns c and c+1
    tiling = AxisTiling.plan(256, tile=tile, overlap=overlap, chunk=128)
    # the columns where a tile begins or ends, in scene coordinates
    borders = sorted({int(s + e) for s in tiling.starts for e in (0, tile)} & set(range(1, 255)))
    at_borders = steps[[b - 1 for b in borders]].mean()
    inside = np.delete(steps, [b - 1 for b in borders]).mean()
    assert at_borders <= 1.25 * inside, (at_borders, inside)
    # and without blending there would be a seam: tiles run alone differ where they meet
    hard = reconstruct(
        cube, model=tiny_model, method="cmsn", tile=tile, overlap=0, chunk=128, fill_unobserved=True
    ).compute()
    assert not np.allclose(hard.reconstructed.values[1], result.reconstructed.values[1])


def test_more_dates_use_nearest_neighbours(tiny_model):
    days = np.array(["2020-01-01", "2020-01-17", "2020-02-02", "2020-06-01", "2020-06-17"], dtype="datetime64[D]")
    assert date_triplets(days) == [(0, 1, 2), (0, 1, 2), (0, 1, 2), (2, 3, 4), (2, 3, 4)]
    cube = synthetic_scene(height=48, width=48, n_dates=5, seed=8)
    result = reconstruct(cube, model=tiny_model, method="cmsn", fill_unobserved=True).compute()
    first = direct(tiny_model, cube.isel(time=[2, 3, 4]))
    # gaps its triplet never observed but dates 0 or 1 did come from the series (flag 5), the rest from the network
    gaps = model_inputs(cube)[1].values
    from_series = gaps[[2, 3, 4]].all(axis=0) & ~gaps[[0, 1]].all(axis=0)
    assert from_series.any()
    np.testing.assert_array_equal(result.filled.values[3] == 5, from_series)
    np.testing.assert_allclose(result.reconstructed.values[3][:, ~from_series], first[1][:, ~from_series], atol=1e-6)


@pytest.mark.parametrize("method", ["cmsn", "weighted-regression"])
def test_triplets_run_only_where_their_dates_have_gaps_and_change_nothing(tiny_model, windows_run, monkeypatch, method):
    from cmsn_cube.inference import tiling

    # 8 dates, clouds on two of them only, in different tiles: the other dates' triplets have nothing to fill
    cube = synthetic_scene(height=160, width=160, n_dates=8, seed=5)
    mask = np.zeros(cube.cloud_mask.shape, dtype=bool)
    mask[2, 10:40, 20:60] = True
    mask[6, 110:150, 100:140] = True
    cube = cube.assign(cloud_mask=(cube.cloud_mask.dims, mask))
    options = {"model": tiny_model, "method": method, "tile": 96, "overlap": 16, "chunk": 160}
    skipped = reconstruct(cube, **options).compute()
    runs_skipping = len(windows_run)
    windows_run.clear()
    monkeypatch.setattr(tiling, "SKIP_CLEAR_DATES", False)
    every = reconstruct(cube, **options).compute()
    assert len(windows_run) > runs_skipping
    for name in ("reconstructed", "filled", "ndvi"):
        np.testing.assert_array_equal(skipped[name].values, every[name].values, err_msg=name)


def test_no_data_stripes_are_flagged_apart_from_clouds(tiny_model):
    from cmsn_cube.inference import FILLED, NO_DATA_FILLED, OBSERVED

    cube = synthetic_scene(height=64, width=64, seed=4)
    reflectance = cube.reflectance.values.copy()
    reflectance[1, :, :, 30:33] = np.nan  # an SLC-off-like stripe on date 1
    mask = np.zeros(cube.cloud_mask.shape, dtype=bool)
    mask[1, 5:15, 5:15] = True
    cube = cube.assign(reflectance=(cube.reflectance.dims, reflectance), cloud_mask=(cube.cloud_mask.dims, mask))
    flags = reconstruct(cube, model=tiny_model, method="cmsn").filled.values
    assert (flags[1][:, 30:33] == NO_DATA_FILLED).all()
    assert (flags[1][5:15, 5:15] == FILLED).all()
    assert (flags[[0, 2]] == OBSERVED).all()


def test_ndvi_of_known_cube(tiny_model):
    reflectance = np.full((3, 4, 16, 16), 0.1, dtype="float32")
    reflectance[:, 3] = 0.4  # NIR 0.4, red 0.1: NDVI = 0.3 / 0.5 = 0.6
    reflectance[:, 2, 0, 0] = 0.0
    reflectance[:, 3, 0, 0] = 0.0  # red + NIR = 0: NaN
    cube = make_cube(
        reflectance,
        time=["2020-01-01", "2020-01-17", "2020-02-02"],
        y=np.arange(16.0)[::-1] * 30,
        x=np.arange(16.0) * 30,
        crs="EPSG:32650",
        sensor="LANDSAT_8",
        cloud_mask=np.zeros((3, 16, 16), dtype=bool),
    )
    result = reconstruct(cube, model=tiny_model, method="cmsn").compute()
    assert result.ndvi.values[0, 5, 5] == pytest.approx(0.6, abs=1e-6)
    assert np.isnan(result.ndvi.values[0, 0, 0])
    assert np.nanmax(np.abs(result.ndvi.values)) <= 1


def test_two_dates_or_other_bands_are_refused(tiny_model, small_scene):
    with pytest.raises(DimensionError, match="at least 3"):
        reconstruct(small_scene.isel(time=[0, 1]), model=tiny_model, method="cmsn")
    with pytest.raises(BandMismatchError, match="B2"):
        reconstruct(small_scene.assign_coords(band=["B2", "B3", "B4", "B5"]), model=tiny_model, method="cmsn")
    with pytest.raises(ArgumentError, match="less than half a tile"):
        reconstruct(small_scene, model=tiny_model, method="cmsn", tile=64, overlap=32)
    with pytest.raises(ArgumentError, match="at least one tile"):
        reconstruct(small_scene, model=tiny_model, method="cmsn", tile=64, overlap=8, chunk=48)


def test_region_writes_resume_and_match_memory(tiny_model, scene, tmp_path):
    result = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=128)
    path = str(tmp_path / "out.zarr")
    write_reconstruction(result, path, max_regions=2, progress=False)  # a job stopped after two regions
    with pytest.raises(StoreError, match="incomplete"):
        open_store(path)
    done_first = sorted(os.listdir(os.path.join(path, "_cmsn_regions")))
    assert len(done_first) == 2
    write_reconstruction(result, path, progress=False)  # resumes: the other regions
    reopened = open_store(path)
    expected = result.compute()
    xr.testing.assert_allclose(reopened.reconstructed.load(), expected.reconstructed, rtol=0, atol=0)
    xr.testing.assert_equal(reopened.filled.load(), expected.filled)
    xr.testing.assert_allclose(reopened.ndvi.load(), expected.ndvi, rtol=0, atol=0)
    assert reopened.rio.crs == scene.rio.crs
    assert reopened.attrs["model_sha256"] == expected.attrs["model_sha256"]
    assert "lz4" in str(reopened.reconstructed.encoding["compressors"]), reopened.reconstructed.encoding


def test_a_store_with_per_date_coordinates_is_written(tiny_model, scene, tmp_path):
    # what Earth Engine and STAC pulls store: per-date coordinates, which reopen in chunks of one date
    per_date = scene.assign_coords(
        cloud_fraction=("time", [0.1, 0.2, 0.3]), slc_off=("time", [False, True, False]), sensor=("time", ["L8"] * 3)
    )
    write_cube(per_date, tmp_path / "pulled.zarr")
    cube = open_cube(tmp_path / "pulled.zarr")
    result = reconstruct(cube, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=128)
    write_reconstruction(result, str(tmp_path / "out.zarr"), progress=False)
    written = open_store(str(tmp_path / "out.zarr"))
    np.testing.assert_array_equal(written.reconstructed.values, result.reconstructed.values)


def test_a_store_cut_into_other_chunks_is_rewritten_not_resumed(tiny_model, scene, tmp_path):
    # the same model and grid, but blocks of 80 px then 240 px along x: the region markers of the first run
    # name other regions of the second, which is refused, then starts afresh with overwrite, never skips them
    path = str(tmp_path / "out.zarr")
    first = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=128)
    write_reconstruction(first, path, max_regions=2, progress=False)
    second = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=256)
    with pytest.raises(StoreError, match="another chunks, tiling"):
        write_reconstruction(second, path, progress=False)
    write_reconstruction(second, path, progress=False, overwrite=True)
    reopened = open_store(path)
    xr.testing.assert_allclose(reopened.reconstructed.load(), second.reconstructed.compute(), rtol=0, atol=0)
    assert reopened.reconstructed.encoding["chunks"][-1] == 240


def test_region_writes_run_every_tile_and_block_once(tiny_model, scene, tmp_path, windows_run, monkeypatch):
    from cmsn_cube.inference import tiling

    finished: list[int] = []
    finish_block = tiling.finish_block
    monkeypatch.setattr(tiling, "finish_block", lambda *a, **k: finished.append(1) or finish_block(*a, **k))
    tilings = [AxisTiling.plan(n, tile=96, overlap=16, chunk=128) for n in (scene.sizes["y"], scene.sizes["x"])]
    result = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=128)
    write_reconstruction(result, str(tmp_path / "out.zarr"), progress=False)
    # one triplet for three dates: each global tile once, although neighbouring regions share tiles
    assert sum(windows_run) == tilings[0].n_tiles * tilings[1].n_tiles
    # and each block finished once for its four variables
    assert len(finished) == tilings[0].n_blocks * tilings[1].n_blocks


def test_writes_stream_through_a_client_running_every_tile_once(tiny_model, scene, tmp_path, windows_run):
    # in-process workers, so that the model calls are counted; 16 regions go through a window of 4 in flight,
    # so most strips cross from one submission to a later one
    from distributed import Client, LocalCluster

    tilings = [AxisTiling.plan(n, tile=96, overlap=16, chunk=128) for n in (scene.sizes["y"], scene.sizes["x"])]
    result = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=128)
    path = str(tmp_path / "streamed.zarr")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster):
            write_reconstruction(result, path, progress=False)
    assert sum(windows_run) == tilings[0].n_tiles * tilings[1].n_tiles
    expected = result.compute(scheduler="threads")
    xr.testing.assert_allclose(open_store(path).reconstructed.load(), expected.reconstructed, rtol=0, atol=0)


def test_a_streamed_write_hands_the_scheduler_the_model_once(tiny_model, scene, tmp_path, monkeypatch):
    # every region needs the model's weights: they go with the first graph and are kept, not sent per region
    from distributed import Client, LocalCluster

    from cmsn_cube.inference.models import ModelSpec

    graphs: list[dict] = []
    get = Client.get
    monkeypatch.setattr(Client, "get", lambda self, dsk, keys, **kw: graphs.append(dsk) or get(self, dsk, keys, **kw))
    result = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=128)
    path = str(tmp_path / "streamed.zarr")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster):
            write_reconstruction(result, path, progress=False)
    regions = [g for g in graphs if isinstance(g, dict)]  # the streamer's own graphs (compute hands an expression)
    with_model = [g for g in regions if any(isinstance(getattr(n, "value", n), ModelSpec) for n in g.values())]
    assert len(regions) > 10 and len(with_model) == 1
    expected = result.compute(scheduler="threads")
    xr.testing.assert_allclose(open_store(path).reconstructed.load(), expected.reconstructed, rtol=0, atol=0)


def test_a_model_spec_is_tokenized_by_its_digest():
    # Dask hashes every literal of a graph it is handed: the digest stands for the ~1 MB of weights
    from dask.base import tokenize

    from cmsn_cube.inference.models import ModelSpec

    spec = ModelSpec("m", sha256="a" * 64, payload=b"weights")
    assert tokenize(spec) == tokenize(ModelSpec("m", sha256="a" * 64, payload=b"other bytes, same digest"))
    assert tokenize(spec) != tokenize(ModelSpec("m", sha256="b" * 64, payload=b"weights"))


def test_a_streamed_write_runs_the_self_check_and_every_tile_once(
    tiny_model, scene, tmp_path, windows_run, monkeypatch
):
    # the pre-pass computes the self-check's choice: the regions streamed through a client must take it, not run
    # the check again
    from distributed import Client, LocalCluster

    from cmsn_cube import selfcheck

    samples: list[int] = []
    check_sample = selfcheck.check_sample
    monkeypatch.setattr(selfcheck, "check_sample", lambda *a, **k: samples.append(1) or check_sample(*a, **k))
    result = reconstruct(scene, model=tiny_model, tile=96, overlap=16, chunk=128)  # the self-check picks
    expected = result.compute(scheduler="threads")
    once = {"samples": len(samples), "windows": sum(windows_run)}
    assert once["samples"] > 0 and once["windows"] > 0
    samples.clear()
    windows_run.clear()
    path = str(tmp_path / "streamed.zarr")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster):
            write_reconstruction(result, path, progress=False)
    assert {"samples": len(samples), "windows": sum(windows_run)} == once
    written = open_store(path)
    xr.testing.assert_equal(written.method_used.load(), expected.method_used)
    xr.testing.assert_allclose(written.reconstructed.load(), expected.reconstructed, rtol=0, atol=0)


@pytest.mark.slow
def test_local_cluster_equals_threaded_scheduler(tiny_model, scene, tmp_path):
    from cmsn_cube.cluster import get_client

    threaded = reconstruct(scene, model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=128).compute(
        scheduler="threads"
    )
    store = write_cube(scene, tmp_path / "scene.zarr")
    from cmsn_cube.store import open_cube

    with get_client(workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        env = client.run(lambda: os.environ.get("GLIBC_TUNABLES", ""))
        assert all("mmap_max=0" in value for value in env.values()), "workers need the allocator settings"
        profiling = client.run(lambda: __import__("dask").config.get("distributed.worker.profile.enabled"))
        assert not any(profiling.values()), "the workers' profiler takes the GIL from the model every 10 ms"
        distributed = reconstruct(
            open_cube(store), model=tiny_model, method="cmsn", tile=96, overlap=16, chunk=128
        ).compute()
        workers = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
    np.testing.assert_allclose(distributed.reconstructed.values, threaded.reconstructed.values, rtol=0, atol=1e-6)
    # closing the client closes its LocalCluster: no worker process outlives the ``with`` block
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"worker processes still running: {alive}"


def test_worker_environment_carries_the_worker_config():
    from cmsn_cube.cluster import worker_environment

    quiet = worker_environment(2)
    assert quiet["OMP_NUM_THREADS"] == "2" and "mmap_max=0" in quiet["GLIBC_TUNABLES"]
    assert quiet["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] == "False"
    assert quiet["DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL"] == "1s"
    assert not any(name.startswith("DASK_") for name in worker_environment(worker_config={}))


@pytest.mark.parametrize("fill_unobserved", [False, True])
def test_a_gap_its_triplet_never_observed_is_filled_from_the_series(fill_unobserved):
    """Dates 0-2 (date 0's triplet) cloudy over one patch that date 4 observed: filled from date 4, flagged 5.

    The filler here sees the triplet (the weighted regression, as the network); the classical regression sees
    the whole series itself (flagged 1: its own context).
    """
    from cmsn_cube.inference import FILLED, INVENTED, SERIES_FILLED, UNOBSERVED

    scene = synthetic_scene(height=96, width=96, n_dates=5, seed=11)
    scene["cloud_mask"][:] = False
    scene["cloud_mask"][:3, 30:50, 40:70] = True  # date 0's triplet is (0, 1, 2): none of them sees the patch
    scene["cloud_mask"][3, 30:50, 40:70] = True
    scene["cloud_mask"][4, 0:10, 0:10] = True  # date 4's own gap: somewhere else
    scene["cloud_mask"][:, 80:90, 80:90] = True  # observed on no date at all
    options = {"fill_unobserved": fill_unobserved, "tile": 64, "overlap": 8}
    result = reconstruct(scene, method="weighted-regression", **options).compute()
    patch = (slice(30, 50), slice(40, 70))
    assert (result.filled.values[0][patch] == SERIES_FILLED).all()
    assert np.isfinite(result.uncertainty.values[0][(slice(None), *patch)]).all()
    own = reconstruct(scene, method="regression", **options).compute()
    assert (own.filled.values[0][patch] == FILLED).all()
    from cmsn_cube.baselines import regression as whole_scene

    expected_own = whole_scene(scene).isel(time=0).values[(slice(None), *patch)]
    assert np.abs(own.reconstructed.values[0][(slice(None), *patch)] - expected_own).mean() < 0.01
    # the classical regression from date 4, as baselines.regression fills it over the whole scene
    from cmsn_cube.baselines import regression

    filled = result.reconstructed.isel(time=0).values[(slice(None), *patch)]
    expected = regression(scene).isel(time=0).values[(slice(None), *patch)]
    assert np.isfinite(filled).all() and np.abs(filled - expected).mean() < 0.01  # fits see one block, not the scene
    nowhere = result.filled.values[:, 80:90, 80:90]
    assert (nowhere == (INVENTED if fill_unobserved else UNOBSERVED)).all()
    assert np.isnan(result.reconstructed.values[:, :, 80:90, 80:90]).all() != fill_unobserved
