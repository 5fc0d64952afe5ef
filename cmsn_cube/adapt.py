"""Adapt a trained CMSN to one scene from that scene's own clear pixels (``ds.cmsn.fit()``).

Every cube carries its own supervision: its clear pixels. Pasting the cube's own cloud shapes onto them gives
input/truth pairs from the scene itself (:class:`cmsn_cube.samples.TripletWindowDataset` with
``truth="observed"``), so a checkpoint trained elsewhere can be fine-tuned to a new region, sensor or season
without a labelled dataset.

How the scene is split
----------------------
The last rows of the cube (``validation_fraction``) are a spatial hold-out block, separated from the training
rows by a gap of one window overlap (:func:`cmsn_cube.samples.split_rows`). The two loaders are built on two
*crops* of the cube, so the training loader cannot read a single pixel of the validation block, not even its
cloud masks as paste shapes. Validation decides early stopping and which weights are kept; when no fine-tuned
state beats the source checkpoint on the hold-out block, the source weights are returned unchanged, so a fit
never makes the model worse there.

Laziness: a store (local or fsspec URL) is opened lazily; building the sampler reads the masks once, then each
training item reads only its window. Training runs in this process (CUDA when present).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from cmsn_cube.device import leaves_global_state
from cmsn_cube.exceptions import CheckpointError, DimensionError, NoDataError
from cmsn_cube.qa import ensure_cloud_mask

if TYPE_CHECKING:  # torch loads only when fit runs
    from cmsn_cube.clouds import MaskSource
    from cmsn_cube.model.cmsn import CMSN

__all__ = ["FitOptions", "FitResult", "fit", "fitted_path", "holdout_split", "PATCH_SIZES"]

#: Window sides tried, largest first, when ``patch_size`` is None: 64 px keeps a CPU step well under a second
#: for the packaged model while giving the 1/4-resolution branch a 16 x 16 context.
PATCH_SIZES: tuple[int, ...] = (64, 48, 40, 32, 24, 20, 16)
#: Validation windows evaluated per round at most (evenly spread over the block): bounds validation cost on
#: large scenes.
MAX_VALIDATION_WINDOWS = 48


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    model : CMSN
        The adapted model (eval mode, CPU or the training device); the source weights when fine-tuning did not
        beat them on the hold-out block.
    checkpoint : pathlib.Path
        The saved checkpoint; its JSON card lies next to it (``.json``).
    card : dict
        The ``adaptation`` section of the card: source checkpoint and its sha256, cube, split, steps, wall time,
        validation PSNR/SSIM in cloudy pixels before and after.
    before, after : dict of str to float
        Hold-out validation metrics of the source and of the returned model (``psnr_cloudy`` in dB,
        ``ssim_cloudy``, ``mae_cloudy``...).
    steps : int
        Optimizer steps done.
    elapsed_s : float
        Wall-clock seconds of the whole fit (sampler, validation, training, saving).
    stop_reason : str
        ``completed``, ``early_stopping`` or ``time_budget``.
    history : dict
        Training and validation history (see :class:`cmsn_cube.train.TrainResult`).
    """

    model: CMSN
    checkpoint: Path
    card: dict[str, Any]
    before: dict[str, float]
    after: dict[str, float]
    steps: int
    elapsed_s: float
    stop_reason: str
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    @property
    def gain_db(self) -> float:
        """Cloudy-pixel PSNR gain on the hold-out block, after minus before (dB)."""
        return self.after["psnr_cloudy"] - self.before["psnr_cloudy"]

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"fitted {self.card['source']['name']} in {self.elapsed_s:.0f} s ({self.steps} steps, {self.stop_reason}); "
            f"hold-out cloudy PSNR {self.before['psnr_cloudy']:.2f} -> {self.after['psnr_cloudy']:.2f} dB "
            f"({self.gain_db:+.2f} dB), SSIM {self.before['ssim_cloudy']:.4f} -> {self.after['ssim_cloudy']:.4f}; "
            f"saved {self.checkpoint}"
        )


# --------------------------------------------------------------------------------------------------- helpers


