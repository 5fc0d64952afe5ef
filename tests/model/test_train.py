from __future__ import annotations

import json

import pytest
import torch

from cmsn_cube.model import CMSN, cmsn_loss, load_model
from cmsn_cube.train import _ssim_map, evaluate_batches, train


def loss_on(model, batch):
    model.eval()
    with torch.no_grad():
        return float(cmsn_loss(model(batch["inputs"]), batch)["total"])


def test_training_steps_lower_the_loss(batch_factory, tiny_config):
    batch = batch_factory(batch=2, height=24, width=24, seed=5)
    torch.manual_seed(0)
    model = CMSN(**tiny_config)
    before = loss_on(model, batch)
    result = train(model, [batch], epochs=40, lr=3e-3, schedule="constant", seed=0, progress=False)
    after = loss_on(result.model, batch)
    assert result.steps == 40
    assert after < 0.7 * before, (before, after)


def test_train_writes_checkpoints_history_and_plot(tmp_path, batch_factory, tiny_config):
    train_batches = [batch_factory(seed=s, height=16, width=16) for s in range(2)]
    val_batches = [batch_factory(seed=10, height=16, width=16)]
    result = train(
        tiny_config,
        train_batches,
        val_batches,
        epochs=2,
        checkpoint_dir=tmp_path,
        progress=False,
        training_data={"source": "tests"},
    )
    for name in ("last.pt", "last.json", "best.pt", "best.json", "history.json", "loss.png"):
        assert (tmp_path / name).is_file(), name
    history = json.loads((tmp_path / "history.json").read_text())
    assert [record["epoch"] for record in history["val"]] == [1, 2]
    assert history["train"][-1]["step"] == 4
    assert result.best_metrics is not None and 0 < result.best_metrics["psnr_cloudy"] < 100
    card = json.loads((tmp_path / "best.json").read_text())
    assert card["training"]["training_data"] == {"source": "tests"}
    assert card["metrics"]["psnr_cloudy"] == pytest.approx(result.best_metrics["psnr_cloudy"])
    reloaded = load_model(result.best_checkpoint)
    with torch.no_grad():
        assert torch.equal(reloaded(val_batches[0]["inputs"]).output, result.model(val_batches[0]["inputs"]).output)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_where_it_stopped(tmp_path, batch_factory, tiny_config):
    batches = [batch_factory(seed=s, height=16, width=16) for s in range(2)]
    first = train(tiny_config, batches, steps=6, epochs=2, checkpoint_dir=tmp_path, progress=False, log_every=1)
    assert first.steps == 4
    resumed = train(tiny_config, batches, steps=6, checkpoint_dir=tmp_path, resume=True, progress=False, log_every=1)
    assert resumed.steps == 6
    assert [record["step"] for record in resumed.history["train"]] == [1, 2, 3, 4, 5, 6]


def test_same_seed_gives_the_same_weights(batch_factory, tiny_config):
    batches = [batch_factory(seed=s, height=16, width=16) for s in range(2)]
    runs = [train(tiny_config, batches, steps=3, seed=7, progress=False).model.state_dict() for _ in range(2)]
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_early_stopping_and_time_budget(batch_factory, tiny_config):
    batches = [batch_factory(seed=0, height=16, width=16)]
    stopped = train(tiny_config, batches, batches, epochs=5, patience=1, min_delta=1e9, progress=False)
    assert stopped.stop_reason == "early_stopping" and stopped.epochs == 2
    out_of_time = train(tiny_config, batches, batches, epochs=5, time_budget=0.0, progress=False)
    assert out_of_time.stop_reason == "time_budget" and out_of_time.steps == 0


def test_fine_tuning_starts_from_a_checkpoint(tmp_path, batch_factory, tiny_config):
    batches = [batch_factory(seed=1, height=16, width=16)]
    base = train(tiny_config, batches, steps=2, checkpoint_dir=tmp_path / "base", progress=False)
    tuned = train(base.best_checkpoint, batches, batches, steps=2, lr=1e-4, progress=False)
    assert tuned.model.config == base.model.config
    assert tuned.steps == 2


def test_options_are_checked(batch_factory, tiny_config):
    batches = [batch_factory(height=8, width=8)]
    with pytest.raises(ValueError, match="epochs"):
        train(tiny_config, batches, progress=False)
    with pytest.raises(ValueError, match="unknown loss weights"):
        train(tiny_config, batches, steps=1, loss_weights={"gamma": 1.0}, progress=False)
    with pytest.raises(KeyError, match="sim_mask"):
        train(tiny_config, [{k: v for k, v in batches[0].items() if k != "sim_mask"}], steps=1, progress=False)


def test_validation_metrics_of_a_perfect_copy(batch_factory):
    image = torch.rand(2, 4, 20, 20)
    torch.testing.assert_close(_ssim_map(image, image), torch.ones_like(image))
    assert _ssim_map(image, 1 - image).mean() < 0.5
    batch = batch_factory(height=16, width=16)
    metrics = evaluate_batches(CMSN(width=4, depth=0, fusion_depth=0, skip_width=2), [batch])
    assert metrics["cloudy_pixels"] == float(batch["sim_mask"].sum())
    assert 0 < metrics["psnr_cloudy"] < 60 and -1 <= metrics["ssim_cloudy"] <= 1
