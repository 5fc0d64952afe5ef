"""Option types and options that several ``cmsn-cube`` commands share."""

from __future__ import annotations

from typing import Any

import click

__all__ = ["COUNT", "POSITIVE", "SEED", "FloatList", "SeparatedList", "device_option", "workers_option"]

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


class SeparatedList(click.ParamType):
    """Comma-separated values of one type: ``W,S,E,N`` for --bbox, ``3,8,9,10`` for --cloud-values.

    Parameters
    ----------
    cast : callable
        Turns each item into a value (``float``, ``int``, ``str``); a ValueError names the option.
    count : int, optional
        The number of values required; any number when None.
    kind : str
        What the items are, for the error message.
    """

    def __init__(self, cast: Any = str, count: int | None = None, *, kind: str = "words") -> None:
        self.cast, self.count, self.kind, self.name = cast, count, kind, kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        """Return ``value`` (``"1,2,3"``, or a tuple already converted) as a tuple of its items."""
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(self.cast(v.strip()) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not comma-separated {self.kind}", param, ctx)
        if self.count is not None and len(values) != self.count:
            self.fail(f"{value!r} must have {self.count} comma-separated {self.kind}", param, ctx)
        return values


def FloatList(count: int | None = None, *, kind: str = "numbers") -> SeparatedList:  # noqa: N802 - a type's name
    """Comma-separated numbers: ``W,S,E,N`` for --bbox, ``0.25,0.15,0.10`` for --levels."""
    return SeparatedList(float, count, kind=kind)