def fitted_path(store: str | os.PathLike[str]) -> Path:
    """Default checkpoint path for a fit of ``store``: ``<store without .zarr>-fitted.pt`` beside a local store.

    For a remote store (``s3://bucket/scene.zarr``) the file goes to the working directory
    (``scene-fitted.pt``): checkpoints are small local files that :func:`cmsn_cube.inference.reconstruct` reads.

    Examples
    --------
    >>> fitted_path("stores/wuhan.zarr").as_posix()
    'stores/wuhan-fitted.pt'
    """
    text = os.fspath(store).rstrip("/")
    name = text.rsplit("/", 1)[-1].removesuffix(".zarr") + "-fitted.pt"
    return Path(name) if "://" in text else Path(text).with_name(name)


def _open(cube_or_store: xr.Dataset | str | os.PathLike[str]) -> tuple[xr.Dataset, str]:
    from cmsn_cube.store import open_cube

    if isinstance(cube_or_store, xr.Dataset):
        cube, name = cube_or_store, str(cube_or_store.attrs.get("source", "in-memory cube"))
    else:
        cube, name = open_cube(cube_or_store), os.fspath(cube_or_store)
    cube = ensure_cloud_mask(cube, min_dates=3)
    # the embedded scene's truth must not leak into a self-supervised fit
    return cube.drop_vars([v for v in ("truth", "land_cover") if v in cube.data_vars]), name


def _choose_patch(height: int, width: int, *, validation_fraction: float, patch_size: int | None) -> int:
    from cmsn_cube.samples import split_rows

    candidates = (patch_size,) if patch_size is not None else PATCH_SIZES
    for size in candidates:
        if size > width:
            continue
        try:
            split_rows(height, size=size, val_fraction=validation_fraction, gap=_overlap(size))
        except DimensionError:
            continue
        return size
    smallest = candidates[-1]
    raise DimensionError(
        f"the cube ({height} x {width} px) is too small to hold out a validation block: {smallest}-px windows "
        f"need at least {2 * smallest + _overlap(smallest)} rows and {smallest} columns"
        + ("" if patch_size is None else "; pass a smaller patch_size")
    )


def _overlap(size: int) -> int:
    return size // 4


