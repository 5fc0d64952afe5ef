"""Three-date training samples: xbatcher windows, simulated clouds on clear pixels, a torch Dataset.

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
``cloud_masks_ukis``, or from fractal noise when no real mask fits.

``import cmsn_cube.samples`` imports torch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from cmsn_cube.cube import validate_cube
from cmsn_cube.exceptions import CubeValidationError, DimensionError, NoDataError
from cmsn_cube.qa import DEFAULT_CLOUD_LEVELS, QA_BITS
from cmsn_cube.sources.synthetic import fractal_noise
from cmsn_cube.store import open_cube

TruthSource = Literal["observed", "cube"]
#: ``store``: real cloud masks of other dates/windows of the cube; ``reference``: the UKIS Landsat cloud/shadow
#: reference masks (``*.npz`` with ``msk``); ``fractal``: generated (always the last resort).
MaskSource = Literal["store", "reference", "fractal"]
DEFAULT_MASK_SOURCES: tuple[MaskSource, ...] = ("store", "reference", "fractal")

#: A real mask "fits" a window when its cover of the clear pixels is within this factor of the pixels needed;
#: it is then grown or shrunk along its distance field, which keeps its shape. Beyond this factor the shape
#: would change too much, and the next source is tried.
_FIT_FACTOR = 2.0
#: Real masks count as cloud masks only with a cloud fraction in this range (not empty, not overcast).
_LIBRARY_CLOUD_RANGE = (0.02, 0.9)
#: Attempts per real-mask source before moving on to the next source.
_TRIES = 3
#: UKIS reference classes that hide the ground: 0 cloud shadow, 4 cloud (1-3 are clear classes).
_REFERENCE_SHADOW, _REFERENCE_CLOUD = 0, 4

Window = tuple[tuple[int, int, int], int, int]  # (date triplet positions T1, T2, T3), y0, x0


# ----------------------------------------------------------------------------------------- dates and windows


def date_triplets(times: xr.Dataset | xr.DataArray | Sequence[Any] | np.ndarray) -> list[tuple[int, int, int]]:
    """For every date, the triplet of itself and its two nearest dates in time (positions, sorted in time).

    Parameters
    ----------
    times : cube, DataArray or sequence of datetime-like
        A cube (its ``time``) or the times themselves, increasing.

    Returns
    -------
    list of tuple of int
        Entry ``i`` is the triplet used to reconstruct date ``i``; ``i`` is one of its three positions.
        Ties in distance go to the earlier date.

    Examples
    --------
    >>> import numpy as np
    >>> date_triplets(np.array(["2020-01-01", "2020-01-17", "2020-02-02", "2020-04-01"], dtype="datetime64[D]"))
    [(0, 1, 2), (0, 1, 2), (0, 1, 2), (1, 2, 3)]
    """
    if isinstance(times, xr.Dataset | xr.DataArray):
        times = times["time"].values
    stamps = np.asarray(times, dtype="datetime64[ns]").astype("int64")
    if stamps.size < 3:
        raise DimensionError(f"three dates are needed to form a triplet; the cube has {stamps.size}")
    triplets = []
    for i, stamp in enumerate(stamps):
        others = sorted((abs(int(s) - int(stamp)), j) for j, s in enumerate(stamps) if j != i)
        triplets.append(tuple(sorted((i, others[0][1], others[1][1]))))
    return triplets  # type: ignore[return-value]


def window_origins(
    height: int, width: int, *, size: int, overlap: int = 0, rows: tuple[int, int] | None = None
) -> list[tuple[int, int]]:
    """Upper-left corners ``(y0, x0)`` of ``size`` x ``size`` windows that cover rows ``rows`` of a grid.

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
    starts_y = sorted({int(window["y"][0]) for window in generator})
    starts_x = sorted({int(window["x"][0]) for window in generator})
    if starts_y[-1] + size < stop:
        starts_y.append(stop - size)
    if starts_x[-1] + size < width:
        starts_x.append(width - size)
    return [(y0, x0) for y0 in starts_y for x0 in starts_x]


def split_rows(
    height: int, *, size: int, val_fraction: float = 0.2, gap: int = 0
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows of the training and validation regions: validation is the last rows, after a gap of ``gap`` rows.

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


# ---------------------------------------------------------------------------------------- cloud simulation


@functools.lru_cache(maxsize=4)
def _reference_masks(folder: str) -> tuple[np.ndarray, ...]:
    """UKIS reference masks as bool arrays: cloud + shadow, cloud only, shadow only (varied cover)."""
    masks: list[np.ndarray] = []
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path) as archive:
            if "msk" not in archive:
                continue
            classes = np.asarray(archive["msk"]).reshape(archive["msk"].shape[:2])
        cloud, shadow = classes == _REFERENCE_CLOUD, classes == _REFERENCE_SHADOW
        masks += [cloud | shadow, cloud, shadow]
    return tuple(masks)


