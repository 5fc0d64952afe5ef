"""The one rule of every writer: nothing of the user's is replaced unasked, and one run writes an output at a time.

- :func:`refuse_inside_store`: no output goes inside another Zarr store (a GeoTIFF, a checkpoint or a store
  written into a cube would corrupt it or vanish with it).
- :func:`claim_file` and :func:`claim_folder`: checked before any work starts: an existing file, or a folder
  holding any of the names a command writes, is refused without ``overwrite``.
- :func:`exclusive_writer`: a lock beside the output (``.<name>.lock``), held with ``flock`` for the whole run.
  The kernel releases it when the holder dies (kill -9 included), so a killed run leaves no lock to clear; a
  second run into the same output gets a one-line error naming the holder. Local paths only: on object stores
  (``s3://``) a single writer per output is the caller's job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cmsn_cube.exceptions import OutputExistsError, OutputLockedError, StoreError

#: Lock files this thread holds (a writer that calls another writer of the same output re-enters its lock).
_held = threading.local()


def _zarr_store_at(folder: Path) -> bool:
    return (folder / "zarr.json").is_file() or (folder / ".zgroup").is_file() or (folder / ".zarray").is_file()


def enclosing_store(path: str | os.PathLike[str]) -> str | None:
    """Return the Zarr store that a local ``path`` lies inside (a parent folder), or ``None``.

    ``path`` itself being a store does not count: a store may be replaced by a store.
    """
    from cmsn_cube.store import is_local, store_path

    text = store_path(path)
    if not is_local(text):
        return None
    for parent in Path(os.path.realpath(text)).parents:
        if _zarr_store_at(parent):
            return str(parent)
    return None


def refuse_inside_store(path: str | os.PathLike[str], *, what: str = "output") -> None:
    """Raise :class:`StoreError` if ``path`` lies inside a Zarr store."""
    store = enclosing_store(path)
    if store is not None:
        raise StoreError(f"the {what} {os.fspath(path)} is inside the Zarr store {store}: write it elsewhere")


def claim_file(path: str | os.PathLike[str], *, overwrite: bool, what: str = "output file") -> Path:
    """Check, before any work, that the file ``path`` may be written; return it.

    Raises
    ------
    StoreError
        ``path`` is a folder (a Zarr store, say) or lies inside a Zarr store.
    OutputExistsError
        A file exists at ``path`` and ``overwrite`` is not set.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    refuse_inside_store(path, what=what)
    if path.is_dir():
        kind = "a Zarr store" if _zarr_store_at(path) else "a folder"
        raise StoreError(f"the {what} {path} is {kind}, not a file: give a file path")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it, or pick another path")
    return path


def claim_folder(
    folder: str | os.PathLike[str], names: Iterable[str], *, overwrite: bool, what: str = "output folder"
) -> Path:
    """Check, before any work, that ``names`` may be written into ``folder``; return it.

    The folder may exist and hold other files; any of ``names`` already there is refused without ``overwrite``.

    Raises
    ------
    StoreError
        ``folder`` is a file, is a Zarr store, or lies inside one.
    OutputExistsError
        One of ``names`` exists in ``folder`` and ``overwrite`` is not set (the message names them).
    """
    folder = Path(os.path.expanduser(os.fspath(folder)))
    refuse_inside_store(folder, what=what)
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"the {what} {folder} is a file, not a folder")
    if _zarr_store_at(folder):
        raise StoreError(f"the {what} {folder} is a Zarr store: write into another folder")
    existing = sorted(name for name in names if (folder / name).exists())
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise OutputExistsError(
            f"{folder} already holds {shown}; pass --overwrite (overwrite=True) to replace them, or pick another folder"
        )
    return folder


def lock_path(path: str | os.PathLike[str]) -> Path:
    """Return the lock file of output ``path``: a hidden sibling, so that replacing the output leaves it in place."""
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    return target.with_name(f".{target.name}.lock")


def _holder(lock: Path, *, attempts: int = 20) -> str:
    """Name the holder of ``lock`` from what it wrote there, waiting a little for a holder that just took it."""
    for _ in range(attempts):
        try:
            facts = json.loads(lock.read_text())
            return f"process {facts['pid']} on {facts['host']} ({facts['command']}, since {facts['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)  # taken, not yet written: the holder writes its facts right after the flock
    return "another process"


@contextlib.contextmanager
def exclusive_writer(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of output ``path`` (a local file, folder or store) for the block; re-entrant in a thread.

    Raises
    ------
    StoreError
        ``path`` lies inside a Zarr store (checked first: the lock file would go into that store).
    OutputLockedError
        Another process (or thread) holds it: the message names the holder.
    """
    from cmsn_cube.store import is_local, store_path

    refuse_inside_store(path)
    text = store_path(path)
    if not is_local(text):  # no flock on object stores
        yield
        return
    lock = lock_path(text)
    held: set[str] = _held.__dict__.setdefault("locks", set())
    if str(lock) in held:
        yield
        return
    descriptor = _acquire(lock, output=text)
    held.add(str(lock))
    try:
        yield
    finally:
        held.discard(str(lock))
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()  # before the unlock: a waiting opener then sees another inode and retries
        os.close(descriptor)  # releases the flock


@contextlib.contextmanager
def claimed_output(path: str | os.PathLike[str], claim: Callable[[], object]) -> Iterator[None]:
    """Run ``claim`` (a check such as :func:`claim_folder`), then hold ``path``'s lock for the block.

    ``claim`` runs before the lock, so a refusal comes before any work and leaves no lock file, and again once the
    lock is held: another run may have written the output in between.
    """
    claim()
    with exclusive_writer(path):
        claim()
        yield


def _acquire(lock: Path, *, output: str) -> int:
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise OutputLockedError(
                f"{output} is being written by {_holder(lock)}; wait for that run to end "
                f"(its lock is {lock}, released when it exits)"
            ) from None
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)  # the previous holder removed this file as we opened it: take the new one
    facts = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "python",
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps(facts).encode())
    return descriptor