def holdout_split(
    cube: xr.Dataset, *, patch_size: int, validation_fraction: float = 0.2
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows of the training and the validation block of ``cube`` for windows of ``patch_size``.

    The validation block is the last rows; a gap of ``patch_size // 4`` rows separates it from the training
    rows (see :func:`cmsn_cube.samples.split_rows`).

    Returns
    -------
    tuple
        ``((0, train_stop), (val_first, height))`` in row positions.

    Raises
    ------
    DimensionError
        The cube is too small for two blocks of at least one window each.
    """
    from cmsn_cube.samples import split_rows

    return split_rows(cube.sizes["y"], size=patch_size, val_fraction=validation_fraction, gap=_overlap(patch_size))


def _check_clear(cube: xr.Dataset) -> None:
    # the mask alone is a cheap (boolean) read; no-data windows are skipped later by the sampler
    n_clear = int((~cube["cloud_mask"]).sum())
    if n_clear == 0:
        raise NoDataError(
            "the cube has no clear pixel at all (cloud_mask is True everywhere): fit learns from a cube's own clear "
            "pixels; add clearer dates or fit on another cube of the region"
        )


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """The options of :func:`fit` (which sets their defaults), checked when built.

    Attributes
    ----------
    steps : int
        Optimizer steps at most.
    time_budget : float or None
        Wall-clock seconds for the whole fit; training stops cleanly (validating once more) when it is spent.
    lr : float
        Peak AdamW learning rate (cosine schedule with a short warm-up). Measured with the packaged checkpoint
        (``pipelines/adapt_unseen.py``): on the CBERS series 5e-4 gained +1.63 dB in cloudy pixels, 2e-3
        +1.23 dB; on an unseen embedded scene 2e-3 lost 1.49 dB on the real clouds while its pasted-cloud
        hold-out still improved, and 5e-4 kept the source (no hold-out gain).
    seed : int
        Seeds the pasted clouds, the shuffle, the augmentation and torch.
    patch_size : int or None
        Window side in pixels; None: the largest of :data:`PATCH_SIZES` that leaves room for a validation block.
    batch_size : int
        Windows per optimizer step.
    validation_fraction : float
        Share of the rows (the last ones) held out for validation.
    patience : int or None
        Stop after this many validation rounds without a better hold-out PSNR; None disables early stopping.
    validate_every : int
        Optimizer steps per validation round.
    sources : sequence of {"store", "reference"}
        Where pasted cloud shapes come from: ``store`` = the cube's own cloud masks (of other dates/windows of the
        training block), ``reference`` = the shared UKIS Landsat masks; fractal shapes fill in when none fits.
    augment : bool
        Random quarter turns and flips of the training batches.
    out : str, path-like or None
        Checkpoint path (``.pt``; the card goes next to it as ``.json``). None: a new temporary folder, so a
        fit never writes next to a (possibly remote or read-only) store unless asked; see :func:`fitted_path`
        for the CLI's default.
    overwrite : bool
        Replace a checkpoint (or card) already at ``out``; without it one there is an error, raised before the fit.
    device : str or None
        ``"cpu"``, ``"cuda"``...; None: CUDA when present.
    progress : bool
        Show a progress bar and per-round validation lines.

    Raises
    ------
    ValueError
        ``steps``, ``validate_every`` or ``batch_size`` is below 1.
    """

    steps: int
    time_budget: float | None
    lr: float
    seed: int
    patch_size: int | None
    batch_size: int
    validation_fraction: float
    patience: int | None
    validate_every: int
    sources: Sequence[MaskSource]
    augment: bool
    out: str | os.PathLike[str] | None
    overwrite: bool
    device: str | None
    progress: bool

    def __post_init__(self) -> None:
        if self.steps < 1 or self.validate_every < 1 or self.batch_size < 1:
            raise ValueError(
                "steps, validate_every and batch_size must be >= 1, "
                f"got {self.steps}, {self.validate_every}, {self.batch_size}"
            )

    def card(self) -> dict[str, Any]:
        """Return the options as the ``adaptation`` section of the checkpoint card records them."""
        names = ("steps", "time_budget", "lr", "seed", "batch_size", "validation_fraction", "patience")
        return {
            **{name: getattr(self, name) for name in names},
            "validate_every": self.validate_every,
            "sources": list(self.sources),
            "augment": self.augment,
        }


def _fit_loaders(cube: xr.Dataset, *, patch_size: int, options: FitOptions) -> tuple[Any, Any, dict[str, Any]]:
    """Build rounds of training batches (one per validation), the validation loader, and the split's card entry."""
    from cmsn_cube.training.loaders import Rounds, epoch_loader, holdout_datasets, validation_loader

    holdout = holdout_datasets(
        cube, size=patch_size, overlap=_overlap(patch_size), val_fraction=options.validation_fraction,
        seed=options.seed, truth="observed", sources=tuple(options.sources),
        reference_masks="auto" if "reference" in options.sources else None,
        crop=True,  # crops, not rows: the training sampler cannot even borrow the validation block's cloud shapes
    )  # fmt: skip
    batches = epoch_loader([holdout.train], batch_size=options.batch_size, seed=options.seed, augment=options.augment)
    val_loader = validation_loader(
        [holdout.validation], batch_size=options.batch_size, max_windows=MAX_VALIDATION_WINDOWS
    )
    split = {
        "patch_size": patch_size,
        "train_rows": list(holdout.train_rows),
        "validation_rows": list(holdout.validation_rows),
        "train_windows": len(holdout.train),
        "validation_windows": len(val_loader.dataset),  # type: ignore[arg-type]
    }
    return Rounds(batches, batches=min(options.validate_every, options.steps)), val_loader, split


