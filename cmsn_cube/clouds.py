"""Simulated clouds: cloud shapes pasted onto clear pixels, so that a gap-filler is scored where the truth is known.

Clouds are pasted onto clear pixels until the masked fraction of an image reaches a level (:func:`simulate_clouds`).
The shapes come from real cloud masks (other dates or windows of the cube), from the real Landsat cloud/shadow
reference masks of ``cloud_masks_ukis``, or from fractal noise when no real mask fits.
:class:`cmsn_cube.samples.TripletWindowDataset` pastes them on training windows; :func:`make_scoring_cube` pastes
them on a whole cube, for :mod:`cmsn_cube.evaluate`.

``import cmsn_cube.clouds`` does not import torch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import xarray as xr
from scipy import ndimage

from cmsn_cube.cube import validate_cube
from cmsn_cube.exceptions import DimensionError, NoDataError
from cmsn_cube.qa import DEFAULT_CLOUD_LEVELS, QA_BITS
from cmsn_cube.sources.synthetic import fractal_noise

#: ``store``: real cloud masks of other dates/windows of the cube; ``reference``: the UKIS Landsat cloud/shadow
#: reference masks (``*.npz`` with ``msk``); ``fractal``: generated (always the last resort).
MaskSource = Literal["store", "reference", "fractal"]
DEFAULT_MASK_SOURCES: tuple[MaskSource, ...] = ("store", "reference", "fractal")
#: ``provide(rng, shape)``: a bool cloud mask of ``shape`` drawn with ``rng``, or None when the source has none.
MaskProvider = Callable[[np.random.Generator, tuple[int, int]], "np.ndarray | None"]

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


# ---------------------------------------------------------------------------------------------- cloud shapes


def is_cloud_shape(fraction: float | np.ndarray) -> np.ndarray:
    """Tell whether a real mask with this cloud fraction may serve as a cloud shape (not empty, not overcast).

    Examples
    --------
    >>> is_cloud_shape(np.array([0.0, 0.3, 0.95])).tolist()
    [False, True, False]
    """
    low, high = _LIBRARY_CLOUD_RANGE
    return (np.asarray(fraction) >= low) & (np.asarray(fraction) <= high)


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
    """Return the ``cloud_masks_ukis`` folder of ``$CMSN_SHARED_DATA`` when that variable is set, else None.

    Only a folder the user names is read: nothing is looked for beside the installed package, so a seed draws
    the same clouds on every machine.
    """
    from cmsn_cube.testing import SHARED_DATA_ENV

    root = os.environ.get(SHARED_DATA_ENV)
    folder = Path(root) / "cloud_masks_ukis" if root else None
    return folder if folder is not None and folder.is_dir() else None


def resolve_reference_masks(reference_masks: str | os.PathLike[str] | None) -> str | None:
    """Turn a ``reference_masks`` argument (a folder, "auto" or None) into the folder to read, or None."""
    if reference_masks == "auto":
        found = default_reference_masks()
        return str(found) if found is not None else None
    return str(reference_masks) if reference_masks is not None else None


def reference_provider(folder: str | None) -> MaskProvider | None:
    """Draw random UKIS reference masks from ``folder``; None when there is no folder or no mask in it.

    Parameters
    ----------
    folder : str, optional
        A folder of UKIS ``*.npz`` reference masks (see :func:`resolve_reference_masks`).

    Returns
    -------
    callable or None
        ``provide(rng, shape)``: a random mask, rotated, flipped, cropped and resampled to ``shape``.
    """
    if folder is None or not _reference_masks(folder):
        return None

    def provide(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        masks = _reference_masks(folder)
        return reshape_mask(masks[int(rng.integers(len(masks)))], shape, rng, crop=True)

    return provide


def reshape_mask(mask: np.ndarray, shape: tuple[int, int], rng: np.random.Generator, *, crop: bool) -> np.ndarray:
    """Rotate by quarter turns (square masks), flip, crop and resample (nearest neighbour) a mask to ``shape``.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(y, x)`` bool cloud mask.
    shape : tuple of int
        The shape to return.
    rng : numpy.random.Generator
        Draws the rotation, flip and crop.
    crop : bool
        Crop a random 1/4 to all of each side first, so cloud sizes vary relative to ``shape``.
    """
    if mask.shape[0] == mask.shape[1]:
        mask = np.rot90(mask, int(rng.integers(4)))
    if rng.random() < 0.5:
        mask = mask[:, ::-1]
    height, width = mask.shape
    if crop:
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


# --------------------------------------------------------------------------------------------------- pasting


def simulate_clouds(
    pasteable: np.ndarray,
    n_masked: int,
    level: float,
    rng: np.random.Generator,
    *,
    providers: dict[str, MaskProvider] | None = None,
    sources: Sequence[MaskSource] = DEFAULT_MASK_SOURCES,
    footprint: int | None = None,
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
    footprint : int, optional
        Pixels of the image inside the scene (with data on some date); ``level`` is a fraction of them. Default:
        the whole image.

    Returns
    -------
    tuple
        The pasted mask (a subset of ``pasteable``) and the name of the source used (``"none"`` when the real
        mask already reaches the level).
    """
    shape = pasteable.shape
    n_pixels = pasteable.size if footprint is None else footprint
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


