"""Training of :class:`cmsn_cube.model.CMSN`: :func:`train` on any loader of batches, :func:`train_on_stores` on cubes.

AdamW with warm-up and a cosine (or one-cycle) schedule, gradient clipping, mixed precision on CUDA,
validation each epoch with PSNR/SSIM in the cloudy pixels, early stopping, a wall-clock budget, atomic
checkpoints (``last.pt`` for ``resume``, ``best.pt`` for use) with JSON cards, and the loss history as JSON
and PNG. The same function fine-tunes an existing checkpoint: pass its path (or a loaded model).

The parts live in :mod:`cmsn_cube.training` (loaders, schedule, resumable state, history, validation, the loop);
this module is the public entry and re-exports their public names.
The loop is plain PyTorch, not PyTorch Lightning: for a 230k-parameter model on one device Lightning would add a
heavy dependency and its own checkpoint format, and break loading checkpoints with ``weights_only=True``.

Batches follow the sample-stream contract: a dict with ``inputs`` ``(B, 3, 5, H, W)``, ``truth``
``(B, 3, 4, H, W)``, ``truth_valid`` ``(B, 3, H, W)`` bool and ``sim_mask`` ``(B, 3, H, W)`` bool.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from cmsn_cube.device import leaves_global_state
from cmsn_cube.model.cmsn import CMSN
from cmsn_cube.training.history import HISTORY_JSON, HISTORY_PNG, plot_history
from cmsn_cube.training.loaders import (
    GAIN_RANGE,
    HAZE_BY_BAND,
    HAZE_MAX,
    HAZE_SHARE,
    OFFSET_RANGE,
    Holdout,
    epoch_loader,
    holdout_datasets,
    radiometric_augmentation,
    validation_loader,
)
from cmsn_cube.training.loop import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    StopReason,
    TrainOptions,
    TrainResult,
    run_training,
)
from cmsn_cube.training.schedule import Schedule
from cmsn_cube.training.validation import Monitor, evaluate_batches

if TYPE_CHECKING:
    import xarray as xr
    from torch.utils.data import DataLoader

    from cmsn_cube.training.loaders import EpochLoader

__all__ = [
    "BEST_CHECKPOINT",
    "GAIN_RANGE",
    "HAZE_BY_BAND",
    "HAZE_MAX",
    "HAZE_SHARE",
    "HISTORY_JSON",
    "HISTORY_PNG",
    "LAST_CHECKPOINT",
    "OFFSET_RANGE",
    "Monitor",
    "Schedule",
    "StopReason",
    "StoreWindows",
    "TrainOptions",
    "TrainResult",
    "epoch_loader",
    "evaluate_batches",
    "plot_history",
    "radiometric_augmentation",
    "train",
    "train_on_stores",
]


@leaves_global_state
def train(
    model_or_config: CMSN | Mapping[str, Any] | str | os.PathLike[str] | None,
    train_loader: Iterable[Mapping[str, Any]],
    val_loader: Iterable[Mapping[str, Any]] | None = None,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    schedule: Schedule = "cosine",
    warmup_steps: int | None = None,
    loss_weights: Mapping[str, float] | None = None,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    time_budget: float | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    monitor: Monitor = "psnr_cloudy",
    restore_best: bool = True,
    log_every: int = 10,
    training_data: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or fine-tune) a CMSN.

    Parameters
    ----------
    model_or_config : CMSN, dict, str, path-like or None
        A model (trained in place), a config dict for :class:`CMSN` (built after seeding, so the
        initialisation is reproducible), a checkpoint path or packaged model name to fine-tune, or ``None``
        for the default CMSN.
    train_loader : iterable of dict
        Batches of the sample stream (e.g. a ``torch.utils.data.DataLoader``); re-iterated every epoch.
    val_loader : iterable of dict, optional
        Held-out batches, evaluated after each epoch (PSNR/SSIM in cloudy pixels).

    Other Parameters
    ----------------
    epochs, steps, lr, weight_decay, schedule, warmup_steps, loss_weights, grad_clip, seed, device, amp, checkpoint_dir, resume, overwrite, time_budget, patience, min_delta, monitor, restore_best, log_every, training_data, progress
        The options of the run, each documented (and checked) in :class:`TrainOptions`.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        If neither ``epochs`` nor ``steps`` is given, or an option is out of range.
    KeyError
        If a batch lacks a key of the sample-stream contract.
    FloatingPointError
        If the loss becomes NaN or infinite.
    CheckpointError
        If ``resume`` finds a checkpoint that is not a cmsn-cube checkpoint.
    """
    options = TrainOptions(
        epochs=epochs, steps=steps, lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_steps=warmup_steps,
        loss_weights=loss_weights, grad_clip=grad_clip, seed=seed, device=device, amp=amp,
        checkpoint_dir=checkpoint_dir, resume=resume, overwrite=overwrite, time_budget=time_budget, patience=patience,
        min_delta=min_delta, monitor=monitor, restore_best=restore_best, log_every=log_every,
        training_data=training_data, progress=progress,
    )  # fmt: skip
    return run_training(model_or_config, train_loader, val_loader, options)


