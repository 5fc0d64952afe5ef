"""The training run behind :func:`cmsn_cube.train.train`: its options, its epochs and steps, what it returns.

A run (:class:`_Run`) sets up the model, AdamW, the gradient scaler and the :class:`WarmupSchedule` in one
:class:`~cmsn_cube.training.state.TrainingState`, optionally resumes it from ``last.pt``, then repeats
*train an epoch → validate → save ``last.pt``* until the steps, the epochs, the patience or the time budget
run out.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cmsn_cube.device import default_device
from cmsn_cube.exceptions import CMSNCubeError
from cmsn_cube.metrics import SSIM_NAME
from cmsn_cube.model.checkpoint import build_model, load_model, save_checkpoint
from cmsn_cube.model.cmsn import ARCHITECTURE, CMSN
from cmsn_cube.model.losses import DEFAULT_LOSS_WEIGHTS, CMSNLoss
from cmsn_cube.training.history import HISTORY_JSON, HISTORY_PNG, LossLog, write_history
from cmsn_cube.training.loaders import batch_to_device
from cmsn_cube.training.schedule import SCHEDULES, Schedule, WarmupSchedule, default_warmup
from cmsn_cube.training.state import TrainingState
from cmsn_cube.training.validation import MONITORS, Monitor, evaluate_batches, improved

__all__ = ["BEST_CHECKPOINT", "LAST_CHECKPOINT", "StopReason", "TrainOptions", "TrainResult", "run_training"]

StopReason = Literal["completed", "early_stopping", "time_budget"]
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """The options of :func:`cmsn_cube.train.train` (which sets their defaults), checked when built.

    Attributes
    ----------
    epochs : int or None
        Passes over the training loader.
    steps : int or None
        Optimizer steps in total; training stops at this count even mid-epoch (then validates once more).
        At least one of ``epochs`` and ``steps`` is needed; with only ``steps``, epochs repeat as needed.
    lr : float
        Peak learning rate of AdamW.
    weight_decay : float
        AdamW weight decay, applied to convolution kernels only (not biases or scales).
    schedule : {"cosine", "onecycle", "constant"}
        Learning-rate schedule over the total number of steps (:func:`~cmsn_cube.training.schedule.learning_rate`).
    warmup_steps : int or None
        Linear warm-up of the cosine schedule (None: 5 % of the steps, at most 200).
    loss_weights : mapping or None
        Overrides of ``lambda_cloudy``, ``delta``, ``xi`` (see :func:`cmsn_cube.model.cmsn_loss`).
    grad_clip : float or None
        Maximum global gradient norm; ``None`` disables clipping.
    seed : int
        Seeds Python, NumPy and torch (including a DataLoader's default shuffling generator).
    device : str, torch.device or None
        None: CUDA when available, else CPU.
    amp : bool or None
        Mixed precision (bfloat16 where supported, else float16 with loss scaling) on CUDA; None: on for CUDA.
        Always off on CPU.
    checkpoint_dir : str, path-like or None
        Where ``last.pt`` (resumable), ``best.pt`` (best validation), their ``.json`` cards, ``history.json``
        and ``loss.png`` are written (atomically).
    overwrite : bool
        Start a new run in a ``checkpoint_dir`` that holds an earlier run's files (replacing them); without it
        (and without ``resume``) they are an error, raised before any training.
    resume : bool
        Continue from ``checkpoint_dir/last.pt`` if present: weights and the whole
        :class:`~cmsn_cube.training.state.TrainingState` (optimizer, step, epoch, history, best validation, RNG
        states). ``last.pt`` is written at the end of every epoch, so a killed run continues from the start of
        the epoch it was killed in; with the same arguments and loader it then ends with the same weights as a
        run that was never stopped (on CPU bit for bit): the data order is restored too, and a loader (or
        sampler) with a ``set_epoch(epoch)`` method is told each epoch's number before it is iterated. A run
        that stopped mid-epoch on ``steps`` or ``time_budget`` has counted that epoch as done: resuming it
        starts the next one (and a schedule over more ``steps`` is another schedule).
    time_budget : float or None
        Seconds of wall clock for this call; training stops cleanly (validating and saving) when exceeded.
        The schedule then advances with whichever is further along, steps or time.
    patience : int or None
        Early stopping: stop after this many validations without improvement of ``monitor``.
    min_delta : float
        Smallest change of ``monitor`` counted as an improvement.
    monitor : {"psnr_cloudy", "ssim_cloudy", "loss"}
        Validation quantity for best checkpoint and early stopping.
    restore_best : bool
        Return the model with the best validated weights (when a validation loader was given, also when the
        best epoch was before a resume); otherwise, or without validation, the final weights.
    log_every : int
        Steps between entries of the training history (each the mean over those steps).
    training_data : mapping or None
        JSON-serialisable description of the training data, written into the checkpoint cards.
    progress : bool
        Show a tqdm progress bar with the running loss.

    Raises
    ------
    ValueError
        Neither ``epochs`` nor ``steps`` is given, an option is out of range, or ``resume`` lacks a
        ``checkpoint_dir``.
    """

    epochs: int | None
    steps: int | None
    lr: float
    weight_decay: float
    schedule: Schedule
    warmup_steps: int | None
    loss_weights: Mapping[str, float] | None
    grad_clip: float | None
    seed: int
    device: str | torch.device | None
    amp: bool | None
    checkpoint_dir: str | os.PathLike[str] | None
    resume: bool
    overwrite: bool
    time_budget: float | None
    patience: int | None
    min_delta: float
    monitor: Monitor
    restore_best: bool
    log_every: int
    training_data: Mapping[str, Any] | None
    progress: bool

    def __post_init__(self) -> None:
        epochs, steps = self.epochs, self.steps
        if epochs is None and steps is None:
            raise ValueError("give epochs=..., steps=... or both")
        if (epochs is not None and epochs < 1) or (steps is not None and steps < 1):
            raise ValueError(f"epochs and steps must be >= 1, got epochs={epochs}, steps={steps}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'cosine', 'onecycle' or 'constant', got {self.schedule!r}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be 'psnr_cloudy', 'ssim_cloudy' or 'loss', got {self.monitor!r}")
        unknown_weights = sorted(set(self.loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS))
        if unknown_weights:
            raise ValueError(f"unknown loss weights {unknown_weights}; known: {sorted(DEFAULT_LOSS_WEIGHTS)}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")


@dataclass
class TrainResult:
    """What :func:`cmsn_cube.train.train` returns.

    Attributes
    ----------
    model : CMSN
        The trained model (the best validated weights when ``restore_best`` and a validation set were given).
    history : dict
        ``{"train": [{"step", "epoch", "lr", "total", "mtgl", ...}], "val": [{"step", "epoch", "loss",
        "psnr_cloudy", "ssim_cloudy", "mae_cloudy"}]}``.
    best_metrics : dict or None
        Validation record of the best epoch.
    steps, epochs : int
        Optimizer steps and epochs done in total (including resumed ones).
    stop_reason : {"completed", "early_stopping", "time_budget"}
        Why training stopped.
    elapsed_s : float
        Wall-clock seconds of this call.
    device : str
        Where it trained.
    checkpoint_dir, best_checkpoint, last_checkpoint : pathlib.Path or None
        The checkpoint folder and the files written there.
    extra : dict
        ``run``: the settings written into the checkpoint cards.
    """

    model: CMSN
    history: dict[str, list[dict[str, float]]]
    best_metrics: dict[str, float] | None
    steps: int
    epochs: int
    stop_reason: StopReason
    elapsed_s: float
    device: str
    checkpoint_dir: Path | None = None
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs and make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - samplers may still draw from the legacy global RNG
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def resolve_model(model_or_config: CMSN | Mapping[str, Any] | str | os.PathLike[str] | None) -> CMSN:
    """Return the model to train: ``model_or_config`` itself, built from a config, loaded, or a new CMSN."""
    if model_or_config is None:
        return CMSN()
    if isinstance(model_or_config, CMSN):
        return model_or_config
    if isinstance(model_or_config, Mapping):
        return build_model({"architecture": ARCHITECTURE, **model_or_config})
    if isinstance(model_or_config, (str, os.PathLike)):
        # Fine-tuning: start from a checkpoint path or a packaged model name.
        return load_model(model_or_config, bands=None)
    raise TypeError(
        "model_or_config must be a CMSN, a config dict, a checkpoint path / packaged name, or None; "
        f"got {type(model_or_config).__name__}"
    )


def _set_loader_epoch(loader: Any, epoch: int) -> None:
    """Tell a loader (or its sampler, e.g. a ``DistributedSampler``) which epoch it is about to give."""
    for owner in (loader, getattr(loader, "sampler", None)):
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return


def _adamw(model: CMSN, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW decaying the convolution kernels only (not biases or scales)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 4]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 4]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


#: What a run writes into its folder: an earlier run's files are kept unless resumed or overwritten.
RUN_FILES = (LAST_CHECKPOINT, "last.json", BEST_CHECKPOINT, "best.json", HISTORY_JSON, HISTORY_PNG)

#: What a run's validation scores depend on: a resume with other values would compare incomparable scores.
_VALIDATION_FACTS = ("stores", "patch_size", "overlap", "val_fraction", "levels", "reference_masks")


def claim_run_folder(directory: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> Path:
    """Check, before any work, that a run may write into ``directory``; return it.

    A folder with an earlier run's files is continued (``resume``, when it has ``last.pt``) or replaced
    (``overwrite``); otherwise it is an :class:`~cmsn_cube.exceptions.OutputExistsError`.
    """
    from cmsn_cube.outputs import claim_folder

    directory = Path(directory)
    if resume and (directory / LAST_CHECKPOINT).is_file():
        return claim_folder(directory, (), overwrite=True, what="checkpoint folder")
    return claim_folder(directory, RUN_FILES, overwrite=overwrite, what="checkpoint folder")


def check_resumed_data(last: Path, training_data: Mapping[str, Any] | None) -> None:
    """Refuse to resume the run of ``last`` on other data: its best score was measured on its own validation set."""
    from cmsn_cube.exceptions import ArgumentError
    from cmsn_cube.model.checkpoint import model_card

    try:
        recorded = model_card(last).get("training", {}).get("training_data") or {}
    except CMSNCubeError:
        return  # no card: nothing recorded to compare
    given = dict(training_data or {})
    differs = [key for key in _VALIDATION_FACTS if key in recorded and key in given and recorded[key] != given[key]]
    if differs:
        raise ArgumentError(
            f"resume continues the run in {last.parent} on the data it was trained on; its {', '.join(differs)} "
            "differ from this call's (its best validation score is not comparable): train into another folder, "
            f"or fine-tune from it with init={str(last)!r} (--init)"
        )


def run_training(
    model_or_config: CMSN | Mapping[str, Any] | str | os.PathLike[str] | None,
    train_loader: Iterable[Mapping[str, Any]],
    val_loader: Iterable[Mapping[str, Any]] | None,
    options: TrainOptions,
) -> TrainResult:
    """Train as :func:`cmsn_cube.train.train` describes, holding the checkpoint folder's lock for the run."""
    from cmsn_cube.outputs import claimed_output

    if options.checkpoint_dir is None:
        return _Run(model_or_config, train_loader, val_loader, options).run()
    directory = Path(options.checkpoint_dir)
    with claimed_output(
        directory, lambda: claim_run_folder(directory, resume=options.resume, overwrite=options.overwrite)
    ):
        if options.resume and (directory / LAST_CHECKPOINT).is_file():
            check_resumed_data(directory / LAST_CHECKPOINT, options.training_data)
        return _Run(model_or_config, train_loader, val_loader, options).run()


class _Run:
    """One training call: fixed settings (device, precision, loss, schedule, folder) and the TrainingState."""

    def __init__(
        self,
        model_or_config: CMSN | Mapping[str, Any] | str | os.PathLike[str] | None,
        train_loader: Iterable[Mapping[str, Any]],
        val_loader: Iterable[Mapping[str, Any]] | None,
        options: TrainOptions,
    ) -> None:
        self.options, self.train_loader, self.val_loader = options, train_loader, val_loader
        self.started = time.monotonic()
        seed_everything(options.seed)
        model = resolve_model(model_or_config)
        device = torch.device(default_device(None if options.device is None else str(options.device)))
        model.to(device)
        self.use_amp = (device.type == "cuda") if options.amp is None else (options.amp and device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.weights = {**DEFAULT_LOSS_WEIGHTS, **(options.loss_weights or {})}
        self.loss_fn = CMSNLoss(**self.weights)
        optimizer = _adamw(model, lr=options.lr, weight_decay=options.weight_decay)
        try:
            self.batches_per_epoch: int | None = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            self.batches_per_epoch = None
        if options.steps is not None:
            self.total_steps = options.steps
        elif self.batches_per_epoch is not None:
            self.total_steps = options.epochs * self.batches_per_epoch  # type: ignore[operator]
        else:
            raise ValueError("train_loader has no len(); give steps=... so the schedule knows its length")
        self.max_epochs = options.epochs if options.epochs is not None else math.inf
        warmup = options.warmup_steps if options.warmup_steps is not None else default_warmup(self.total_steps)
        scheduler = WarmupSchedule(
            optimizer, total_steps=self.total_steps, peak=options.lr, schedule=options.schedule,
            warmup_steps=warmup, budget_spent=None if options.time_budget is None else self._budget_spent,
        )  # fmt: skip
        self.state = TrainingState(model, optimizer, scaler, scheduler, train_loader, device)
        self.directory = Path(options.checkpoint_dir) if options.checkpoint_dir is not None else None
        self.run_facts = {
            "seed": options.seed,
            "lr": options.lr,
            "weight_decay": options.weight_decay,
            "schedule": options.schedule,
            "grad_clip": options.grad_clip,
            "loss_weights": self.weights,
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "amp": str(self.amp_dtype).removeprefix("torch.") if self.use_amp else "off",
            "torch": str(torch.__version__),
            "training_data": dict(options.training_data or {}),
        }

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _budget_spent(self) -> float:
        budget = self.options.time_budget
        return 1.0 if budget is None or budget <= 0 else min(1.0, self._elapsed() / budget)

    def _out_of_time(self) -> bool:
        return self.options.time_budget is not None and self._elapsed() > self.options.time_budget

    def _card_metadata(self) -> dict[str, Any]:
        training = {"steps": self.state.step, "epochs": self.state.epoch, "train_seconds": round(self._elapsed(), 1)}
        return {"training": {**self.run_facts, **training}, "metrics": self.state.best_metrics or {}}

    def run(self) -> TrainResult:
        """Resume if asked, train epochs until something stops it, save, and return the result."""
        state = self.state
        if self.options.resume and self.directory is not None and (self.directory / LAST_CHECKPOINT).is_file():
            best = self.directory / BEST_CHECKPOINT if self.val_loader is not None else None
            state.resume(self.directory / LAST_CHECKPOINT, best)
        log = LossLog(state.history["train"], every=self.options.log_every)
        stop_reason: StopReason = "completed"
        saved_at_step, last_path = -1, None
        state.model.train()
        while state.epoch < self.max_epochs and state.step < self.total_steps and stop_reason == "completed":
            stop_reason = self._train_epoch(log)
            state.epoch += 1
            if self.val_loader is not None and self._validate(self.val_loader):
                stop_reason = "early_stopping"
            last_path, saved_at_step = self._save_last(), state.step
            if self._out_of_time() and state.step < self.total_steps:
                stop_reason = "time_budget"
        if log.flush(step=state.step, epoch=state.epoch):
            saved_at_step = -1  # the history changed since the last save
        if saved_at_step != state.step:
            last_path = self._save_last()
        return self._finish(stop_reason, last_path)

    def _train_epoch(self, log: LossLog) -> StopReason:
        """Train on the loader's next epoch; ``time_budget`` if the budget ran out before its end."""
        from tqdm.auto import tqdm

        state, total = self.state, self.total_steps
        epoch_batches = self.batches_per_epoch if self.batches_per_epoch is not None else total - state.step
        bar = tqdm(
            total=min(epoch_batches, total - state.step), desc=f"epoch {state.epoch + 1}",
            disable=not self.options.progress, leave=False, dynamic_ncols=True,
        )  # fmt: skip
        _set_loader_epoch(self.train_loader, state.epoch)
        stop_reason: StopReason = "completed"
        for raw_batch in self.train_loader:
            if state.step >= total:
                break
            if self._out_of_time():
                stop_reason = "time_budget"
                break
            self._train_step(raw_batch, log)
            bar.set_postfix(loss=f"{log.running:.4f}", lr=f"{log.lr:.1e}")
            bar.update()
        bar.close()
        return stop_reason

    def _train_step(self, raw_batch: Mapping[str, Any], log: LossLog) -> None:
        """One optimizer step on one batch, then the schedule's next step."""
        state, options = self.state, self.options
        if options.time_budget is not None:
            state.scheduler.seek(state.step)  # the clock went on since the last step (data, validation)
        lr = state.optimizer.param_groups[0]["lr"]
        batch = batch_to_device(raw_batch, state.device)
        with torch.autocast(device_type=state.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            prediction = state.model(batch["inputs"])
        terms = self.loss_fn(prediction, batch)
        if not torch.isfinite(terms["total"]):
            raise FloatingPointError(
                f"loss became {float(terms['total'])} at step {state.step}; lower lr (now {lr:.2e}) "
                "or check the batch for NaN reflectance"
            )
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(terms["total"]).backward()
        if options.grad_clip is not None:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), options.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        state.step += 1
        values = {key: float(value.detach()) for key, value in terms.items()}
        log.add(values, lr=lr, step=state.step, epoch=state.epoch + 1, last=state.step == self.total_steps)

    def _validate(self, val_loader: Iterable[Mapping[str, Any]]) -> bool:
        """Validate, keep the best weights (and ``best.pt``); whether early stopping's patience ran out."""
        from tqdm.auto import tqdm

        state, options = self.state, self.options
        metrics = evaluate_batches(
            state.model, val_loader, loss_weights=self.weights, device=state.device, amp=self.use_amp
        )
        record = {"step": state.step, "epoch": state.epoch, **metrics}
        state.history["val"].append(record)
        value = metrics[options.monitor]
        if improved(value, state.best_value, monitor=options.monitor, min_delta=options.min_delta):
            state.best_value, state.best_metrics = value, record
            state.validations_without_improvement = 0
            state.keep_best_weights()
            if self.directory is not None:
                save_checkpoint(
                    self.directory / BEST_CHECKPOINT, state.model, metadata=self._card_metadata(), overwrite=True
                )
        else:
            state.validations_without_improvement += 1
        if options.progress:
            tqdm.write(
                f"epoch {state.epoch} step {state.step}: val loss {metrics['loss']:.4f}, "
                f"PSNR cloudy {metrics['psnr_cloudy']:.2f} dB, {SSIM_NAME} cloudy {metrics['ssim_cloudy']:.4f}"
            )
        return options.patience is not None and state.validations_without_improvement >= options.patience

    def _save_last(self) -> Path | None:
        """Write ``last.pt`` (weights and the whole TrainingState) and the history files, if there is a folder."""
        if self.directory is None:
            return None
        path = save_checkpoint(
            self.directory / LAST_CHECKPOINT, self.state.model, metadata=self._card_metadata(),
            training_state=self.state.state_dict(), overwrite=True,
        )  # fmt: skip
        write_history(self.state.history, self.directory)
        return path

    def _finish(self, stop_reason: StopReason, last_path: Path | None) -> TrainResult:
        """Save ``best.pt`` of a run without validation, pick the weights to return, and describe the run."""
        state, directory = self.state, self.directory
        if self.val_loader is None and directory is not None:
            # Without validation the final weights are the ones to use (no validation metrics describe them,
            # even when a resumed earlier call had some).
            save_checkpoint(
                directory / BEST_CHECKPOINT,
                state.model,
                metadata=self._card_metadata() | {"metrics": {}},
                overwrite=True,
            )
        best_path = directory / BEST_CHECKPOINT if directory is not None else None
        if best_path is not None and not best_path.is_file():
            best_path = None
        if self.options.restore_best and state.best_weights is not None:  # only ever set by a validation
            state.model.load_state_dict(state.best_weights)
        state.model.eval()
        return TrainResult(
            model=state.model, history=copy.deepcopy(state.history), best_metrics=state.best_metrics,
            steps=state.step, epochs=state.epoch, stop_reason=stop_reason, elapsed_s=self._elapsed(),
            device=str(state.device), checkpoint_dir=directory, best_checkpoint=best_path, last_checkpoint=last_path,
            extra={"run": self.run_facts},
        )  # fmt: skip