# --------------------------------------------------------------------------------------------- scoring cubes


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
    no_data = ~np.isfinite(reflectance).all(axis=1)
    masked = cloud | no_data
    # a scene's edge (no data on any date: a tilted Landsat footprint) is not part of the level
    in_scene = np.asarray(~no_data.all(axis=0))
    reference = resolve_reference_masks(reference_masks)
    pasted = np.zeros_like(masked)
    for k, t in enumerate(chosen):
        pasted[t] = _paste_on_date(
            cloud, masked, in_scene, t, level_list[k % len(level_list)], seed, sources, reference
        )
    if not pasted.any() and not (~masked[chosen]).any():
        raise NoDataError("no clear pixel to paste clouds on in the chosen dates: nothing can be scored")
    dims = ("time", "band", "y", "x")
    truth = xr.DataArray(
        np.where(masked[:, None], np.nan, reflectance).astype(np.float32), dims=dims, coords=cube["reflectance"].coords
    ).rename("truth")
    scored = xr.DataArray(pasted, dims=("time", "y", "x"), coords=cube["cloud_mask"].coords).rename("scored")
    out = _with_pasted_clouds(cube, reflectance, cloud, pasted)
    out.attrs.update(pasted_cloud_seed=seed, pasted_fraction=[float(v) for v in pasted.mean(axis=(1, 2))])
    out.attrs["real_cloud_fraction"] = [float(v) for v in masked.mean(axis=(1, 2))]
    return out, truth, scored


def _paste_on_date(
    cloud: np.ndarray,
    masked: np.ndarray,
    in_scene: np.ndarray,
    date: int,
    level: float,
    seed: int,
    sources: Sequence[MaskSource],
    reference: str | None,
) -> np.ndarray:
    """Pasted pixels ``(y, x)`` of one date, drawn with the generator of ``(seed, date)``.

    ``level`` is a fraction of the pixels ``in_scene`` (with data on some date), and so is what is masked.
    """
    rng = np.random.default_rng([seed, date])
    library = [other for other in range(cloud.shape[0]) if other != date and is_cloud_shape(cloud[other].mean())]
    providers: dict[str, MaskProvider] = {}
    if library:
        providers["store"] = _other_dates_provider(cloud, library)
    from_reference = reference_provider(reference)
    if from_reference is not None:
        providers["reference"] = from_reference
    pasted, _ = simulate_clouds(
        ~masked[date],
        int((masked[date] & in_scene).sum()),
        level,
        rng,
        providers=providers,
        sources=sources,
        footprint=int(in_scene.sum()),
    )
    return pasted


def _other_dates_provider(cloud: np.ndarray, library: Sequence[int]) -> MaskProvider:
    """Draw the whole-image cloud mask of a random date of ``library`` (dates of ``cloud(time, y, x)``)."""

    def provide(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        return reshape_mask(cloud[library[int(rng.integers(len(library)))]], shape, rng, crop=False)

    return provide


def _with_pasted_clouds(cube: xr.Dataset, reflectance: np.ndarray, cloud: np.ndarray, pasted: np.ndarray) -> xr.Dataset:
    """Return the cube with ``pasted(time, y, x)`` hidden: reflectance 0, ``cloud_mask`` and the QA cloud bit set."""
    out = cube.drop_vars([v for v in ("truth",) if v in cube.data_vars]).copy()
    out["reflectance"] = (
        ("time", "band", "y", "x"),
        np.where(pasted[:, None], np.float32(0), reflectance).astype(np.float32),
    )
    out["cloud_mask"] = (("time", "y", "x"), cloud | pasted)
    if "qa_pixel" in out:
        qa = np.asarray(out["qa_pixel"].values, dtype=np.uint16)
        cloud_bit, clear_bit = np.uint16(1 << QA_BITS["cloud"]), np.uint16(1 << QA_BITS["clear"])
        out["qa_pixel"] = (("time", "y", "x"), np.where(pasted, (qa | cloud_bit) & ~clear_bit, qa).astype(np.uint16))
    for name in ("reflectance", "cloud_mask", "qa_pixel"):
        if name in out:
            out[name].attrs = cube[name].attrs
            out[name].encoding["grid_mapping"] = "spatial_ref"
    return out
