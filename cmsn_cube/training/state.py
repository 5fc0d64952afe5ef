"""Everything a stopped training run needs to go on as if it had never stopped, in one object.

:class:`TrainingState` holds the model, optimizer, gradient scaler, learning-rate scheduler, the counters
(step, epoch: the loader's next epoch is the epoch count), the history, the best validation so far and every
random number generator that decides what comes next (Python's, NumPy's, torch's, CUDA's and the training
loader's own shuffling generators). :meth:`TrainingState.state_dict` is what ``last.pt`` stores under
``training_state`` (plain data, loadable with ``weights_only=True``; the model's weights are the checkpoint's
``state_dict``); :meth:`TrainingState.load_state_dict` puts it back, also from checkpoints written before this
object existed (same keys).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmsn_cube.model.checkpoint import load_checkpoint
from cmsn_cube.model.cmsn import CMSN
from cmsn_cube.training.schedule import WarmupSchedule

__all__ = ["TrainingState"]


def _empty_history() -> dict[str, list[dict[str, float]]]:
    return {"train": [], "val": []}


@dataclass
class TrainingState:
    """The state of a training run, saved at the end of every epoch and restored by ``resume``.

    Attributes
    ----------
    model, optimizer, scaler, scheduler
        The network and what updates it (``torch.amp.GradScaler``, :class:`WarmupSchedule`).
    loader : object
        The training loader: its own shuffling generators (``generator``, its sampler's) are saved too.
    device : torch.device
        Where the model trains (the CUDA RNG of this device is saved).
    step, epoch : int
        Optimizer steps and epochs done (a stopped epoch counts as done).
    history : dict
        ``{"train": [...], "val": [...]}`` records.
    best_value, best_metrics : float and dict, or None
        Best value of the monitored metric and its validation record.
    best_weights : dict of str to Tensor, or None
        The best validated weights, on the CPU (not in ``state_dict()``: ``best.pt`` holds them).
    validations_without_improvement : int
        For early stopping.
    """

    model: CMSN
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: WarmupSchedule
    loader: Any
    device: torch.device
    step: int = 0
    epoch: int = 0
    history: dict[str, list[dict[str, float]]] = field(default_factory=_empty_history)
    best_value: float | None = None
    best_metrics: dict[str, float] | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    validations_without_improvement: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Return the ``training_state`` of ``last.pt``: optimizer, scaler, counters, history, best, RNG states."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "history_json": json.dumps(self.history),
            "best_value": self.best_value,
            "best_metrics_json": json.dumps(self.best_metrics) if self.best_metrics else "",
            "validations_without_improvement": self.validations_without_improvement,
            "grad_scaler": self.scaler.state_dict(),
            **self._rng_states(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put back what :meth:`state_dict` saved (whatever of it a checkpoint holds); the model is not in it."""
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state.get("step", 0))
        self.epoch = int(state.get("epoch", 0))
        self.history = json.loads(state.get("history_json", '{"train": [], "val": []}'))
        self.best_value = state.get("best_value")
        self.best_metrics = json.loads(state["best_metrics_json"]) if state.get("best_metrics_json") else None
        self.validations_without_improvement = int(state.get("validations_without_improvement", 0))
        self._restore_rng_states(state)
        if "grad_scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        self.scheduler.seek(self.step)  # the rates of this run's schedule at the step reached

    def resume(self, last: Path, best: Path | None) -> None:
        """Load the model and state of checkpoint ``last``, and the best validated weights of ``best`` if given.

        ``best`` is only for a run that validates and has a best value: without validation, ``best.pt`` holds
        the final weights of the earlier call, which must not come back at the end of this one.
        """
        payload = load_checkpoint(last, map_location=self.device)
        self.model.load_state_dict(payload["state_dict"])
        self.load_state_dict(payload.get("training_state") or {})
        if best is not None and self.best_value is not None and best.is_file():
            self.best_weights = load_checkpoint(best)["state_dict"]

    def keep_best_weights(self) -> None:
        """Remember the model's current weights (on the CPU) as the best validated ones."""
        self.best_weights = {key: tensor.detach().cpu().clone() for key, tensor in self.model.state_dict().items()}

    # ------------------------------------------------------------------------------------------------ RNG states

    def _loader_generators(self) -> list[torch.Generator]:
        """Find the torch generators the (DataLoader-like) loader shuffles with: its own, its sampler's."""
        found: list[torch.Generator] = []
        sampler = getattr(self.loader, "sampler", None)
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        for owner in (self.loader, sampler, getattr(batch_sampler, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and not any(generator is other for other in found):
                found.append(generator)
        return found

    def _rng_states(self) -> dict[str, Any]:
        """Every RNG state that decides what comes next (data order, clouds, augmentation), as plain data."""
        numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()  # noqa: NPY002
        states: dict[str, Any] = {
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": {
                "name": str(numpy_name),
                "keys": torch.from_numpy(np.asarray(numpy_keys, dtype=np.int64)),
                "pos": int(numpy_pos),
                "has_gauss": int(numpy_has_gauss),
                "cached_gaussian": float(numpy_gauss),
            },
            "loader_rng": [generator.get_state() for generator in self._loader_generators()],
        }
        if self.device.type == "cuda":
            states["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return states

    def _restore_rng_states(self, state: Mapping[str, Any]) -> None:
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"].cpu())
        if "python_rng" in state:
            version, internal, gauss = state["python_rng"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy_rng" in state:
            saved = state["numpy_rng"]
            keys = saved["keys"].cpu().numpy().astype(np.uint32)
            np.random.set_state(  # noqa: NPY002
                (saved["name"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])
            )
        generators = self._loader_generators()
        if len(state.get("loader_rng", ())) == len(generators):
            for generator, generator_state in zip(generators, state["loader_rng"], strict=True):
                generator.set_state(generator_state.cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
