"""Checkpoints: save, verify, load, and a registry of packaged weights by name.

A checkpoint is a ``torch.save`` file holding only plain data (loadable with ``weights_only=True``)::

    {"format": "cmsn-cube-checkpoint", "format_version": 1,
     "config": {...},            # CMSN constructor arguments + "architecture"
     "state_dict": {...},        # float tensors
     "state_sha256": "...",      # digest of the tensors, so a re-saved altered state is caught without a card
     "metadata": {...},          # training data, steps, metrics... (JSON-serialisable)
     "training_state": {...}}    # optional: optimizer, step, RNG states (for --resume)

Next to ``<name>.pt`` lies its card ``<name>.json`` (architecture, bands, normalisation, training, metrics and
the sha256 of the ``.pt`` file). Packaged weights live in ``cmsn_cube/weights/`` and are reached by name
(:func:`list_models`, :func:`load_model`), as TorchGeo's weight registry does.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cmsn_cube.cube import BANDS
from cmsn_cube.exceptions import BandMismatchError, CheckpointError, CheckpointNotFoundError, UnknownModelError
from cmsn_cube.model.cmsn import ARCHITECTURE, CMSN

__all__ = [
    "CHECKPOINT_FORMAT",
    "WEIGHTS_DIR",
    "build_model",
    "file_sha256",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_card",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "cmsn-cube-checkpoint"
FORMAT_VERSION = 1
#: Folder of the packaged weights (``<name>.pt`` + ``<name>.json``).
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

PathLike = str | os.PathLike[str]


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _card_path(checkpoint_path: Path) -> Path:
    return checkpoint_path.with_suffix(".json")


def _atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temporary file in ``path``'s folder, then rename it over ``path``.

    A crash mid-write leaves the previous file intact (``os.replace`` is atomic on one file system). The file is
    created with mode ``0o666``, which the kernel narrows by the umask as for any new file (``mkstemp`` would
    make it private, ``0o600``); reading the umask would mean setting it, a global change.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: PathLike,
    model: CMSN,
    *,
    metadata: Mapping[str, Any] | None = None,
    training_state: Mapping[str, Any] | None = None,
    write_card: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and optionally the training state) atomically, with its JSON card.

    Parameters
    ----------
    path : str or path-like
        Destination ``.pt`` file; the card goes to the same path with a ``.json`` suffix.
    model : CMSN
        The model; its ``config`` is stored so :func:`load_model` can rebuild it.
    metadata : mapping, optional
        JSON-serialisable facts for the card (training data, steps, duration, metrics, device...).
    training_state : mapping, optional
        Optimizer state, step, RNG states... for resuming; tensors and plain data only.
    write_card : bool
        Write ``<path>.json`` with the sha256 of the weights file.
    overwrite : bool
        Replace an existing checkpoint (or card) at ``path``; without it an existing one is an error.

    Returns
    -------
    pathlib.Path
        The checkpoint path.

    Raises
    ------
    CheckpointError
        If ``metadata`` is not JSON-serialisable or ``model`` has no ``config``.
    OutputExistsError
        ``path`` or its card exists and ``overwrite`` is not set.
    StoreError
        ``path`` is a folder or lies inside a Zarr store.
    """
    path = claim_checkpoint(path, overwrite=overwrite)
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping) or config.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"model has no CMSN config (architecture {ARCHITECTURE!r}); cannot save it")
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except TypeError as error:
        raise CheckpointError(f"metadata must be JSON-serialisable (str, numbers, lists, dicts): {error}") from None
    state_dict = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": dict(config),
        "state_dict": state_dict,
        "state_sha256": _state_sha256(state_dict),
        "metadata": metadata,
    }
    if training_state is not None:
        payload["training_state"] = dict(training_state)
    _atomic_write_bytes(path, lambda stream: torch.save(payload, stream))
    if write_card:
        card = {
            "name": path.stem,
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "weights_file": path.name,
            "sha256": file_sha256(path),
            "architecture": config["architecture"],
            "bands": list(config["bands"]),
            "normalisation": {"band_mean": config["band_mean"], "band_std": config["band_std"]},
            "num_parameters": sum(value.numel() for value in model.parameters()),
            "config": dict(config),
            **metadata,
        }
        text = json.dumps(card, indent=2, sort_keys=False) + "\n"
        _atomic_write_bytes(_card_path(path), lambda stream: stream.write(text.encode()))
    return path


