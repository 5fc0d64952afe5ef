"""Whole-scene reconstruction: tiles on one global grid, blended, mapped over the scene with Dask.

How a scene is cut
------------------
Tiles of ``tile`` pixels start every ``stride = tile - overlap`` pixels on one grid that covers the whole scene
from its first pixel (mirrored past its end), and neighbouring tiles are blended over their ``overlap`` with
weights that add up to one. Each tile belongs to the block where it starts, so overlaps only reach forward.
A task is one row of tiles across a block ``chunk`` pixels wide: it reads its pixels plus the ``overlap`` after
them from the store's chunks, runs the tiles that have something to fill, and is finished with the
``overlap``-wide strips that the tasks above and to the left spilled over its start; the finished row is one
chunk of the output. No chunk waits for a chunk after it, so :func:`write_reconstruction` streams a scene
through a cluster in raster order, in memory that does not grow with the scene. The result does not depend on
the chunking: no seam at block borders, identical numbers on one thread, many threads or a cluster.

The model reaches workers as one graph key holding its weights (a few MB), loaded once per worker process and
cached there (:func:`~cmsn_cube.inference.models.model_on_worker`), not once per chunk.

The modules, in the order a reconstruction flows through them
-------------------------------------------------------------
``scene``
    :func:`reconstruct` and :func:`predict_window`, the entry points.
``inputs``
    The options and the input checked, the network's input, the input's fingerprint.
``models``
    Models as they travel to workers, and the fillers run on tiles there.
``tiling``
    Pure numpy: the tile grid, which tiles a block runs, the blend, a block finished.
``graph``
    Every Dask construct: the blocks and the strips between them, the self-check, the output arrays, the
    streamed write.
``tasks``
    What the graph's tasks run on a worker: reading a region, a block's tiles, a self-check sample.
``write``
    Zarr region by region, resumably: :func:`write_reconstruction`, :func:`reconstruction_state`.
"""

from __future__ import annotations

from cmsn_cube.device import default_device  # was importable from the single-file module
from cmsn_cube.inference.inputs import check_observed, count_observed_dates, input_fingerprint, model_inputs
from cmsn_cube.inference.models import DEFAULT_MODEL, ModelLike, ModelSpec, model_on_worker, model_spec, run_filler
from cmsn_cube.inference.scene import OUTPUT_VARIABLES, predict_window, reconstruct
from cmsn_cube.inference.tiling import (
    FILLED,
    FILLED_FLAGS,
    INVENTED,
    NO_DATA_FILLED,
    OBSERVED,
    SERIES_FILLED,
    UNOBSERVED,
    AxisTiling,
    model_channels,
    tile_gaps,
    tiles_to_run,
)
from cmsn_cube.inference.write import RECORD_ATTR, WriteState, reconstruction_state, write_reconstruction

__all__ = [
    "DEFAULT_MODEL",
    "FILLED",
    "FILLED_FLAGS",
    "INVENTED",
    "NO_DATA_FILLED",
    "OBSERVED",
    "OUTPUT_VARIABLES",
    "RECORD_ATTR",
    "SERIES_FILLED",
    "UNOBSERVED",
    "AxisTiling",
    "ModelLike",
    "ModelSpec",
    "WriteState",
    "check_observed",
    "count_observed_dates",
    "default_device",
    "input_fingerprint",
    "model_channels",
    "model_inputs",
    "model_on_worker",
    "model_spec",
    "predict_window",
    "reconstruct",
    "reconstruction_state",
    "run_filler",
    "tile_gaps",
    "tiles_to_run",
    "write_reconstruction",
]