# ------------------------------------------------------------------------------------ training from stores


@dataclass(frozen=True, kw_only=True)
class StoreWindows:
    """How :func:`train_on_stores` (which sets the defaults) cuts stores into training and validation batches.

    Attributes
    ----------
    patch_size, overlap : int
        Window side and overlap in pixels.
    batch_size : int
        Windows per optimizer step.
    val_fraction : float
        Share of each store's rows held out for validation (the last rows, spatially held out).
    truth : {"auto", "cube", "observed"}
        Training truth: the store's ``truth`` variable (``cube``; the embedded scene has one), the clear
        observations (``observed``), or ``auto``: ``cube`` for stores that have one, else ``observed``.
    levels : sequence of float or None
        Masked fraction (real + pasted clouds) for T1, T2, T3; None: :data:`cmsn_cube.qa.DEFAULT_CLOUD_LEVELS`.
    reference_masks : path, "auto" or None
        UKIS reference cloud masks used as pasted shapes ("auto": $CMSN_SHARED_DATA/cloud_masks_ukis when set).
    augment : bool
        Random flips and quarter turns of the training batches.
    radiometric : bool
        Per-date, per-band gain, offset and haze changes (:func:`radiometric_augmentation`).
    balance : bool
        Every store gives the same share of each epoch's windows, however large it is.
    in_memory : bool
        Load each store into memory first (fast window reads; the embedded scene is a few tens of MB).
    num_workers : int
        DataLoader worker processes.
    seed : int
        Seeds the clouds (``seed + 1000 * k`` for the k-th store), the shuffle and the augmentation.
    training_data : mapping or None
        Extra facts about the data for the checkpoint card (merged into the generated description).
    """

    patch_size: int
    overlap: int
    batch_size: int
    val_fraction: float
    truth: Literal["auto", "cube", "observed"]
    levels: Sequence[float] | None
    reference_masks: str | os.PathLike[str] | None
    augment: bool
    radiometric: bool
    balance: bool
    in_memory: bool
    num_workers: int
    seed: int
    training_data: Mapping[str, Any] | None

    @property
    def cloud_levels(self) -> tuple[float, ...]:
        """The masked fractions of T1, T2, T3."""
        from cmsn_cube.qa import DEFAULT_CLOUD_LEVELS

        return tuple(self.levels) if self.levels is not None else tuple(DEFAULT_CLOUD_LEVELS)

    def split(self, store: Any, index: int) -> tuple[Holdout, dict[str, Any]]:
        """Split the ``index``-th store into training and validation windows; also return facts for the card."""
        from cmsn_cube.store import WRITE_ID_ATTR, open_cube

        is_path = isinstance(store, (str, os.PathLike))
        cube: xr.Dataset = open_cube(store) if is_path else store
        source = "cube" if self.truth == "cube" or (self.truth == "auto" and "truth" in cube.data_vars) else "observed"
        data = cube.load() if self.in_memory else (store if is_path else cube)
        holdout = holdout_datasets(
            data, size=self.patch_size, overlap=self.overlap, val_fraction=self.val_fraction,
            seed=self.seed + 1000 * index,  # different clouds per store
            truth=source, levels=self.cloud_levels, reference_masks=self.reference_masks,
        )  # fmt: skip
        facts = {
            "store": os.fspath(store) if is_path else str(store.attrs.get("title", "in-memory cube")),
            "truth": source,
            "size": [int(cube.sizes["y"]), int(cube.sizes["x"])],
            "dates": int(cube.sizes["time"]),
            "train_windows": len(holdout.train),
            "val_windows": len(holdout.validation),
            **{key: cube.attrs[key] for key in ("seed", "sensor", "scale_m", WRITE_ID_ATTR) if key in cube.attrs},
        }
        return holdout, facts

    def loaders(self, stores: Sequence[Any]) -> tuple[EpochLoader, DataLoader[Any], dict[str, Any]]:
        """Pool the windows of ``stores`` into a training and a validation loader; also return their description."""
        splits = [self.split(store, index) for index, store in enumerate(stores)]
        train_loader = epoch_loader(
            [holdout.train for holdout, _ in splits], batch_size=self.batch_size, seed=self.seed,
            augment=self.augment, radiometric=self.radiometric, balance=self.balance, num_workers=self.num_workers,
        )  # fmt: skip
        val_loader = validation_loader(
            [holdout.validation for holdout, _ in splits], batch_size=self.batch_size, num_workers=self.num_workers
        )
        description = {
            "stores": [facts for _, facts in splits],
            "patch_size": self.patch_size,
            "overlap": self.overlap,
            "batch_size": self.batch_size,
            "val_fraction": self.val_fraction,
            "levels": list(self.cloud_levels),
            "reference_masks": None if self.reference_masks is None else os.fspath(self.reference_masks),
            "augment": self.augment,
            "radiometric": self.radiometric,
            "balance": self.balance,
            "torch_threads": torch.get_num_threads(),
            **dict(self.training_data or {}),
        }
        return train_loader, val_loader, description


