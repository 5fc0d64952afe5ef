"""Adaptation to one scene (`cmsn_cube.adapt.fit`, ``ds.cmsn.fit``, ``cmsn-cube fit``) with tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cmsn_cube.accessor  # noqa: F401 - registers ds.cmsn
from cmsn_cube import adapt
from cmsn_cube.cli import main
from cmsn_cube.exceptions import DimensionError, NoDataError
from cmsn_cube.model import CMSN
from cmsn_cube.model.checkpoint import file_sha256, load_model, model_card, save_checkpoint
from cmsn_cube.samples import TripletWindowDataset
from cmsn_cube.store import write_cube

#: a few real steps, two validation rounds: the whole file stays well under a minute on 2 cores
FAST = {"steps": 4, "validate_every": 2, "patch_size": 32, "batch_size": 2, "progress": False}


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "tiny.pt", CMSN(width=8, depth=1, skip_width=4))


def test_fit_never_sees_the_validation_block(scene_store, small_scene, tiny_checkpoint, tmp_path, monkeypatch):
    reads: list[tuple[int, np.ndarray]] = []
    loaders = {}
    original_read = TripletWindowDataset._read

    def spy_read(self, triplet, y0, x0, names):
        reads.append((self.seed, np.asarray(self.cube["y"].values[y0 : y0 + self.size])))
        return original_read(self, triplet, y0, x0, names)

    import cmsn_cube.train as train_module

    def spy_train(model, train_loader, val_loader, **options):
        loaders["train"], loaders["val"] = train_loader, val_loader
        return real_train(model, train_loader, val_loader, **options)

    real_train = train_module.train
    monkeypatch.setattr(TripletWindowDataset, "_read", spy_read)
    monkeypatch.setattr(train_module, "train", spy_train)  # fit imports train when called: it gets the spy

    result = adapt.fit(scene_store, model=tiny_checkpoint, seed=5, out=tmp_path / "fit.pt", **FAST)
    split = result.card["split"]
    (train_first, train_stop), (val_first, val_stop) = split["train_rows"], split["validation_rows"]
    assert train_first == 0 and train_stop < val_first and val_stop == small_scene.sizes["y"]
    validation_y = set(small_scene["y"].values[val_first:val_stop].tolist())

    train_set = loaders["train"].loader.datasets[0]  # Rounds of an EpochLoader over one dataset
    size = train_set.size
    # window origins: every training window ends before the validation block starts
    assert train_set.windows and all(y0 + size <= train_stop for _, y0, _ in train_set.windows)
    # the training sampler is built on a crop: the validation rows are not even in its cube
    assert not validation_y & set(train_set.cube["y"].values.tolist())
    # and no read it made (windows and borrowed cloud shapes) touched a validation row
    train_reads = [y for seed, y in reads if seed == 5]
    assert train_reads and not any(validation_y & set(y.tolist()) for y in train_reads)
    val_reads = [y for seed, y in reads if seed == 6]
    assert val_reads and all(set(y.tolist()) <= validation_y for y in val_reads)
    assert result.steps == FAST["steps"]


def test_fitted_checkpoint_round_trips_and_names_its_source(scene_store, tiny_checkpoint, tmp_path):
    source_sha = file_sha256(tiny_checkpoint)
    result = adapt.fit(scene_store, model=tiny_checkpoint, out=tmp_path / "fitted.pt", **FAST)

    assert result.checkpoint == tmp_path / "fitted.pt"
    loaded = load_model(result.checkpoint)
    inputs = torch.rand(1, 3, 5, 40, 40)
    inputs[:, :, 4] = (inputs[:, :, 4] > 0.7).float()
    with torch.inference_mode():
        assert torch.equal(loaded(inputs).output, result.model.cpu()(inputs).output)

    card = model_card(result.checkpoint)
    assert card["adaptation"]["source"]["path"] == str(tiny_checkpoint.resolve())
    assert card["adaptation"]["source"]["sha256"] == source_sha
    assert card["adaptation"]["cube"]["name"] == scene_store
    assert card["adaptation"]["steps"] == result.steps
    validation = card["adaptation"]["validation"]
    assert (
        validation["before"]["psnr_cloudy"] > 0
        and validation["after"]["psnr_cloudy"] >= validation["before"]["psnr_cloudy"]
    )
    assert file_sha256(tiny_checkpoint) == source_sha  # the source was copied, never changed
    assert json.loads((tmp_path / "fitted.json").read_text())["sha256"] == file_sha256(result.checkpoint)


def test_fit_without_clear_pixels_raises(small_scene, tiny_checkpoint, tmp_path):
    overcast = small_scene.assign(cloud_mask=small_scene["cloud_mask"] | True)
    store = write_cube(overcast, tmp_path / "overcast.zarr")
    with pytest.raises(NoDataError, match="no clear pixel"):
        adapt.fit(store, model=tiny_checkpoint, **FAST)


def test_fit_on_a_too_small_cube_raises(small_scene, tiny_checkpoint):
    with pytest.raises(DimensionError, match="too small"):
        adapt.fit(small_scene.isel(y=slice(0, 30)), model=tiny_checkpoint, **{**FAST, "patch_size": None})


def test_accessor_fit_and_reconstruct_with_adaptation(small_scene, tiny_checkpoint, tmp_path):
    fitted = small_scene.cmsn.fit(model=tiny_checkpoint, out=tmp_path / "a.pt", **FAST)
    assert isinstance(fitted, adapt.FitResult) and fitted.checkpoint.is_file()

    options = {**FAST, "out": tmp_path / "b.pt"}
    result = small_scene.cmsn.reconstruct(model=tiny_checkpoint, adapt=True, fit_options=options, tile=96)
    assert result.attrs["model"] == "in-memory model"  # the adapted copy, not the file
    reconstructed = result["reconstructed"].compute()
    clear = result["filled"].values[:, None] == 0
    np.testing.assert_array_equal(
        reconstructed.values[np.broadcast_to(clear, reconstructed.shape)],
        small_scene["reflectance"].values[np.broadcast_to(clear, reconstructed.shape)],
    )
    assert np.isfinite(reconstructed.values.transpose(1, 0, 2, 3)[:, result["filled"].values < 2]).all()
    # the fitted checkpoint reconstructs the same way when passed by path
    again = small_scene.cmsn.reconstruct(model=tmp_path / "b.pt", tile=96)["reconstructed"].compute()
    np.testing.assert_array_equal(again.values, reconstructed.values)  # NaN where no date observed, in both


def test_cli_fit(scene_store, tiny_checkpoint, tmp_path):
    out = tmp_path / "cli.pt"
    run = CliRunner().invoke(
        main, ["fit", scene_store, "--model", str(tiny_checkpoint), "--steps", "2", "--out", str(out)]
    )
    assert run.exit_code == 0, run.output
    assert "hold-out cloudy PSNR" in run.output and out.is_file()
    assert model_card(out)["adaptation"]["steps"] == 2


def test_fitted_path():
    assert adapt.fitted_path("stores/a.zarr").as_posix() == "stores/a-fitted.pt"
    assert adapt.fitted_path("s3://bucket/scenes/b.zarr/").as_posix() == "b-fitted.pt"


def test_augmentation_keeps_inputs_and_truth_aligned(small_scene):
    from torch.utils.data import DataLoader

    from cmsn_cube.training.loaders import square_symmetry

    dataset = TripletWindowDataset(small_scene.drop_vars("truth"), size=32, overlap=8, truth="observed")
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    for turns in range(4):
        for flip in (False, True):
            turned = {key: square_symmetry(value, turns, flip) for key, value in batch.items()}
            shown = (turned["inputs"][:, :, 4] == 0) & turned["truth_valid"]  # clear inputs are their own truth
            assert shown.any()
            np.testing.assert_array_equal(
                turned["inputs"][:, :, :4].permute(0, 1, 3, 4, 2)[shown],
                turned["truth"].permute(0, 1, 3, 4, 2)[shown],
            )
            assert not (turned["sim_mask"] & ~turned["truth_valid"]).any()
    assert not torch.equal(square_symmetry(batch["inputs"], 1, False), batch["inputs"])


def test_fit_rounds_go_on_across_passes_with_new_clouds(small_scene):
    # fit validates every few steps: its rounds of batches run on over the passes of the window loader, each
    # pass a new epoch (new pasted clouds, shuffle and augmentation), as train_on_stores' epochs are.
    from cmsn_cube.training.loaders import Rounds, epoch_loader

    dataset = TripletWindowDataset(small_scene.drop_vars("truth"), size=32, overlap=8, truth="observed", seed=3)
    loader = epoch_loader([dataset], batch_size=len(dataset), seed=3, augment=False)
    rounds = Rounds(loader, batches=3)
    first, second = list(rounds), list(rounds)
    assert len(first) == len(second) == 3 and loader.epoch == 6 and dataset.epoch == 5

    def clouds(batch):  # the pasted clouds of a batch, whatever its order
        return sorted(mask.numpy().tobytes() for mask in batch["sim_mask"])

    assert clouds(first[0]) != clouds(first[1]) and clouds(first[1]) != clouds(second[0])
