from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from cmsn_cube import metrics
from cmsn_cube.model import CMSN, cmsn_loss, load_model
from cmsn_cube.train import evaluate_batches, train
from cmsn_cube.training.loaders import EpochLoader
from cmsn_cube.training.schedule import WarmupSchedule, learning_rate


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
    batch = batch_factory(height=16, width=16)
    metrics = evaluate_batches(CMSN(width=4, depth=0, fusion_depth=0, skip_width=2), [batch])
    assert metrics["cloudy_pixels"] == float(batch["sim_mask"].sum())
    assert 0 < metrics["psnr_cloudy"] < 60 and -1 <= metrics["ssim_cloudy"] <= 1


def test_validation_ssim_is_the_evaluation_ssim_of_the_same_images(batch_factory):
    # One SSIM definition: training's ssim_cloudy of a model's output is cmsn_cube.metrics.ssim of that output
    # against the truth, in the scored pixels (pixels without truth are 0 in both images, as validation sets them).
    batches = [batch_factory(batch=2, height=20, width=20, seed=seed) for seed in (1, 2)]
    torch.manual_seed(0)
    model = CMSN(width=4, depth=1, fusion_depth=0, skip_width=2).eval()
    validated = evaluate_batches(model, batches)["ssim_cloudy"]
    with torch.no_grad():
        outputs = [model(batch["inputs"]).output for batch in batches]
    valid = torch.cat([batch["truth_valid"] for batch in batches]).unsqueeze(2)
    prediction = (torch.cat(outputs) * valid).numpy()
    truth = (torch.cat([batch["truth"] for batch in batches]) * valid).numpy()
    scored = torch.cat([batch["sim_mask"] & batch["truth_valid"] for batch in batches]).unsqueeze(2).numpy()
    evaluated = metrics.ssim(prediction, truth, mask=scored)
    assert 0 < evaluated < 1
    assert validated == pytest.approx(evaluated, rel=1e-12, abs=0)


# ------------------------------------------------------------------------ the learning-rate schedule


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("constant", 0, 1.0),
        ("constant", 99, 1.0),
        ("cosine", 0, 0.1),  # warm-up: (step + 1) / warmup_steps of the peak
        ("cosine", 9, 1.0),
        ("cosine", 10, 1.0),  # the peak once warm, then half a cosine down to 1 % of it
        ("cosine", 55, 0.505),
        ("cosine", 100, 0.01),
        ("cosine", 150, 0.01),
        ("onecycle", 0, 1 / 25),  # rises from 1/25 of the peak over the first 30 % of the steps
        ("onecycle", 30, 1.0),
        ("onecycle", 65, (1 + 1e-4) / 2),
        ("onecycle", 100, 1e-4),
    ],
)
def test_the_learning_rate_follows_its_documented_shape(schedule, step, expected):
    value = learning_rate(step, total_steps=100, peak=1.0, schedule=schedule, warmup_steps=10)
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
@pytest.mark.parametrize(("total_steps", "warmup_steps"), [(1, 1), (7, 1), (50, 2), (1000, 50)])
def test_the_scheduler_sets_the_closed_form_rate_of_every_step(schedule, total_steps, warmup_steps):
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [parameter]}, {"params": [], "weight_decay": 0.0}], lr=3e-3)
    scheduler = WarmupSchedule(
        optimizer, total_steps=total_steps, peak=3e-3, schedule=schedule, warmup_steps=warmup_steps
    )
    for step in range(total_steps + 2):  # and past the end
        expected = learning_rate(step, total_steps=total_steps, peak=3e-3, schedule=schedule,
                                 warmup_steps=warmup_steps)  # fmt: skip
        assert [group["lr"] for group in optimizer.param_groups] == [expected, expected], step
        optimizer.step()
        scheduler.step()


def test_train_logs_the_learning_rate_of_every_step(batch_factory, tiny_config):
    batches = [batch_factory(seed=s, height=16, width=16) for s in range(2)]
    result = train(tiny_config, batches, steps=9, warmup_steps=3, log_every=1, progress=False)
    expected = [learning_rate(step, total_steps=9, peak=2e-3, schedule="cosine", warmup_steps=3)
                for step in range(9)]  # fmt: skip
    assert [record["lr"] for record in result.history["train"]] == expected


# ------------------------------------------------------------------------ resume: a killed run, continued


class _Killed(Exception):
    """Stands for the process being killed in the middle of an epoch."""


