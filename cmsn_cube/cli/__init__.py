"""The ``cmsn-cube`` command line: each command is a thin call into one public function.

Heavy libraries (torch, Earth Engine, Dask distributed) are imported inside the commands that need them, so
``cmsn-cube --help`` is instant. :mod:`~cmsn_cube.cli.group` holds the click group and its one-line errors,
:mod:`~cmsn_cube.cli.options` the option types several commands share; the commands live in
:mod:`~cmsn_cube.cli.cubes` (synth, info, demo, evaluate, export), :mod:`~cmsn_cube.cli.imports` (import),
:mod:`~cmsn_cube.cli.pull` and
:mod:`~cmsn_cube.cli.network` (reconstruct, train, fit).
"""

from cmsn_cube.cli import cubes, imports, network, pull  # noqa: F401 - importing them registers their commands
from cmsn_cube.cli.group import main

__all__ = ["main"]
