"""The ``cmsn-cube`` click group: one-line errors and warnings, and the exit codes of the command line."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, NoReturn

import click

from cmsn_cube.exceptions import CMSNCubeError

__all__ = ["OneLineErrorGroup", "fail", "main"]


class OneLineErrorGroup(click.Group):
    """Report every error as one line (``error: ...``) with a non-zero exit, and warnings as one line.

    No traceback wall: set ``CMSN_CUBE_DEBUG=1`` to see the traceback of an unexpected error.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command of ``ctx``, turning what it raises into one ``error:`` line and an exit code."""
        warnings.showwarning = _one_line_warning
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # a bad option value: one line too, with where to read the options
            command = error.ctx.command_path if error.ctx is not None else "cmsn-cube"
            fail(f"{' '.join(error.format_message().split())} (see `{command} --help`)", code=2)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except CMSNCubeError as error:
            fail(str(error))
        except KeyboardInterrupt:
            fail("interrupted; run the same command again to resume where it stopped", code=130)
        except Exception as error:  # a bug or an error a library raised: still one line, the traceback on request
            if os.environ.get("CMSN_CUBE_DEBUG"):
                raise
            fail(f"{type(error).__name__}: {' '.join(str(error).split())} (CMSN_CUBE_DEBUG=1 shows the traceback)")


def fail(message: str, *, code: int = 1) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code``."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
    click.secho(f"warning: {message}", fg="yellow", err=True)


@click.group(cls=OneLineErrorGroup, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cmsn-cube")
def main() -> None:
    """Remove clouds from multi-temporal Landsat cubes (xarray + Zarr + Dask + PyTorch CMSN)."""