class _DyingList(list):
    """A list of batches whose iteration raises after ``batches`` of them: a run killed mid-epoch."""

    def __init__(self, batches, *, die_after):
        super().__init__(batches)
        self.left = die_after

    def __iter__(self):
        for batch in super().__iter__():
            if self.left == 0:
                raise _Killed
            self.left -= 1
            yield batch


class _Samples(torch.utils.data.Dataset):
    """Single samples (no batch axis) of the sample-stream contract, for a shuffling DataLoader; reading
    raises after ``die_after`` samples (so the DataLoader itself is what train() gets, killed mid-epoch)."""

    def __init__(self, batch_factory, n, *, die_after=None):
        batch = batch_factory(batch=n, height=16, width=16, seed=3)
        self.samples = self.original = [{key: value[i] for key, value in batch.items()} for i in range(n)]
        self.left = die_after

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):  # as the store datasets, which give other clouds each epoch
        self.samples = [sample | {"truth": sample["truth"] * (1 - 0.01 * epoch)} for sample in self.original]

    def __getitem__(self, index):
        if self.left == 0:
            raise _Killed
        if self.left is not None:
            self.left -= 1
        return self.samples[index]


class _GlobalShuffle(torch.utils.data.Sampler):
    """A sampler shuffling with NumPy's and Python's global RNGs (as some third-party samplers do)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        order = np.random.permutation(self.n).tolist()  # noqa: NPY002 - the point of this sampler
        random.shuffle(order)
        return iter(order)


def _loader(kind, batch_factory, *, die_after=None):
    """A fresh loader of 2 batches per epoch, as a restarted process would build it, that raises _Killed
    after ``die_after`` batches."""
    if kind == "list":
        batches = [batch_factory(seed=s, height=16, width=16) for s in range(2)]
        return batches if die_after is None else _DyingList(batches, die_after=die_after)
    dataset = _Samples(batch_factory, 4, die_after=None if die_after is None else 2 * die_after)
    if kind == "shuffled":  # shuffle drawn from torch's global RNG
        return torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)
    if kind == "global_rngs":  # shuffle drawn from NumPy's and Python's global RNGs
        return torch.utils.data.DataLoader(dataset, batch_size=2, sampler=_GlobalShuffle(len(dataset)))
    # shuffle drawn from the loader's own generator, which train() must save and restore...
    generator = torch.Generator().manual_seed(11)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, generator=generator)
    # ...or, as train_on_stores does, reseeded by set_epoch with flips and quarter turns
    return loader if kind == "own_generator" else EpochLoader(loader, [dataset], augment=True, seed=4)


def _assert_same_weights(model, reference):
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)


def _stopped_then_resumed(kind, batch_factory, tiny_config, tmp_path, *, how, val=None, **options):
    """Train 4 of the steps (2 epochs), stopping ``how``, then resume in a new call to the end."""
    if how == "killed":  # killed in the 3rd epoch, after 5 batches: last.pt holds the end of epoch 2
        with pytest.raises(_Killed):
            train(
                tiny_config, _loader(kind, batch_factory, die_after=5), val,
                checkpoint_dir=tmp_path, progress=False, **options,
            )  # fmt: skip
    else:  # stopped cleanly by epochs=2 (the schedule still spans all the steps); best.pt is written
        first = train(tiny_config, _loader(kind, batch_factory), val, epochs=2, checkpoint_dir=tmp_path,
                      progress=False, **options)  # fmt: skip
        assert first.steps == 4 and (tmp_path / "best.pt").is_file()
    return train(
        tiny_config, _loader(kind, batch_factory), val, checkpoint_dir=tmp_path, resume=True, progress=False, **options
    )


@pytest.mark.parametrize("how", ["killed", "epochs"])
@pytest.mark.parametrize("kind", ["list", "shuffled", "global_rngs", "own_generator", "store_loader"])
def test_a_stopped_and_resumed_run_ends_with_the_weights_of_a_straight_run(
    tmp_path, batch_factory, tiny_config, kind, how
):
    # 2 batches an epoch, 6 steps in all.
    options = {"steps": 6, "lr": 3e-3, "seed": 4, "log_every": 1, "device": "cpu"}  # CPU: bit for bit
    straight = train(tiny_config, _loader(kind, batch_factory), progress=False, **options)
    resumed = _stopped_then_resumed(kind, batch_factory, tiny_config, tmp_path, how=how, **options)
    assert resumed.steps == 6 and resumed.epochs == 3
    # The same batches in the same order, the same schedule, the same Adam moments: the same weights.
    # (Without the optimizer's moments, or when the model returned is the one of before the stop, or when
    # the resumed epoch shuffles differently, they differ by far more than 1e-6.)
    _assert_same_weights(resumed.model, straight.model)
    assert [r["total"] for r in resumed.history["train"]] == [r["total"] for r in straight.history["train"]]
    # Without validation the final weights are also the ones in best.pt.
    _assert_same_weights(load_model(resumed.best_checkpoint), straight.model)


@pytest.mark.parametrize("restore_best", [True, False])
@pytest.mark.parametrize("how", ["killed", "epochs"])
def test_a_stopped_and_resumed_run_with_validation_ends_like_a_straight_run(
    tmp_path, batch_factory, tiny_config, restore_best, how
):
    val = [batch_factory(seed=20, height=16, width=16)]
    options = {"steps": 8, "lr": 3e-3, "seed": 4, "restore_best": restore_best, "device": "cpu"}
    straight = train(tiny_config, _loader("shuffled", batch_factory), val, progress=False, **options)
    resumed = _stopped_then_resumed("shuffled", batch_factory, tiny_config, tmp_path, how=how, val=val, **options)
    assert resumed.history["val"] == straight.history["val"] and len(straight.history["val"]) == 4
    assert resumed.best_metrics == straight.best_metrics
    assert straight.best_metrics == max(straight.history["val"], key=lambda record: record["psnr_cloudy"])
    assert straight.best_metrics["epoch"] <= 2  # the best is from before the stop: best.pt brings it back
    # restore_best: the best validated weights (maybe from before the kill); otherwise the last ones.
    _assert_same_weights(resumed.model, straight.model)


def test_a_resume_with_validation_never_returns_unvalidated_weights_of_before(tmp_path, batch_factory, tiny_config):
    # The first call has no validation: its best.pt holds its final (pre-resume) weights. The resumed call
    # validates on a batch without simulated clouds, so PSNR is NaN and never "improves": there is no best
    # validated model, and the final weights come back, not those of best.pt.
    val = [batch_factory(seed=20, height=16, width=16)]
    val[0]["sim_mask"] = torch.zeros_like(val[0]["sim_mask"])
    options = {"steps": 6, "lr": 3e-3, "seed": 4, "device": "cpu"}
    straight = train(tiny_config, _loader("list", batch_factory), progress=False, **options)
    first = train(tiny_config, _loader("list", batch_factory), epochs=2, checkpoint_dir=tmp_path, progress=False,
                  **options)  # fmt: skip
    assert first.steps == 4 and (tmp_path / "best.pt").is_file()
    resumed = train(tiny_config, _loader("list", batch_factory), val, checkpoint_dir=tmp_path, resume=True,
                    progress=False, **options)  # fmt: skip
    assert resumed.best_metrics is None and math.isnan(resumed.history["val"][-1]["psnr_cloudy"])
    _assert_same_weights(resumed.model, straight.model)


def test_resuming_a_finished_run_without_validation_returns_its_final_weights(tmp_path, batch_factory, tiny_config):
    batches = _loader("list", batch_factory)
    first = train(tiny_config, batches, steps=4, checkpoint_dir=tmp_path, device="cpu", progress=False)
    again = train(tiny_config, batches, steps=4, checkpoint_dir=tmp_path, resume=True, device="cpu", progress=False)
    assert again.steps == 4
    _assert_same_weights(again.model, first.model)


def test_a_last_checkpoint_of_the_former_format_resumes_like_a_straight_run(tmp_path, batch_factory, tiny_config):
    # last.pt files written before the schedule was a torch scheduler hold the same training_state keys, but
    # optimizer groups without "initial_lr" and with the rate of the step before: the rates must come from the
    # schedule of the resumed run, not from the saved optimizer.
    from cmsn_cube.model.checkpoint import file_sha256

    options = {"steps": 6, "lr": 3e-3, "seed": 4, "device": "cpu"}
    straight = train(tiny_config, _loader("list", batch_factory), progress=False, **options)
    train(tiny_config, _loader("list", batch_factory), epochs=2, checkpoint_dir=tmp_path, progress=False, **options)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    for group in payload["training_state"]["optimizer"]["param_groups"]:
        del group["initial_lr"]
        group["lr"] = 1.0  # would wreck the weights if it were used
    torch.save(payload, tmp_path / "last.pt")
    card = json.loads((tmp_path / "last.json").read_text())
    (tmp_path / "last.json").write_text(json.dumps(card | {"sha256": file_sha256(tmp_path / "last.pt")}))
    resumed = train(tiny_config, _loader("list", batch_factory), checkpoint_dir=tmp_path, resume=True, progress=False,
                    **options)  # fmt: skip
    assert resumed.steps == 6
    _assert_same_weights(resumed.model, straight.model)


class _Windows(torch.utils.data.Dataset):
    """8 distinct 2x2 "windows" whose values also tell the epoch (as the datasets' clouds do)."""

    def __init__(self):
        self.epoch = None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"x": torch.arange(4.0).reshape(1, 2, 2) + 10 * index + 100 * self.epoch}