def claim_checkpoint(path: PathLike, *, overwrite: bool) -> Path:
    """Check that a checkpoint and its card may be written at ``path`` (before any training); return the path."""
    from cmsn_cube.outputs import claim_file

    path = claim_file(path, overwrite=overwrite, what="checkpoint")
    claim_file(_card_path(path), overwrite=overwrite, what="checkpoint card")
    return path


def list_models() -> list[str]:
    """Names of the packaged checkpoints (those with a ``.pt`` file and a card in :data:`WEIGHTS_DIR`)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(card.stem for card in WEIGHTS_DIR.glob("*.json") if card.with_suffix(".pt").is_file())


def _resolve(path_or_name: PathLike) -> tuple[Path, bool]:
    """Return the checkpoint path and whether it came from the registry."""
    candidate = Path(path_or_name)
    if candidate.is_file():
        return candidate, False
    text = os.fspath(path_or_name)
    looks_like_name = candidate.suffix == "" and os.sep not in text and "/" not in text
    if candidate.is_dir() and not (looks_like_name and (WEIGHTS_DIR / f"{text}.pt").is_file()):
        inside = sorted(p.name for p in candidate.glob("*.pt"))
        hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
        raise CheckpointError(f"{text} is a directory, not a checkpoint file: give the path of a .pt file{hint}")
    if looks_like_name:
        registered = WEIGHTS_DIR / f"{text}.pt"
        if registered.is_file():
            return registered, True
        available = list_models()
        raise UnknownModelError(
            f"no packaged model named {text!r}; available: {available or 'none'} (or pass the path of a .pt checkpoint)"
        )
    raise CheckpointNotFoundError(
        f"checkpoint file not found: {text} (give a .pt path or a packaged name: {', '.join(list_models()) or 'none'})"
    )


def model_card(path_or_name: PathLike) -> dict[str, Any]:
    """Read the JSON card of a packaged model name or of a checkpoint path.

    Raises
    ------
    UnknownModelError
        If a name is not registered.
    CheckpointError
        If the card is missing or not valid JSON.
    """
    path, _ = _resolve(path_or_name)
    card_path = _card_path(path)
    if not card_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no card {card_path.name}")
    try:
        return json.loads(card_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"card {card_path} is not valid JSON: {error}") from None


def load_checkpoint(path_or_name: PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint payload (see the module docstring for its layout).

    The file is read with ``torch.load(..., weights_only=True)``, so no code inside it can run. When a card
    lies next to the file (always for packaged weights) its sha256 must match the file.

    Parameters
    ----------
    path_or_name : str or path-like
        A ``.pt`` path or the name of a packaged model.
    map_location : str or torch.device
        Where tensors are loaded.

    Returns
    -------
    dict
        The payload.

    Raises
    ------
    UnknownModelError
        If a name is not registered.
    CheckpointError
        If the file is not a cmsn-cube checkpoint, its bytes do not match its card, or its tensors do not
        match their recorded digest.
    """
    path, registered = _resolve(path_or_name)
    card_path = _card_path(path)
    if registered and not card_path.is_file():
        raise CheckpointError(f"packaged model {path.stem!r} has no card {card_path}; the package is incomplete")
    if card_path.is_file():
        card = model_card(path)
        expected = card.get("sha256")
        actual = file_sha256(path)
        if expected != actual:
            raise CheckpointError(
                f"checkpoint {path} does not match its card {card_path.name}: sha256 {actual} != {expected}. "
                "The file was modified or corrupted; re-download or re-save it with save_checkpoint"
            )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise
    except (OSError, EOFError, RuntimeError) as error:  # a zip archive cut short: [Errno 22], "failed finding..."
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch file ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:120]}); copy or save it again (cmsn_cube.model.save_checkpoint)"
        ) from None
    except (pickle.UnpicklingError, ValueError, AttributeError, TypeError) as error:
        raise CheckpointError(
            f"{path} is not a loadable cmsn-cube checkpoint: torch.load(weights_only=True) refused it "
            f"({type(error).__name__}). Only files written by cmsn_cube.model.save_checkpoint are accepted"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            hint = " It looks like a bare state_dict: save models with cmsn_cube.model.save_checkpoint."
        raise CheckpointError(f"{path} is not a cmsn-cube checkpoint (no format {CHECKPOINT_FORMAT!r}).{hint}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {payload.get('format_version')!r}; this cmsn-cube reads "
            f"version {FORMAT_VERSION}"
        )
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} has no valid state_dict")
    if payload.get("state_sha256") != _state_sha256(state_dict):
        raise CheckpointError(
            f"the weights in {path} do not match their recorded digest: the checkpoint was altered after saving"
        )
    check_finite_weights(state_dict, path)
    return payload


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], source: PathLike) -> None:
    """Raise :class:`CheckpointError` if weights hold NaN or infinity (every pixel filled would be NaN or wrong)."""
    bad = {
        key: int((~torch.isfinite(tensor)).sum())
        for key, tensor in state_dict.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    }
    if bad:
        first = next(iter(bad))
        raise CheckpointError(
            f"checkpoint {os.fspath(source)} has non-finite weights: {bad[first]} NaN/inf values in {first!r}"
            + (f" and in {len(bad) - 1} more tensors" if len(bad) > 1 else "")
            + "; the training that wrote it diverged: use another checkpoint"
        )