def _source(model: str | os.PathLike[str] | CMSN | None) -> tuple[CMSN, dict[str, Any]]:
    """Copy the source model and describe it (name, sha256 of the checkpoint file)."""
    import torch

    from cmsn_cube.inference import DEFAULT_MODEL, model_spec
    from cmsn_cube.model.checkpoint import WEIGHTS_DIR, file_sha256, load_model, model_card

    if isinstance(model, torch.nn.Module):
        # an in-memory model has no file: the digest of its serialised weights identifies it
        return copy.deepcopy(model).cpu(), {"name": "in-memory model", "sha256": model_spec(model).sha256}
    name = DEFAULT_MODEL if model is None else model
    fitted = load_model(name)  # verifies the checkpoint; a fresh object, so the source file is never touched
    path = Path(name) if Path(name).is_file() else WEIGHTS_DIR / f"{os.fspath(name)}.pt"
    try:
        card = model_card(path)
    except CheckpointError:  # no card next to a bare checkpoint: hash the file itself
        card = {"sha256": file_sha256(path)}
    described = {"name": os.fspath(name), "path": str(path.resolve()), "sha256": card["sha256"]}
    # fine-tune with the loss the source was trained with (its card records it)
    weights = (card.get("training") or {}).get("loss_weights")
    if weights:
        described["loss_weights"] = dict(weights)
    return fitted, described


def _describe(cube: xr.Dataset, name: str) -> dict[str, Any]:
    from cmsn_cube.cube import crs_of

    crs = crs_of(cube)
    sensors = [str(s) for s in cube["sensor"].values] if "sensor" in cube.coords else []
    return {
        "name": name,
        "dates": [str(np.datetime_as_string(t, unit="D")) for t in cube["time"].values],
        "sensors": sorted(set(sensors)),
        "size": {"time": int(cube.sizes["time"]), "y": int(cube.sizes["y"]), "x": int(cube.sizes["x"])},
        "crs": None if crs is None else str(crs),
        "bounds": [float(cube.x.min()), float(cube.y.min()), float(cube.x.max()), float(cube.y.max())],
    }


def _plain(metrics: Mapping[str, float]) -> dict[str, float]:
    # JSON has no inf/nan: PSNR of a perfect fit is inf
    return {k: (float(v) if math.isfinite(float(v)) else str(v)) for k, v in metrics.items()}  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ public API