def _epoch_loader(seed=5):
    dataset = _Windows()
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, generator=generator)
    return EpochLoader(loader, [dataset], augment=True, seed=seed)


def test_the_store_loader_gives_an_epoch_the_same_batches_whatever_came_before():
    # train() calls set_epoch(epoch) before each epoch, so a resumed train_on_stores sees the data of a
    # straight run: epoch 2 of a fresh loader is epoch 2 of one that went through epochs 0 and 1.
    straight = _epoch_loader()
    epochs = [[batch["x"] for batch in straight] for _ in range(3)]
    assert [straight.datasets[0].epoch, straight.epoch] == [2, 3]
    resumed = _epoch_loader()
    resumed.set_epoch(2)
    again = [batch["x"] for batch in resumed]
    assert resumed.datasets[0].epoch == 2
    assert len(again) == 2 and all(torch.equal(a, b) for a, b in zip(again, epochs[2], strict=True))
    # ...while epochs differ from each other in order and augmentation (the values, less the epoch's offset).
    assert not all(torch.equal(a % 100, b % 100) for a, b in zip(epochs[1], epochs[2], strict=True))


class _TaggedWindows(torch.utils.data.Dataset):
    """A window dataset of the sample contract whose items say which dataset they came from."""

    def __init__(self, count: int, tag: float) -> None:
        self.count, self.tag, self.epoch = count, tag, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        inputs = torch.zeros(3, 5, 8, 8)
        inputs[:, :4] = self.tag
        truth = torch.full((3, 4, 8, 8), self.tag)
        return {"inputs": inputs, "truth": truth, "truth_valid": torch.ones(3, 8, 8, dtype=torch.bool),
                "sim_mask": torch.zeros(3, 8, 8, dtype=torch.bool)}  # fmt: skip


