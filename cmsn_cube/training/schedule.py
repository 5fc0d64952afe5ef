"""The learning-rate schedule of training: linear warm-up and cosine decay, one-cycle, or constant.

:class:`WarmupSchedule` is a ``torch.optim.lr_scheduler.LRScheduler`` (``scheduler.step()`` after each
``optimizer.step()``) whose rate at step ``n`` is the closed form :func:`learning_rate` of ``n``: no
recursion, so a run resumed at step ``n`` gets exactly the rates of a straight one. With a time budget the
schedule advances with whichever is further along, steps or wall-clock time, so a run cut by the budget still
ends at a low learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

__all__ = ["Schedule", "WarmupSchedule", "default_warmup", "learning_rate"]

Schedule = Literal["cosine", "onecycle", "constant"]
SCHEDULES: tuple[Schedule, ...] = ("cosine", "onecycle", "constant")


def default_warmup(total_steps: int) -> int:
    """Warm-up steps of the cosine schedule when none are given: 5 % of the steps, at least 1, at most 200."""
    return min(200, max(1, total_steps // 20))


def learning_rate(step: int, *, total_steps: int, peak: float, schedule: Schedule, warmup_steps: int) -> float:
    """Learning rate of step ``step`` (counted from 0) of a schedule over ``total_steps`` steps.

    ``cosine``: linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to ``peak / 100``;
    ``onecycle``: as torch's ``OneCycleLR``, a 30 % cosine rise from ``peak / 25``, then cosine down to
    ``peak / 1e4``; ``constant``: ``peak``. Steps past the end keep the final rate.

    Examples
    --------
    >>> learning_rate(0, total_steps=100, peak=1.0, schedule="cosine", warmup_steps=10)
    0.1
    >>> learning_rate(100, total_steps=100, peak=1.0, schedule="cosine", warmup_steps=10)
    0.01
    """
    if schedule == "constant":
        return peak
    if schedule == "onecycle":
        rise = max(1, int(0.3 * total_steps))
        if step < rise:
            start = peak / 25
            return start + (peak - start) * (1 - math.cos(math.pi * step / rise)) / 2
        progress = (step - rise) / max(1, total_steps - rise)
        return peak / 1e4 + (peak - peak / 1e4) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    floor = peak * 0.01
    return floor + (peak - floor) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2


class WarmupSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Set every parameter group's learning rate to :func:`learning_rate` of the step count.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Its groups' ``lr`` are set now (step 0) and at every :meth:`step`.
    total_steps, peak, schedule, warmup_steps
        As :func:`learning_rate`.
    budget_spent : callable, optional
        Share of the time budget spent so far (0 at the start, 1 when it runs out); the schedule then stands at
        ``max(step, budget_spent() * total_steps)``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        peak: float,
        schedule: Schedule,
        warmup_steps: int,
        budget_spent: Callable[[], float] | None = None,
    ) -> None:
        self.total_steps, self.peak, self.schedule, self.warmup_steps = total_steps, peak, schedule, warmup_steps
        self.budget_spent = budget_spent
        super().__init__(optimizer)

    def position(self) -> int:
        """Return the step of the schedule that the next optimizer step takes its rate from."""
        if self.budget_spent is None:
            return self.last_epoch
        return max(self.last_epoch, min(self.total_steps, int(self.budget_spent() * self.total_steps)))

    def get_lr(self) -> list[float | torch.Tensor]:
        """Learning rates of the current position, one per parameter group."""
        rate = learning_rate(
            self.position(),
            total_steps=self.total_steps,
            peak=self.peak,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
        )
        return [rate for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, object]:
        """Return the position only: the settings are those of the run that resumes (more steps, another schedule)."""
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def seek(self, step: int) -> None:
        """Stand at step ``step`` (a resumed run), or re-read the clock at the current one, and set the rates."""
        self.last_epoch = step
        rates = self.get_lr()
        for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
