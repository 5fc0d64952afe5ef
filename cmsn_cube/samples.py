"""Three-date training samples: windows on xbatcher's tiling, simulated clouds on clear pixels, a torch Dataset.

Every item of :class:`TripletWindowDataset` is a dict of tensors (the model is written against it)::

    inputs       float32 (3, 5, H, W)  per date blue, green, red, nir in [0, 1] (0 where masked), then mask
                                       (1 = cloud, no data or simulated cloud; 0 = clear)
    truth        float32 (3, 4, H, W)  cloud-free reflectance, 0 where invalid
    truth_valid  bool    (3, H, W)     where ``truth`` may be scored
    sim_mask     bool    (3, H, W)     pasted (simulated) cloud pixels, all with valid truth

Truth is the observation itself at clear pixels (``truth="observed"``) or, for a cube that carries one (the
embedded scene), its ``truth`` variable (``truth="cube"``). Clouds are pasted onto clear pixels so that the
masked fraction of each date reaches its level (default 25 %, 15 %, 10 % for T1, T2, T3); the shapes come from
real cloud masks of other dates/windows of the store, from the real Landsat reference masks of
``cloud_masks_ukis``, or from fractal noise when no real mask fits (:mod:`cmsn_cube.clouds`).

What xbatcher does here, and what it does not: :func:`window_origins` runs ``xbatcher.BatchGenerator`` (with
``input_dims``/``input_overlap`` over ``y``/``x``) over a coordinate-only template of the region, so xbatcher
decides the tiling (the window starts) without touching data; the edge windows it drops (xbatcher 0.4 yields
only windows that fit whole) are added. xbatcher does not read the samples: each item slices its three dates
and its window out of the store with ``isel`` and computes them in one dask call. Through the generator, an item
would load every date of the cube (or need one generator per triplet), stack ``time`` and ``band`` into a pandas
MultiIndex ``sample`` dimension (``cloud_mask`` broadcast over the four bands) to be unstacked again, and the
edge windows would still need the direct path: on 256-px windows that read took about twice as long as the
direct one, which would eat most of the sampler's margin over a training step.

``import cmsn_cube.samples`` imports torch; :mod:`cmsn_cube.clouds` does not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr
from torch.utils.data import Dataset

from cmsn_cube.clouds import (
    DEFAULT_MASK_SOURCES,
    MaskProvider,
    MaskSource,
    is_cloud_shape,
    reference_provider,
    reshape_mask,
    resolve_reference_masks,
    simulate_clouds,
)
from cmsn_cube.cube import date_triplets, validate_cube
from cmsn_cube.exceptions import CubeValidationError, DimensionError, NoDataError
from cmsn_cube.qa import DEFAULT_CLOUD_LEVELS
from cmsn_cube.store import open_cube

TruthSource = Literal["observed", "cube"]

Window = tuple[tuple[int, int, int], int, int]  # (date triplet positions T1, T2, T3), y0, x0


# --------------------------------------------------------------------------------------------------- windows


def window_origins(
    height: int, width: int, *, size: int, overlap: int = 0, rows: tuple[int, int] | None = None
) -> list[tuple[int, int]]:
    """List the upper-left corners ``(y0, x0)`` of ``size`` x ``size`` windows that cover rows ``rows`` of a grid.

    The tiling is xbatcher's (a ``BatchGenerator`` with ``input_dims``/``input_overlap`` over y/x). xbatcher
    0.4.0 only yields windows that fit whole, so with most overlaps the last rows/columns are never sampled
    (a 1024-px axis with 256/32 stops at pixel 927). We add edge-anchored windows: when the last xbatcher
    window ends before the edge, one more start at ``edge - size`` (overlapping its neighbour more than
    ``overlap``), on both axes, so every pixel of the region is in at least one window.

    Parameters
    ----------
    height, width : int
        Grid size in pixels.
    size : int
        Window side in pixels.
    overlap : int
        Pixels shared by neighbouring windows.
    rows : tuple of int, optional
        ``(first, stop)`` rows the windows must lie in (a spatial split); default all rows.

    Examples
    --------
    >>> origins = window_origins(100, 70, size=32, overlap=8)
    >>> sorted({y for y, _ in origins}), sorted({x for _, x in origins})
    ([0, 24, 48, 68], [0, 24, 38])
    """
    from cmsn_cube.extras import require

    xbatcher = require("xbatcher", "train")

    first, stop = rows if rows is not None else (0, height)
    if not 0 <= first < stop <= height:
        raise DimensionError(f"rows {rows} do not lie within the grid's {height} rows")
    if size > stop - first or size > width:
        raise DimensionError(
            f"window size {size} does not fit the region of {stop - first} x {width} px; choose a smaller size"
        )
    if not 0 <= overlap < size:
        raise DimensionError(f"overlap must be in [0, size) = [0, {size}), got {overlap}")
    # a coordinate-only template: xbatcher tiles it without touching data (on the cube itself it would stack
    # time and band into a MultiIndex and, with concat_input_dims, fail on dask arrays)
    template = xr.Dataset(coords={"y": np.arange(first, stop), "x": np.arange(width)})
    generator = xbatcher.BatchGenerator(
        template, input_dims={"y": size, "x": size}, input_overlap={"y": overlap, "x": overlap}, preload_batch=False
    )
    starts = [(int(window["y"][0]), int(window["x"][0])) for window in generator]  # one pass: an isel per window
    starts_y, starts_x = sorted({y for y, _ in starts}), sorted({x for _, x in starts})
    if starts_y[-1] + size < stop:
        starts_y.append(stop - size)
    if starts_x[-1] + size < width:
        starts_x.append(width - size)
    return [(y0, x0) for y0 in starts_y for x0 in starts_x]


def split_rows(
    height: int, *, size: int, val_fraction: float = 0.2, gap: int = 0
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Split the rows into a training and a validation region: validation is the last rows, after ``gap`` rows.

    Windows are drawn inside each region, so no validation pixel is in any training window; the gap keeps
    the two regions from touching (neighbouring pixels are alike).

    Returns
    -------
    tuple
        ``((0, train_stop), (val_first, height))``.

    Raises
    ------
    DimensionError
        The grid is too small for two regions of at least one window each.

    Examples
    --------
    >>> split_rows(512, size=128, val_fraction=0.25, gap=32)
    ((0, 352), (384, 512))
    """
    if not 0 < val_fraction < 1:
        raise DimensionError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    val_rows = max(int(round(height * val_fraction)), size)
    train_stop = height - val_rows - gap
    if train_stop < size:
        raise DimensionError(
            f"{height} rows cannot hold a training and a validation region of {size}-px windows with a "
            f"{gap}-row gap; use a smaller size, gap or val_fraction"
        )
    return (0, train_stop), (height - val_rows, height)


