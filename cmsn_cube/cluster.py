"""Dask clusters: a LocalCluster of worker processes by default, or any existing scheduler by address.

Workers get the allocator settings torch needs on CPU (glibc's defaults mmap every large tensor afresh: a worker
ran 2.2x slower than the main thread here). glibc reads them only when a process starts, so they go through
Dask's ``distributed.nanny.pre-spawn-environ`` (set before the worker process is spawned), not ``env``.

They also get quieter housekeeping (:data:`WORKER_CONFIG`): a worker's statistical profiler (every 10 ms), its
event-loop tick (every 20 ms) and its system monitor (every 0.5 s) each wake a thread that takes the GIL from
the model's thread. Measured here with two 1-thread workers: 276 ms per 256 px window with Dask's defaults,
251 ms with these settings, 249 ms in plain processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cmsn_cube.exceptions import SchedulerError, check_positive

if TYPE_CHECKING:
    from distributed import Client

#: glibc: no mmap for large blocks, never trim, one arena (measured 2-2.4x faster torch on CPU).
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1"


#: Dask settings of the workers this module starts (the dashboard loses its profile tab and gets coarser
#: system plots; pass ``worker_config={}`` to :func:`get_client` to keep Dask's defaults).
WORKER_CONFIG: Mapping[str, object] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
}


def worker_environment(
    threads_per_worker: int = 1, *, worker_config: Mapping[str, object] = WORKER_CONFIG
) -> dict[str, str]:
    """Return the environment for worker processes (start the workers of an existing cluster with it too).

    It holds the allocator tuning, as many torch/BLAS threads as Dask threads, and ``worker_config`` as
    ``DASK_*`` variables.
    """
    threads = str(threads_per_worker)
    config = {
        "DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value) for key, value in worker_config.items()
    }
    return {
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", GLIBC_TUNABLES),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        **config,
    }


def get_client(
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    threads_per_worker: int = 1,
    dashboard: bool = False,
    worker_config: Mapping[str, object] = WORKER_CONFIG,
    connect_timeout: float = 5.0,
) -> Client:
    """Connect to ``scheduler`` (``tcp://host:8786``) or start a LocalCluster of worker processes.

    Parameters
    ----------
    scheduler : str, optional
        Address of an existing Dask scheduler (Kubernetes, HPC jobqueue, Coiled...). Its workers should be
        started with the environment of :func:`worker_environment`.
    workers : int, optional
        Local worker processes; default one per core divided by ``threads_per_worker``.
    threads_per_worker : int
        Threads per worker (torch uses as many).
    dashboard : bool
        Serve the Dask dashboard (its link is in ``client.dashboard_link``). Either way the scheduler's HTTP
        server takes a free port, so that two clusters never clash over port 8787.
    worker_config : mapping
        Dask settings of the local workers; default :data:`WORKER_CONFIG`, ``{}`` for Dask's own.
    connect_timeout : float
        Seconds to reach ``scheduler`` before giving up.

    Raises
    ------
    ArgumentError
        ``workers`` or ``threads_per_worker`` below 1.
    SchedulerError
        Nothing answers at ``scheduler`` within ``connect_timeout``, or what answers is not a Dask scheduler.
    """
    import dask
    from distributed import Client

    check_positive(workers=workers, threads_per_worker=threads_per_worker, connect_timeout=connect_timeout)
    if scheduler:
        return _connect(scheduler, timeout=connect_timeout)
    n_workers = workers or max(1, (os.cpu_count() or 1) // threads_per_worker)
    environment = worker_environment(threads_per_worker, worker_config=worker_config)
    spawn = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environment.items()}
    with dask.config.set({**spawn, **worker_config}):
        # the client starts the LocalCluster itself, so that closing the client closes the cluster:
        # Client(LocalCluster(...)) left the worker processes running after ``with get_client():``
        return Client(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=":0",
            scheduler_kwargs={"dashboard": dashboard},
            # a failed task's error reaches the caller as the exception itself; the workers' "Compute Failed"
            # log (level ERROR) would print it again, with the task's repr and traceback, into every command's output
            silence_logs=logging.CRITICAL,
        )


def _connect(address: str, *, timeout: float) -> Client:
    """Connect to the scheduler at ``address``, or raise a :class:`SchedulerError` within about ``timeout`` s.

    The scheduler is asked who it is first, under a deadline: Dask's own connect retries for 30 s and then
    raises a long traceback, and waits for ever on a port where something else listens (an HTTP server).
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    from distributed import Client
    from distributed.core import rpc

    async def identity() -> dict[str, object]:
        remote = rpc(address, timeout=timeout)
        try:
            return await asyncio.wait_for(remote.identity(), timeout)
        finally:
            await remote.close_rpc()

    # its own event loop in its own thread: works under a running loop too (Jupyter)
    executor = ThreadPoolExecutor(1)
    try:
        answer = executor.submit(asyncio.run, identity()).result(timeout + 1)
    except (OSError, TimeoutError, FutureTimeout) as error:
        raise SchedulerError(
            f"no Dask scheduler answered at {address} within {timeout:g} s ({type(error).__name__}"
            f"{': ' + ' '.join(str(error).split())[:200] if str(error) else ''}); check the address, or omit "
            "--scheduler to start a LocalCluster"
        ) from None
    except ValueError as error:  # a malformed address
        raise SchedulerError(f"{address!r} is not a Dask scheduler address (tcp://host:8786): {error}") from None
    finally:
        executor.shutdown(wait=False)
    if not isinstance(answer, dict) or answer.get("type") != "Scheduler":
        raise SchedulerError(f"what answers at {address} is not a Dask scheduler")
    return Client(address, timeout=f"{timeout}s")