@leaves_global_state
def fit(
    cube_or_store: xr.Dataset | str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | CMSN | None = None,
    steps: int = 1000,
    time_budget: float | None = 240.0,
    lr: float = 5e-4,
    seed: int = 0,
    patch_size: int | None = None,
    batch_size: int = 4,
    validation_fraction: float = 0.2,
    patience: int | None = 5,
    validate_every: int = 50,
    sources: Sequence[MaskSource] = ("store",),
    augment: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> FitResult:
    """Fine-tune a copy of a checkpoint on one cube, from the cube's own clear pixels and cloud shapes.

    Parameters
    ----------
    cube_or_store : xarray.Dataset, str or path-like
        A cube with ``reflectance`` and ``cloud_mask`` (or ``qa_pixel``), at least 3 dates, or the path/URL of a
        Zarr store written by :func:`cmsn_cube.store.write_cube` (opened lazily). A ``truth`` variable is ignored.
    model : str, path-like, CMSN or None
        Source checkpoint path, packaged name, or in-memory model (copied, never changed); default the packaged
        :data:`cmsn_cube.inference.DEFAULT_MODEL`.

    Other Parameters
    ----------------
    steps, time_budget, lr, seed, patch_size, batch_size, validation_fraction, patience, validate_every, sources, augment, out, overwrite, device, progress
        The options of the fit, each documented (and checked) in :class:`FitOptions`.

    Returns
    -------
    FitResult

    Raises
    ------
    NoDataError
        The cube has no clear pixel, or no window of the training or validation block has one.
    DimensionError
        Fewer than 3 dates, or the cube is too small to hold a training and a validation block.
    CubeValidationError
        The cube does not follow the schema.
    UnknownModelError, CheckpointError, BandMismatchError
        The source checkpoint cannot be used.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from cmsn_cube.model import CMSN
    >>> from cmsn_cube.testing import tiny_scene
    >>> result = fit(tiny_scene(size=80), model=CMSN(width=4, depth=1, fusion_depth=0, skip_width=2),
    ...              steps=2, validate_every=1, patch_size=32, progress=False,
    ...              out=pathlib.Path(tempfile.mkdtemp()) / "fitted.pt")
    >>> result.card["source"]["name"], result.steps
    ('in-memory model', 2)
    """
    options = FitOptions(
        steps=steps, time_budget=time_budget, lr=lr, seed=seed, patch_size=patch_size, batch_size=batch_size,
        validation_fraction=validation_fraction, patience=patience, validate_every=validate_every,
        sources=sources, augment=augment, out=out, overwrite=overwrite, device=device, progress=progress,
    )  # fmt: skip
    from cmsn_cube.model.checkpoint import claim_checkpoint
    from cmsn_cube.outputs import claimed_output

    if out is None:
        return _fit(cube_or_store, model, options)
    with claimed_output(out, lambda: claim_checkpoint(out, overwrite=overwrite)):  # before any work
        return _fit(cube_or_store, model, options)


def _fit(cube_or_store: xr.Dataset | str | os.PathLike[str], model: Any, options: FitOptions) -> FitResult:
    """Fit as :func:`fit` describes: split, measure the source, fine-tune, keep the better, save."""
    from cmsn_cube.device import default_device
    from cmsn_cube.model.checkpoint import save_checkpoint
    from cmsn_cube.train import evaluate_batches, train

    started = time.monotonic()
    cube, name = _open(cube_or_store)
    height, width = cube.sizes["y"], cube.sizes["x"]
    patch = _choose_patch(height, width, validation_fraction=options.validation_fraction, patch_size=options.patch_size)
    _check_clear(cube)
    train_loader, val_loader, split = _fit_loaders(cube, patch_size=patch, options=options)
    device = default_device(options.device)
    source_model, source = _source(model)
    weights = source.get("loss_weights")
    before = evaluate_batches(source_model.to(device), val_loader, loss_weights=weights, device=device)
    source_state = {k: v.detach().cpu().clone() for k, v in source_model.state_dict().items()}
    budget = options.time_budget
    result = train(
        source_model, train_loader, val_loader, steps=options.steps, lr=options.lr, seed=options.seed,
        device=device, time_budget=None if budget is None else max(1.0, budget - (time.monotonic() - started)),
        patience=options.patience, warmup_steps=min(20, max(1, options.steps // 10)), loss_weights=weights,
        training_data={"adaptation_of": source["name"], "cube": name}, progress=options.progress,
    )  # fmt: skip
    fitted = result.model
    after = dict(result.best_metrics or before)
    improved = after.get("psnr_cloudy", -math.inf) > before["psnr_cloudy"]
    if not improved:
        # never hand back a model that is worse on the hold-out block than the one we started from
        fitted.load_state_dict(source_state)
        after = dict(before)
    fitted.eval()
    adaptation = {
        "source": source,
        "cube": _describe(cube, name),
        "split": split,
        "options": options.card(),
        "steps": result.steps,
        "stop_reason": result.stop_reason,
        "wall_time_s": round(time.monotonic() - started, 1),
        "device": result.device,
        "improved": improved,
        "validation": {"before": _plain(before), "after": _plain(after)},
    }
    path = Path(options.out) if options.out is not None else Path(tempfile.mkdtemp(prefix="cmsn-fit-")) / "fitted.pt"
    metadata = {"adaptation": adaptation, "metrics": _plain(after), "training": dict(result.extra.get("run", {}))}
    save_checkpoint(path, fitted, metadata=metadata, overwrite=options.overwrite)
    if options.progress:
        print(f"hold-out cloudy PSNR {before['psnr_cloudy']:.2f} -> {after['psnr_cloudy']:.2f} dB; saved {path}")
    return FitResult(
        model=fitted, checkpoint=path, card=adaptation, before=before, after=after, steps=result.steps,
        elapsed_s=time.monotonic() - started, stop_reason=result.stop_reason, history=result.history,
    )  # fmt: skip