def build_model(config: Mapping[str, Any]) -> CMSN:
    """Rebuild an (untrained) :class:`CMSN` from its ``config``.

    Raises
    ------
    CheckpointError
        If the config names another architecture or carries unknown options.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"model config must be a mapping, got {type(config).__name__}")
    architecture = config.get("architecture")
    if architecture != ARCHITECTURE:
        raise CheckpointError(
            f"checkpoint architecture is {architecture!r}, this cmsn-cube builds {ARCHITECTURE!r}; "
            "use the cmsn-cube version that wrote it or retrain"
        )
    accepted = set(inspect.signature(CMSN.__init__).parameters) - {"self"}
    options = {key: value for key, value in config.items() if key != "architecture"}
    options.setdefault("prior", "mean")  # configs written before priors were selectable used the temporal mean
    # configs written before these options: a coarse regression grid and fixed band statistics
    options.setdefault("prior_factor", 4)
    options.setdefault("normalisation", "fixed")
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise CheckpointError(f"checkpoint config has options this CMSN does not know: {unknown}")
    try:
        return CMSN(**options)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint config cannot build a CMSN: {error}") from None


def load_model(
    path_or_name: PathLike,
    *,
    bands: Sequence[str] | None = BANDS,
    device: str | torch.device = "cpu",
) -> CMSN:
    """Load a CMSN from a checkpoint path or a packaged model name, in eval mode.

    Parameters
    ----------
    path_or_name : str or path-like
        A ``.pt`` checkpoint (e.g. ``checkpoints/best.pt``) or a name from :func:`list_models`.
    bands : sequence of str or None
        Band order the caller will feed (default: the cube's ``blue, green, red, nir``); ``None`` skips the
        check.
    device : str or torch.device
        Device of the returned model.

    Returns
    -------
    CMSN

    Raises
    ------
    UnknownModelError
        If a name is not registered.
    CheckpointError
        If the file is foreign, tampered with, or of another architecture.
    BandMismatchError
        If the checkpoint was trained on other bands or another band order.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> net = CMSN(width=4, depth=1, fusion_depth=0, skip_width=2)
    >>> path = save_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "tiny.pt", net)
    >>> load_model(path).config == net.config
    True
    """
    payload = load_checkpoint(path_or_name, map_location="cpu")
    config: Any = payload.get("config")
    model = build_model(config)
    if bands is not None and list(config["bands"]) != list(bands):
        raise BandMismatchError(
            f"checkpoint {path_or_name} was trained on bands {config['bands']}, but bands {list(bands)} were "
            "requested; reorder the cube with ds.sel(band=...) to the checkpoint's order"
        )
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as error:
        details = " ".join(str(error).split())[:400]
        raise CheckpointError(f"checkpoint weights do not fit its config: {details}") from None
    return model.to(device).eval()