def test_a_balanced_epoch_draws_every_dataset_alike():
    from cmsn_cube.train import epoch_loader

    small, large = _TaggedWindows(4, 0.2), _TaggedWindows(60, 0.6)
    for balance, expected_small in ((False, 4), (True, 32)):
        loader = epoch_loader([small, large], batch_size=4, seed=3, augment=False, balance=balance)
        tags = torch.cat([batch["truth"][:, 0, 0, 0, 0] for batch in loader])
        assert len(tags) == 64
        drawn = int((tags == 0.2).sum())
        # balanced: binomial(64, 1/2), sd 4
        assert abs(drawn - expected_small) <= (0 if not balance else 12), (balance, drawn)


def test_radiometric_augmentation_changes_inputs_and_truth_alike(batch_factory):
    from cmsn_cube.train import radiometric_augmentation

    batch = batch_factory(batch=4, height=16, width=16, seed=2)
    changed = radiometric_augmentation(batch, torch.Generator().manual_seed(0))
    mask = batch["inputs"][:, :, 4:]
    assert torch.equal(changed["inputs"][:, :, 4:], mask)
    assert (changed["inputs"][:, :, :4] * mask == 0).all()  # hidden pixels stay 0
    clear = (mask == 0).expand(-1, -1, 4, -1, -1) & batch["truth_valid"].unsqueeze(2).expand(-1, -1, 4, -1, -1)
    assert torch.allclose(changed["inputs"][:, :, :4][clear], changed["truth"][clear])  # one radiometry per date
    assert (changed["truth"] >= 0).all() and (changed["truth"] <= 1).all()
    assert (changed["truth"] - batch["truth"]).abs().mean() > 0.005