def _window_sums(image: np.ndarray, origins: np.ndarray, size: int) -> np.ndarray:
    """Sum of ``image`` in every ``size`` x ``size`` window at ``origins`` (an integral image: one pass)."""
    integral = np.zeros((image.shape[0] + 1, image.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = image.cumsum(0).cumsum(1)
    y0, x0 = origins[:, 0], origins[:, 1]
    y1, x1 = y0 + size, x0 + size
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


# ----------------------------------------------------------------------------------------------- the dataset


class TripletWindowDataset(Dataset):
    """Map-style torch Dataset of three-date windows with simulated clouds (see the module docstring).

    Building it reads the cube's masks once to skip unusable windows and to index real cloud masks; items
    read only their window. Given a store path, each worker process re-opens the store lazily: nothing but
    the path and the small window index is pickled.

    Parameters
    ----------
    store : str, path-like or xarray.Dataset
        A Zarr store written by :func:`cmsn_cube.store.write_cube` (preferred), or a cube.
    size : int
        Window side in pixels.
    overlap : int
        Pixels shared by neighbouring windows.
    rows : tuple of int, optional
        ``(first, stop)`` rows the windows must lie in (see :func:`split_rows`).
    triplets : sequence of tuple, optional
        Date positions ``(T1, T2, T3)``; default every distinct triplet of :func:`cmsn_cube.cube.date_triplets`.
    levels : sequence of float
        Target masked fraction for T1, T2, T3.
    truth : {"observed", "cube"}
        Truth from the clear observation, or from the cube's ``truth`` variable.
    sources : sequence of str
        Cloud-shape sources, tried in random order, fractal last.
    reference_masks : path, "auto" or None
        Folder of UKIS ``*.npz`` reference masks; "auto" reads $CMSN_SHARED_DATA/cloud_masks_ukis when set,
        None disables them.
    max_nodata : float
        Skip windows where a date has more than this fraction of no-data pixels.
    seed : int
        Same seed, same items (in any worker).

    Attributes
    ----------
    windows : list
        ``((T1, T2, T3), y0, x0)`` per item.
    skipped : dict
        Windows skipped, by reason: ``nodata`` (mostly no data), ``no_clear`` (no pixel to score).
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | xr.Dataset,
        *,
        size: int = 256,
        overlap: int = 32,
        rows: tuple[int, int] | None = None,
        triplets: Sequence[tuple[int, int, int]] | None = None,
        levels: Sequence[float] = DEFAULT_CLOUD_LEVELS,
        truth: TruthSource = "observed",
        sources: Sequence[MaskSource] = DEFAULT_MASK_SOURCES,
        reference_masks: str | os.PathLike[str] | None = "auto",
        max_nodata: float = 0.5,
        seed: int = 0,
    ) -> None:
        self._cube: xr.Dataset | None
        if isinstance(store, xr.Dataset):
            self._path, self._cube = None, store
        else:
            self._path, self._cube = str(store), None
        cube = self.cube
        validate_cube(cube, require=("reflectance", "cloud_mask"), min_dates=3)
        if truth not in ("observed", "cube"):
            raise CubeValidationError(f"truth must be 'observed' or 'cube', got {truth!r}")
        if truth == "cube" and "truth" not in cube.data_vars:
            raise CubeValidationError(
                "truth='cube' needs a 'truth' variable (the embedded scene has one); use 'observed'"
            )
        if len(levels) != 3 or any(not 0 <= v < 1 for v in levels):
            raise CubeValidationError(f"levels must be three fractions in [0, 1) for T1, T2, T3, got {list(levels)}")
        self.size, self.overlap, self.rows = int(size), int(overlap), rows
        self.levels, self.truth, self.sources = tuple(float(v) for v in levels), truth, tuple(sources)
        self.reference_masks = resolve_reference_masks(reference_masks)
        self.max_nodata, self.seed, self.epoch = float(max_nodata), int(seed), 0
        if triplets is None:
            triplets = sorted(set(date_triplets(cube)))
        self.triplets = [tuple(int(d) for d in t) for t in triplets]
        height, width = cube.sizes["y"], cube.sizes["x"]
        self.windows, self.skipped, self._library = self._index(cube, height, width)
        if not self.windows:
            raise NoDataError(
                f"no usable window of {size} px ({self.skipped['nodata']} mostly no data, "
                f"{self.skipped['no_clear']} without a clear pixel to score)"
            )

    # -- store access: re-opened lazily in each worker process
    @property
    def cube(self) -> xr.Dataset:
        """The cube, opened from the store on first use (in each worker process)."""
        if self._cube is None:
            self._cube = open_cube(self._path)  # type: ignore[arg-type]
        return self._cube

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._path is not None:
            state["_cube"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Draw different clouds for another epoch (the same ones again for the same epoch)."""
        self.epoch = int(epoch)

    def _index(
        self, cube: xr.Dataset, height: int, width: int
    ) -> tuple[list[Window], dict[str, int], list[tuple[int, int, int]]]:
        """Usable windows per triplet, skip counts, and the windows whose real cloud masks can be pasted."""
        size = self.size
        region = np.array(window_origins(height, width, size=size, overlap=self.overlap, rows=self.rows))
        everywhere = np.array(window_origins(height, width, size=size, overlap=self.overlap))
        area = size * size
        nodata, scoreable, library = {}, {}, []
        for date in sorted({d for t in self.triplets for d in t} | set(range(cube.sizes["time"]))):
            layer = cube.isel(time=date)
            missing = ~np.isfinite(np.asarray(layer["reflectance"].values)).all(axis=0)
            cloud = np.asarray(layer["cloud_mask"].values, dtype=bool) & ~missing
            valid = ~(cloud | missing)
            if self.truth == "cube":
                valid = np.isfinite(np.asarray(layer["truth"].values)).all(axis=0)
            nodata[date] = _window_sums(missing, region, size) / area
            scoreable[date] = _window_sums(valid, region, size)
            fraction = _window_sums(cloud, everywhere, size) / area
            keep = is_cloud_shape(fraction)
            library += [(date, int(y0), int(x0)) for y0, x0 in everywhere[keep]]
        windows: list[Window] = []
        skipped = {"nodata": 0, "no_clear": 0}
        for triplet in self.triplets:
            worst = np.max([nodata[d] for d in triplet], axis=0)
            total = np.sum([scoreable[d] for d in triplet], axis=0)
            for k, (y0, x0) in enumerate(region):
                if worst[k] > self.max_nodata:
                    skipped["nodata"] += 1
                elif total[k] == 0:
                    skipped["no_clear"] += 1
                else:
                    windows.append((triplet, int(y0), int(x0)))  # type: ignore[arg-type]
        return windows, skipped, library

    def __len__(self) -> int:
        return len(self.windows)

    def _read(self, triplet: Sequence[int], y0: int, x0: int, names: Sequence[str]) -> list[np.ndarray]:
        import dask

        window = self.cube[list(names)].isel(
            time=list(triplet), y=slice(y0, y0 + self.size), x=slice(x0, x0 + self.size)
        )
        # one compute for all variables (as xbatcher's torch MapDataset does); synchronous: a worker is one core
        with dask.config.set(scheduler="synchronous"):
            return [np.asarray(a) for a in dask.compute(*[window[n].data for n in names])]

    def _store_provider(self, triplet: Sequence[int], y0: int, x0: int) -> MaskProvider | None:
        size = self.size
        # not the masks of these dates over this window: they are the real clouds already in the sample
        candidates = [
            (d, wy, wx)
            for d, wy, wx in self._library
            if not (d in triplet and abs(wy - y0) < size and abs(wx - x0) < size)
        ]
        if not candidates:
            return None

        def provide(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
            date, wy, wx = candidates[int(rng.integers(len(candidates)))]
            (mask,) = self._read([date], wy, wx, ["cloud_mask"])
            return reshape_mask(mask[0].astype(bool), shape, rng, crop=False)

        return provide

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self.windows):
            raise IndexError(f"index {index} out of range for {len(self.windows)} windows")
        triplet, y0, x0 = self.windows[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        names = ["reflectance", "cloud_mask"] + (["truth"] if self.truth == "cube" else [])
        arrays = self._read(triplet, y0, x0, names)
        reflectance, cloud = arrays[0].astype(np.float32), arrays[1].astype(bool)
        reference = arrays[2].astype(np.float32) if self.truth == "cube" else reflectance
        providers: dict[str, MaskProvider] = {}
        store = self._store_provider(triplet, y0, x0) if "store" in self.sources else None
        if store is not None:
            providers["store"] = store
        from_reference = reference_provider(self.reference_masks)
        if from_reference is not None:
            providers["reference"] = from_reference
        size = self.size
        inputs = np.zeros((3, 5, size, size), dtype=np.float32)
        truth = np.zeros((3, 4, size, size), dtype=np.float32)
        truth_valid = np.zeros((3, size, size), dtype=bool)
        sim_mask = np.zeros((3, size, size), dtype=bool)
        for j in range(3):
            masked = cloud[j] | ~np.isfinite(reflectance[j]).all(axis=0)
            valid = np.isfinite(reference[j]).all(axis=0) & (~masked if self.truth == "observed" else True)
            pasted, _ = simulate_clouds(
                ~masked & valid, int(masked.sum()), self.levels[j], rng, providers=providers, sources=self.sources
            )
            hidden = masked | pasted
            # clip: bright targets and noise leave [0, 1]; the model's contract is [0, 1] and no NaN
            inputs[j, :4] = np.where(hidden[None], 0, np.clip(np.nan_to_num(reflectance[j]), 0, 1))
            inputs[j, 4] = hidden
            truth[j] = np.where(valid[None], np.clip(np.nan_to_num(reference[j]), 0, 1), 0)
            truth_valid[j], sim_mask[j] = valid, pasted
        return {
            "inputs": torch.from_numpy(inputs),
            "truth": torch.from_numpy(truth),
            "truth_valid": torch.from_numpy(truth_valid),
            "sim_mask": torch.from_numpy(sim_mask),
        }

    def summary(self) -> str:
        """Describe in one line the windows kept and skipped."""
        return (
            f"{len(self.windows)} windows of {self.size} px over {len(self.triplets)} triplet(s); skipped "
            f"{self.skipped['nodata']} mostly no data, {self.skipped['no_clear']} without a clear pixel to score"
        )
