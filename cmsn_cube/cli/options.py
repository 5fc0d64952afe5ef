"""Option types and options that several ``cmsn-cube`` commands share."""

from __future__ import annotations

from typing import Any

import click

__all__ = ["COUNT", "POSITIVE", "SEED", "FloatList", "device_option", "workers_option"]

#: Click types of the numeric options: counts and sizes at least 1, rates above 0, seeds at least 0 (numpy's
#: generators refuse negative seeds).
COUNT = click.IntRange(min=1)
POSITIVE = click.FloatRange(min=0, min_open=True)
SEED = click.IntRange(min=0)

#: ``--device`` of the commands that run the network: None leaves the choice to
#: :func:`cmsn_cube.device.default_device`.
device_option = click.option("--device", default=None, help="cpu, cuda, ... (default: CUDA when present).")


def workers_option(*, default: int | None, help: str) -> Any:
    """Return the ``--workers`` option (Dask LocalCluster worker processes, at least 1)."""
    return click.option("--workers", type=COUNT, default=default, help=help)


class FloatList(click.ParamType):
    """Comma-separated floats: ``W,S,E,N`` for --bbox, ``0.25,0.15,0.10`` for --levels.

    Parameters
    ----------
    count : int, optional
        The number of values required; any number when None.
    """

    name = "floats"

    def __init__(self, count: int | None = None) -> None:
        self.count = count

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        """Return ``value`` (``"1,2,3"``, or a tuple already converted) as a tuple of floats."""
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(float(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not comma-separated numbers", param, ctx)
        if self.count is not None and len(values) != self.count:
            self.fail(f"{value!r} must have {self.count} comma-separated numbers (W,S,E,N in degrees)", param, ctx)
        return values