def default_reference_masks() -> Path | None:
    """The ``cloud_masks_ukis`` folder of ``$CMSN_SHARED_DATA`` when that variable is set, else None.

    Only a folder the user names is read: nothing is looked for beside the installed package, so a seed draws
    the same clouds on every machine.
    """
    from cmsn_cube.testing import SHARED_DATA_ENV

    root = os.environ.get(SHARED_DATA_ENV)
    folder = Path(root) / "cloud_masks_ukis" if root else None
    return folder if folder is not None and folder.is_dir() else None


def _resolve_reference(reference_masks: str | os.PathLike[str] | None) -> str | None:
    if reference_masks == "auto":
        found = default_reference_masks()
        return str(found) if found is not None else None
    return str(reference_masks) if reference_masks is not None else None


def _reshape_mask(mask: np.ndarray, shape: tuple[int, int], rng: np.random.Generator, *, crop: bool) -> np.ndarray:
    """Random rotation by quarter turns (square masks), flip, crop and nearest-neighbour resampling to ``shape``."""
    if mask.shape[0] == mask.shape[1]:
        mask = np.rot90(mask, int(rng.integers(4)))
    if rng.random() < 0.5:
        mask = mask[:, ::-1]
    height, width = mask.shape
    if crop:
        # a random crop of 1/4 to all of the mask's side, so cloud sizes vary relative to the window
        side = rng.uniform(0.25, 1.0)
        crop_h, crop_w = max(1, int(height * side)), max(1, int(width * side))
        y0, x0 = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
        mask = mask[y0 : y0 + crop_h, x0 : x0 + crop_w]
        height, width = mask.shape
    rows = (np.arange(shape[0]) * height / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * width / shape[1]).astype(int)
    return mask[np.ix_(rows, cols)]


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Distance inside the mask (positive) and outside it (negative): thresholds grow or shrink the shape."""
    return (ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)).astype(np.float32)


def _fractal_cloud(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    # the embedded scene's recipe: a smooth field plus finer texture
    return fractal_noise(shape, rng, beta=3.2) + 0.35 * fractal_noise(shape, rng, beta=1.8)


MaskProvider = Callable[[np.random.Generator, tuple[int, int]], "np.ndarray | None"]


def simulate_clouds(
    pasteable: np.ndarray,
    n_masked: int,
    level: float,
    rng: np.random.Generator,
    *,
    providers: dict[str, MaskProvider] | None = None,
    sources: Sequence[MaskSource] = DEFAULT_MASK_SOURCES,
) -> tuple[np.ndarray, str]:
    """Choose simulated cloud pixels among ``pasteable`` so that ``n_masked`` + pasted = ``level`` of the image.

    A shape is taken from the first source (in random order of the real ones, fractal last) whose mask covers
    between 1/2 and 2 times the pixels needed; it is then grown or shrunk along its signed distance field
    (a smooth noise breaks ties) until exactly the needed number of pasteable pixels is covered.

    Parameters
    ----------
    pasteable : numpy.ndarray
        ``(y, x)`` bool: clear pixels with valid truth.
    n_masked : int
        Pixels already masked (real cloud or no data).
    level : float
        Target masked fraction of the whole image.
    rng : numpy.random.Generator
        Source of randomness (per item, so workers agree).
    providers : dict, optional
        ``{"store": f, "reference": g}``, each ``f(rng, shape) -> bool mask or None``.
    sources : sequence of str
        Which sources may be used.

    Returns
    -------
    tuple
        The pasted mask (a subset of ``pasteable``) and the name of the source used (``"none"`` when the real
        mask already reaches the level).
    """
    shape = pasteable.shape
    n_pixels = pasteable.size
    need = min(int(round(level * n_pixels)) - n_masked, int(pasteable.sum()))
    if need <= 0:
        return np.zeros(shape, dtype=bool), "none"
    real = [s for s in sources if s != "fractal" and providers and s in providers]
    order = [real[i] for i in rng.permutation(len(real))] + ["fractal"]
    field, used = None, "fractal"
    for source in order[:-1]:
        for _ in range(_TRIES):
            mask = providers[source](rng, shape)  # type: ignore[index]
            if mask is None:
                break
            cover = int(np.count_nonzero(mask & pasteable))
            if need / _FIT_FACTOR <= cover <= need * _FIT_FACTOR:
                field, used = _signed_distance(mask), source
                break
        if field is not None:
            break
    if field is None:
        field = _fractal_cloud(shape, rng)
        jitter = 0.05 * fractal_noise(shape, rng, beta=2.0)
    else:
        jitter = 0.7 * fractal_noise(shape, rng, beta=2.0)  # roughens the grown/shrunk edge by about a pixel
    field = field + jitter + 1e-6 * rng.random(shape, dtype=np.float32)
    values = field[pasteable]
    threshold = np.partition(values, values.size - need)[values.size - need]
    return pasteable & (field >= threshold), used


# ------------------------------------------------------------------------------------------- scoring cubes


def make_scoring_cube(
    cube: xr.Dataset,
    *,
    seed: int = 0,
    dates: Sequence[int] | None = None,
    levels: float | Sequence[float] = DEFAULT_CLOUD_LEVELS,
    sources: Sequence[MaskSource] = DEFAULT_MASK_SOURCES,
    reference_masks: str | os.PathLike[str] | None = "auto",
) -> tuple[xr.Dataset, xr.DataArray, xr.DataArray]:
    """Paste clouds on clear pixels of a cube so that any gap-filler can be scored where the truth is known.

    The cube is computed (this function's job). Pasted pixels get reflectance 0 and ``cloud_mask`` True (and
    the QA cloud bit, when ``qa_pixel`` is there), as the model's input expects.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube with ``reflectance`` and ``cloud_mask``.
    seed : int
        Same seed, same clouds.
    dates : sequence of int, optional
        Positions of the dates to paste on; default all.
    levels : float or sequence of float
        Target masked fraction (real + pasted) per chosen date, repeated cyclically.
    sources : sequence of str
        Mask sources (see :data:`MaskSource`); ``store`` uses the other dates' real masks.
    reference_masks : path, "auto" or None
        Folder of UKIS ``*.npz`` masks; "auto" reads $CMSN_SHARED_DATA/cloud_masks_ukis when set.

    Returns
    -------
    tuple
        ``(cube_with_pasted_clouds, truth, scored_mask)``: the cube (without any ``truth`` variable),
        ``truth(time, band, y, x)`` = the original observation where it was clear (NaN elsewhere), and
        ``scored(time, y, x)`` = the pasted pixels.

    Raises
    ------
    NoDataError
        No chosen date has a clear pixel to paste on.
    """
    validate_cube(cube, require=("reflectance", "cloud_mask"))
    n_dates = cube.sizes["time"]
    chosen = list(range(n_dates)) if dates is None else [int(d) for d in dates]
    if any(not 0 <= d < n_dates for d in chosen):
        raise DimensionError(f"dates {list(dates or [])} out of range for a cube of {n_dates} dates")
    level_list = [float(levels)] if np.isscalar(levels) else [float(v) for v in levels]  # type: ignore[arg-type,union-attr]
    reflectance = np.asarray(cube["reflectance"].values, dtype=np.float32)
    cloud = np.asarray(cube["cloud_mask"].values, dtype=bool)
    masked = cloud | ~np.isfinite(reflectance).all(axis=1)
    fractions = masked.mean(axis=(1, 2))
    reference = _resolve_reference(reference_masks)
    pasted = np.zeros_like(masked)
    for k, t in enumerate(chosen):
        rng = np.random.default_rng([seed, t])
        library = [
            s
            for s in range(n_dates)
            if s != t and _LIBRARY_CLOUD_RANGE[0] <= cloud[s].mean() <= _LIBRARY_CLOUD_RANGE[1]
        ]
        providers: dict[str, MaskProvider] = {}
        if library:
            providers["store"] = lambda r, sh, lib=library: _reshape_mask(  # type: ignore[misc]
                cloud[lib[int(r.integers(len(lib)))]], sh, r, crop=False
            )
        if reference is not None and _reference_masks(reference):
            providers["reference"] = _reference_provider(reference)
        pasted[t], _ = simulate_clouds(
            ~masked[t], int(masked[t].sum()), level_list[k % len(level_list)], rng, providers=providers, sources=sources
        )
    if not pasted.any() and not (~masked[chosen]).any():
        raise NoDataError("no clear pixel to paste clouds on in the chosen dates: nothing can be scored")
    dims = ("time", "band", "y", "x")
    truth = xr.DataArray(
        np.where(masked[:, None], np.nan, reflectance).astype(np.float32), dims=dims, coords=cube["reflectance"].coords
    ).rename("truth")
    scored = xr.DataArray(pasted, dims=("time", "y", "x"), coords=cube["cloud_mask"].coords).rename("scored")
    out = cube.drop_vars([v for v in ("truth",) if v in cube.data_vars]).copy()
    out["reflectance"] = (dims, np.where(pasted[:, None], np.float32(0), reflectance).astype(np.float32))
    out["cloud_mask"] = (("time", "y", "x"), cloud | pasted)
    if "qa_pixel" in out:
        qa = np.asarray(out["qa_pixel"].values, dtype=np.uint16)
        cloud_bit, clear_bit = np.uint16(1 << QA_BITS["cloud"]), np.uint16(1 << QA_BITS["clear"])
        out["qa_pixel"] = (("time", "y", "x"), np.where(pasted, (qa | cloud_bit) & ~clear_bit, qa).astype(np.uint16))
    for name in ("reflectance", "cloud_mask", "qa_pixel"):
        if name in out:
            out[name].attrs = cube[name].attrs
            out[name].encoding["grid_mapping"] = "spatial_ref"
    out.attrs.update(pasted_cloud_seed=seed, pasted_fraction=[float(v) for v in pasted.mean(axis=(1, 2))])
    out.attrs["real_cloud_fraction"] = [float(v) for v in fractions]
    return out, truth, scored


def _reference_provider(folder: str) -> MaskProvider:
    def provide(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray | None:
        masks = _reference_masks(folder)
        return _reshape_mask(masks[int(rng.integers(len(masks)))], shape, rng, crop=True) if masks else None

    return provide


# ----------------------------------------------------------------------------------------------- the dataset


def _window_sums(image: np.ndarray, origins: np.ndarray, size: int) -> np.ndarray:
    """Sum of ``image`` in every ``size`` x ``size`` window at ``origins`` (an integral image: one pass)."""
    integral = np.zeros((image.shape[0] + 1, image.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = image.cumsum(0).cumsum(1)
    y0, x0 = origins[:, 0], origins[:, 1]
    y1, x1 = y0 + size, x0 + size
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


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
        Date positions ``(T1, T2, T3)``; default every distinct triplet of :func:`date_triplets`.
    levels : sequence of float
        Target masked fraction for T1, T2, T3.
    truth : {"observed", "cube"}
        Truth from the clear observation, or from the cube's ``truth`` variable.
    sources : sequence of str
        Cloud-shape sources, tried in random order, fractal last.
    reference_masks : path, "auto" or None
        Folder of UKIS ``*.npz`` reference masks; "auto" reads $CMSN_SHARED_DATA/cloud_masks_ukis when set, None disables them.
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
        self.reference_masks = _resolve_reference(reference_masks)
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
            keep = (fraction >= _LIBRARY_CLOUD_RANGE[0]) & (fraction <= _LIBRARY_CLOUD_RANGE[1])
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
            return _reshape_mask(mask[0].astype(bool), shape, rng, crop=False)

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
        if self.reference_masks is not None and _reference_masks(self.reference_masks):
            providers["reference"] = _reference_provider(self.reference_masks)
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
        """One line: windows kept and skipped."""
        return (
            f"{len(self.windows)} windows of {self.size} px over {len(self.triplets)} triplet(s); skipped "
            f"{self.skipped['nodata']} mostly no data, {self.skipped['no_clear']} without a clear pixel to score"
        )


def make_dataloaders(
    store: str | os.PathLike[str] | xr.Dataset,
    *,
    size: int = 256,
    overlap: int = 32,
    val_fraction: float = 0.2,
    gap: int | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    seed: int = 0,
    **options: Any,
) -> tuple[DataLoader, DataLoader]:
    """Training and validation DataLoaders over spatially separate regions of a store.

    Validation takes the last rows (``val_fraction``, at least one window), training the rows above them,
    separated by ``gap`` rows (default ``overlap``: the context a tiled model sees across a tile border).

    Parameters
    ----------
    store : str, path-like or xarray.Dataset
        Zarr store path (workers re-open it) or a cube.
    size, overlap : int
        Window side and overlap in pixels.
    val_fraction : float
        Share of the rows kept for validation.
    gap : int, optional
        Rows left out between the regions.
    batch_size, num_workers : int
        As :class:`torch.utils.data.DataLoader`.
    seed : int
        Seeds the clouds (validation uses ``seed + 1``) and the training shuffle.
    **options
        Passed to :class:`TripletWindowDataset` (``levels``, ``truth``, ``sources``, ``triplets``...).

    Returns
    -------
    tuple of DataLoader
        ``(train, validation)``; their ``.dataset`` report ``windows`` and ``skipped``.
    """
    cube = open_cube(store) if not isinstance(store, xr.Dataset) else store
    train_rows, val_rows = split_rows(
        cube.sizes["y"], size=size, val_fraction=val_fraction, gap=overlap if gap is None else gap
    )
    train = TripletWindowDataset(store, size=size, overlap=overlap, rows=train_rows, seed=seed, **options)
    validation = TripletWindowDataset(store, size=size, overlap=overlap, rows=val_rows, seed=seed + 1, **options)
    # workers are not persistent, so TripletWindowDataset.set_epoch reaches them at the next epoch
    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=generator),
        DataLoader(validation, batch_size=batch_size, shuffle=False, num_workers=num_workers),
    )