def _store_list(stores: Any) -> list[Any]:
    """Return ``stores`` as a non-empty list (one store or cube may be given alone)."""
    from cmsn_cube.exceptions import CubeValidationError

    if isinstance(stores, (str, os.PathLike)) or not isinstance(stores, Sequence):
        stores = [stores]
    if not stores:
        raise CubeValidationError("give at least one store to train on")
    return list(stores)


def _initial_model(init: str | os.PathLike[str] | None, **architecture: int | None) -> Any:
    """Choose what :func:`train` starts from: the checkpoint ``init``, or a new CMSN of the given architecture."""
    from cmsn_cube.exceptions import CubeValidationError

    chosen = {key: value for key, value in architecture.items() if value is not None}
    if init is not None and chosen:
        raise CubeValidationError(
            f"architecture options {sorted(chosen)} cannot change a checkpoint given with init={init!r}"
        )
    return init if init is not None else (chosen or None)


@leaves_global_state
def train_on_stores(
    stores: Any,
    *,
    out: str | os.PathLike[str],
    init: str | os.PathLike[str] | None = None,
    width: int | None = None,
    depth: int | None = None,
    fusion_depth: int | None = None,
    skip_width: int | None = None,
    patch_size: int = 128,
    overlap: int = 32,
    batch_size: int = 8,
    val_fraction: float = 0.2,
    truth: Literal["auto", "cube", "observed"] = "auto",
    levels: Sequence[float] | None = None,
    reference_masks: str | os.PathLike[str] | None = "auto",
    augment: bool = True,
    radiometric: bool = False,
    balance: bool = False,
    in_memory: bool = True,
    num_workers: int = 0,
    threads: int | None = None,
    seed: int = 0,
    training_data: Mapping[str, Any] | None = None,
    **train_options: Any,
) -> TrainResult:
    """Train (or fine-tune) a CMSN on windows of one or more cube stores, writing checkpoints to ``out``.

    Splits each store into training rows and validation rows (the last ones, spatially held out), pools the
    stores (:meth:`StoreWindows.loaders`: new clouds and augmentation every epoch) and calls :func:`train`.

    Parameters
    ----------
    stores : str, path-like, xarray.Dataset or a sequence of them
        Zarr stores written by :func:`cmsn_cube.store.write_cube` (or cubes), each with at least three dates.
    out : str or path-like
        Checkpoint folder: ``best.pt``, ``last.pt``, their cards, ``history.json`` and ``loss.png``.
    init : str or path-like, optional
        Checkpoint path or packaged model name to fine-tune; default a new CMSN.
    width, depth, fusion_depth, skip_width : int, optional
        Architecture of a new CMSN (defaults of :class:`cmsn_cube.model.CMSN`); not allowed with ``init``.
    threads : int, optional
        Torch intra-op threads. On a CPU shared with other jobs, 1 thread plus one DataLoader worker is often
        faster than 2 threads, which stall waiting for each other.
    **train_options
        Passed to :func:`train`: ``epochs``, ``steps``, ``lr``, ``schedule``, ``loss_weights``, ``time_budget``,
        ``patience``, ``device``, ``resume``, ``progress``...

    Other Parameters
    ----------------
    patch_size, overlap, batch_size, val_fraction, truth, levels, reference_masks, augment, radiometric, balance, in_memory, num_workers, seed, training_data
        The windows and batches, each documented in :class:`StoreWindows`; ``seed`` also seeds :func:`train`.

    Returns
    -------
    TrainResult

    Raises
    ------
    CubeValidationError
        If a store is not a valid cube or architecture options are combined with ``init``.
    NoDataError
        If a store has no usable window.
    """
    from cmsn_cube.training.loop import claim_run_folder

    claim_run_folder(
        out, resume=bool(train_options.get("resume")), overwrite=bool(train_options.get("overwrite"))
    )  # before the windows are read
    stores = _store_list(stores)
    model = _initial_model(init, width=width, depth=depth, fusion_depth=fusion_depth, skip_width=skip_width)
    if threads is not None:
        torch.set_num_threads(threads)
    windows = StoreWindows(
        patch_size=patch_size, overlap=overlap, batch_size=batch_size, val_fraction=val_fraction, truth=truth,
        levels=levels, reference_masks=reference_masks, augment=augment, radiometric=radiometric, balance=balance,
        in_memory=in_memory, num_workers=num_workers, seed=seed, training_data=training_data,
    )  # fmt: skip
    train_loader, val_loader, description = windows.loaders(stores)
    return train(
        model, train_loader, val_loader, seed=seed, checkpoint_dir=out, training_data=description, **train_options
    )
