"""Three-date samples: truth is cloud-free, simulated cloud levels, split, skipping, workers, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmsn_cube.cube import date_triplets
from cmsn_cube.exceptions import DimensionError, NoDataError
from cmsn_cube.samples import TripletWindowDataset, split_rows, window_origins
from cmsn_cube.store import open_cube
from cmsn_cube.testing import shared_data_path, tiny_scene, tiny_store
from cmsn_cube.training.loaders import make_dataloaders

LEVELS = (0.25, 0.15, 0.10)
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def light_store(tmp_path_factory) -> str:
    """128 x 128 scene with few real clouds, so every date needs pasted clouds to reach its level."""
    return tiny_store(
        tmp_path_factory.mktemp("samples") / "light.zarr", size=128, seed=5, cloud_fractions=(0.06, 0.03, 0.0)
    )


@pytest.fixture(scope="module")
def dataset(light_store) -> TripletWindowDataset:
    return TripletWindowDataset(light_store, size=64, overlap=16, seed=1)


def _window_of(ds: TripletWindowDataset, index: int, name: str) -> np.ndarray:
    triplet, y0, x0 = ds.windows[index]
    return ds.cube[name].isel(time=list(triplet), y=slice(y0, y0 + ds.size), x=slice(x0, x0 + ds.size)).values


def test_item_contract(dataset):
    item = dataset[0]
    assert set(item) == {"inputs", "truth", "truth_valid", "sim_mask"}
    assert item["inputs"].shape == (3, 5, 64, 64) and item["inputs"].dtype == torch.float32
    assert item["truth"].shape == (3, 4, 64, 64) and item["truth"].dtype == torch.float32
    assert item["truth_valid"].shape == (3, 64, 64) and item["truth_valid"].dtype == torch.bool
    assert item["sim_mask"].shape == (3, 64, 64) and item["sim_mask"].dtype == torch.bool


def test_truth_is_cloud_free_and_inputs_hide_every_masked_pixel(dataset):
    for index in range(len(dataset)):
        item = {k: v.numpy() for k, v in dataset[index].items()}
        cloud = _window_of(dataset, index, "cloud_mask")
        observed = _window_of(dataset, index, "reflectance")
        valid = item["truth_valid"]
        assert not (valid & cloud).any(), "truth_valid includes a real cloud pixel"
        np.testing.assert_array_equal(
            item["truth"].transpose(1, 0, 2, 3)[:, valid], np.clip(observed, 0, 1).transpose(1, 0, 2, 3)[:, valid]
        )
        assert (item["truth"].transpose(1, 0, 2, 3)[:, ~valid] == 0).all()
        mask = item["inputs"][:, 4].astype(bool)
        assert (mask == (cloud | item["sim_mask"])).all()
        assert (item["inputs"][:, :4].transpose(1, 0, 2, 3)[:, mask] == 0).all()
        assert not (item["sim_mask"] & ~valid).any(), "a pasted pixel without truth"
        for value in item.values():
            assert np.isfinite(value.astype(np.float32)).all()


def test_simulated_cloud_fraction_reaches_each_level(dataset):
    reached = 0
    for index in range(len(dataset)):
        item = dataset[index]
        cloud = _window_of(dataset, index, "cloud_mask")
        total = item["inputs"][:, 4].float().mean((1, 2)).numpy()
        for j, level in enumerate(LEVELS):
            if cloud[j].mean() <= level:  # the real clouds allow the level
                assert abs(total[j] - level) <= TOLERANCE, (index, j, total[j])
                reached += 1
    assert reached >= len(dataset) * 2


def test_items_are_deterministic_per_seed_and_epoch(light_store, dataset):
    again = TripletWindowDataset(light_store, size=64, overlap=16, seed=1)
    other = TripletWindowDataset(light_store, size=64, overlap=16, seed=2)
    a, b, c = dataset[3], again[3], other[3]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["sim_mask"], c["sim_mask"])
    again.set_epoch(1)
    assert not torch.equal(again[3]["sim_mask"], a["sim_mask"])


def test_truth_from_the_cube_variable(light_store):
    ds = TripletWindowDataset(light_store, size=64, overlap=0, truth="cube", seed=0)
    item = ds[1]
    reference = np.clip(_window_of(ds, 1, "truth"), 0, 1)
    assert item["truth_valid"].all()
    np.testing.assert_array_equal(item["truth"].numpy(), reference)


def test_window_origins_cover_the_edges():
    origins = window_origins(100, 70, size=32, overlap=8)
    covered = np.zeros((100, 70), dtype=bool)
    for y0, x0 in origins:
        covered[y0 : y0 + 32, x0 : x0 + 32] = True
    assert covered.all()
    assert max(y for y, _ in origins) + 32 == 100 and max(x for _, x in origins) + 32 == 70
    with pytest.raises(DimensionError):
        window_origins(20, 70, size=32)


def test_spatial_split_has_no_overlap(light_store):
    train, validation = make_dataloaders(light_store, size=32, overlap=8, val_fraction=0.25, gap=8, batch_size=4)
    train_pixels, val_pixels = set(), set()
    for loader, pixels in ((train, train_pixels), (validation, val_pixels)):
        for _, y0, x0 in loader.dataset.windows:
            pixels.update((y, x) for y in range(y0, y0 + 32) for x in range(x0, x0 + 32))
    assert train_pixels and val_pixels and not (train_pixels & val_pixels)
    last_train_row = max(y for y, _ in train_pixels)
    assert min(y for y, _ in val_pixels) - last_train_row > 8
    assert split_rows(128, size=32, val_fraction=0.25, gap=8) == ((0, 88), (96, 128))


def test_nan_window_is_skipped_not_zero_filled(tmp_path):
    cube = tiny_scene(size=96, seed=2, cloud_fractions=(0.05, 0.05, 0.05))
    reflectance = cube["reflectance"].values.copy()
    reflectance[:, :, :48, :48] = np.nan  # the whole upper-left window, every date
    cube["reflectance"] = (cube["reflectance"].dims, reflectance)
    cloud = cube["cloud_mask"].values.copy()
    cloud[:, 48:, 48:] = True  # the lower-right window: all cloud, nothing to score
    cube["cloud_mask"] = (cube["cloud_mask"].dims, cloud)
    store = tiny_store(tmp_path / "holes.zarr", cube)
    ds = TripletWindowDataset(store, size=48, overlap=0)
    kept = {(y0, x0) for _, y0, x0 in ds.windows}
    assert (0, 0) not in kept and (48, 48) not in kept
    assert ds.skipped == {"nodata": 1, "no_clear": 1}
    assert "skipped 1 mostly no data" in ds.summary()
    for index in range(len(ds)):
        assert all(torch.isfinite(v.float()).all() for v in ds[index].values())
    cube["reflectance"] = cube["reflectance"] * np.nan
    with pytest.raises(NoDataError):
        TripletWindowDataset(tiny_store(tmp_path / "empty.zarr", cube), size=48)


def test_dataloader_with_two_workers_matches_the_items(light_store, dataset):
    train, _ = make_dataloaders(
        light_store, size=64, overlap=16, val_fraction=0.5, gap=0, batch_size=2, num_workers=2, seed=1
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batch = next(iter(loader))
    expected = [dataset[0], dataset[1]]
    for key in batch:
        assert torch.equal(batch[key], torch.stack([e[key] for e in expected]))
    n = sum(b["inputs"].shape[0] for b in train)
    assert n == len(train.dataset) > 0


def test_date_triplets_use_the_nearest_dates():
    times = np.array(["2020-01-01", "2020-01-17", "2020-02-02", "2020-04-01", "2020-04-17"], dtype="datetime64[D]")
    assert date_triplets(times) == [(0, 1, 2), (0, 1, 2), (0, 1, 2), (2, 3, 4), (2, 3, 4)]
    with pytest.raises(DimensionError):
        date_triplets(times[:2])


@pytest.mark.skipif(
    shared_data_path("cbers_timeseries") is None, reason="shared data (../shared/data or $CMSN_SHARED_DATA) absent"
)
def test_samples_from_the_real_cbers_series(tmp_path):
    from cmsn_cube.sources.cbers import open_cbers_series

    cube = open_cbers_series(shared_data_path("cbers_timeseries")).isel(time=slice(3, 9))
    store = tiny_store(tmp_path / "cbers.zarr", cube, chunk=25)
    ds = TripletWindowDataset(store, size=32, overlap=8, seed=0)
    assert len(ds.triplets) >= 2
    opened = open_cube(store)
    for index in range(0, len(ds), 3):
        item = ds[index]
        cloud = _window_of(ds, index, "cloud_mask")
        assert not (item["truth_valid"].numpy() & cloud).any()
        total = item["inputs"][:, 4].float().mean((1, 2)).numpy()
        for j, level in enumerate(LEVELS):
            if cloud[j].mean() <= level:
                assert abs(total[j] - level) <= TOLERANCE
    assert opened.sizes["time"] == 6
