"""Where models run: the default-device rule and process-wide torch state that library calls must leave alone."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from cmsn_cube.exceptions import ArgumentError

F = TypeVar("F", bound=Callable[..., Any])


def default_device(device: str | None = None) -> str:
    """``device`` or the best available: CUDA when present, else CPU.

    Raises
    ------
    ArgumentError
        ``device`` is not a torch device, or a CUDA device on a machine without one.
    """
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ArgumentError(f"{device!r} is not a torch device (cpu, cuda, cuda:1, mps...): {error}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"device {device!r} was asked for, but torch sees no CUDA GPU here; use --device cpu")
    return device


@contextmanager
def isolated_global_state() -> Iterator[None]:
    """Run a block that seeds RNGs or sets torch threads, and give the caller its own state back afterwards.

    Restored: the RNGs of ``random``, numpy and torch (CPU and CUDA), torch's intra-op threads and cuDNN flags.
    """
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002 - the legacy global RNG
    threads = torch.get_num_threads()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
        torch.set_num_threads(threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def leaves_global_state(function: F) -> F:
    """Wrap ``function`` so that it runs inside :func:`isolated_global_state` (a decorator)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with isolated_global_state():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
