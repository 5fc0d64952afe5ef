"""The loss history of a training run: per-step losses averaged into records, written as JSON and drawn as PNG."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmsn_cube.model.checkpoint import _atomic_write_bytes

__all__ = ["HISTORY_JSON", "HISTORY_PNG", "LossLog", "plot_history", "write_history"]

HISTORY_JSON = "history.json"
HISTORY_PNG = "loss.png"


class LossLog:
    """Average the loss terms of every ``every`` steps into one record of ``records``.

    Parameters
    ----------
    records : list of dict
        The ``train`` list of a history; records ``{"step", "epoch", "lr", "total", "mtgl", ...}`` are appended.
    every : int
        Steps per record.

    Attributes
    ----------
    running : float or None
        Exponential moving average of the total loss (for a progress bar).
    lr : float or None
        Learning rate of the last step added.
    """

    def __init__(self, records: list[dict[str, float]], *, every: int) -> None:
        self.records, self.every = records, every
        self.running: float | None = None
        self.lr: float | None = None
        self._sums: dict[str, float] = {}
        self._count = 0

    def add(self, terms: Mapping[str, float], *, lr: float, step: int, epoch: int, last: bool) -> None:
        """Add one step's loss terms; write a record after ``every`` steps, or at the ``last`` step."""
        total = terms["total"]
        self.running = total if self.running is None else 0.9 * self.running + 0.1 * total
        self.lr = lr
        for key, value in terms.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        if self._count >= self.every or last:
            self.flush(step=step, epoch=epoch)

    def flush(self, *, step: int, epoch: int) -> bool:
        """Write a record of the steps added since the last one, if any; say whether there were some."""
        if not self._count:
            return False
        record = {"step": step, "epoch": epoch, "lr": self.lr} | {k: v / self._count for k, v in self._sums.items()}
        self.records.append(record)  # type: ignore[arg-type]
        self._sums, self._count = {}, 0
        return True


def plot_history(history: Mapping[str, list[Mapping[str, float]]], path: str | os.PathLike[str]) -> Path:
    """Plot training (and validation) loss against steps, and validation PSNR, to a PNG.

    Uses matplotlib's Agg canvas directly, so the caller's backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, psnr_axes = figure.subplots(1, 2)
    train_records = history.get("train", [])
    val_records = history.get("val", [])
    if train_records:
        steps = [record["step"] for record in train_records]
        for key, style in (("total", "-"), ("mtgl", "--"), ("mtfr", ":"), ("refine", "-.")):
            loss_axes.plot(steps, [record[key] for record in train_records], style, label=f"train {key}")
    if val_records:
        loss_axes.plot([r["step"] for r in val_records], [r["loss"] for r in val_records], "o-", label="val total")
        psnr_axes.plot([r["step"] for r in val_records], [r["psnr_cloudy"] for r in val_records], "o-")
    loss_axes.set(xlabel="step", ylabel="loss (reflectance L1 units)", yscale="log", title="losses")
    if train_records or val_records:
        loss_axes.legend(fontsize=7)
    psnr_axes.set(xlabel="step", ylabel="PSNR in cloudy pixels (dB)", title="validation")
    figure.tight_layout()
    path = Path(path)
    _atomic_write_bytes(path, lambda stream: figure.savefig(stream, format="png"))
    return path


def write_history(history: Mapping[str, Any], directory: Path) -> None:
    """Write ``history.json`` and its plot ``loss.png`` into ``directory`` (atomically)."""
    text = json.dumps(history, indent=1, allow_nan=True) + "\n"
    _atomic_write_bytes(directory / HISTORY_JSON, lambda stream: stream.write(text.encode()))
    plot_history(history, directory / HISTORY_PNG)
