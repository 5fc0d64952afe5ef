"""Reconstruction metrics: PSNR, SSIM, MAE, RMSE, SAM, NDVI error; over all pixels or the cloudy ones only.

Every metric is NaN-safe: a pixel counts only where it is selected by the mask and finite in both the
reconstruction and the truth (the share of selected pixels a method filled is reported as ``coverage``).
Reflectance is in [0, 1], so ``data_range`` defaults to 1.0.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage

from cmsn_cube.cube import BANDS
from cmsn_cube.exceptions import BandMismatchError, DimensionError

Region = Literal["cloudy", "common", "all"]
METRICS: tuple[str, ...] = ("psnr", "ssim", "mae", "rmse", "sam", "ndvi_mae", "coverage", "n_pixels")

#: Reflectance spans [0, 1]: the peak value PSNR and SSIM are relative to.
DEFAULT_DATA_RANGE = 1.0
_RED, _NIR = BANDS.index("red"), BANDS.index("nir")


def _array(values: Any) -> np.ndarray:
    return np.asarray(values.values if isinstance(values, xr.DataArray) else values, dtype=np.float64)


def _selected(prediction: np.ndarray, truth: np.ndarray, mask: Any | None) -> np.ndarray:
    keep = np.isfinite(prediction) & np.isfinite(truth)
    if mask is not None:
        keep &= np.broadcast_to(_array(mask).astype(bool), keep.shape)
    return keep


def mae(prediction: Any, truth: Any, *, mask: Any | None = None) -> float:
    """Mean absolute error over the selected finite pixels (NaN when none)."""
    p, t = _array(prediction), _array(truth)
    keep = _selected(p, t, mask)
    return float(np.abs(p[keep] - t[keep]).mean()) if keep.any() else np.nan


def rmse(prediction: Any, truth: Any, *, mask: Any | None = None) -> float:
    """Root mean square error over the selected finite pixels (NaN when none)."""
    p, t = _array(prediction), _array(truth)
    keep = _selected(p, t, mask)
    return float(np.sqrt(np.mean((p[keep] - t[keep]) ** 2))) if keep.any() else np.nan


def psnr(prediction: Any, truth: Any, *, mask: Any | None = None, data_range: float = DEFAULT_DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range**2 / MSE)``; inf for identical images.

    Examples
    --------
    >>> import numpy as np
    >>> psnr(np.full(4, 0.5), np.full(4, 0.6))  # MSE 0.01 -> 20 dB
    20.0
    """
    error = rmse(prediction, truth, mask=mask)
    if np.isnan(error):
        return np.nan
    return np.inf if error == 0 else float(round(20 * np.log10(data_range / error), 10))


#: How tables name :func:`ssim_sum`'s definition (evaluation and training print the same one).
SSIM_NAME = "SSIM (Wang 2004, 7x7 uniform window)"


def ssim_sum(
    prediction: Any,
    truth: Any,
    *,
    mask: Any | None = None,
    data_range: float = DEFAULT_DATA_RANGE,
    win_size: int = 7,
) -> tuple[float, int]:
    """Sum the per-pixel SSIM over the selected pixels and count them: :func:`ssim` is their ratio.

    This is the project's one SSIM definition (evaluation and training's validation both call it), that of
    Wang et al. (2004) as scikit-image computes it by default: a uniform ``win_size`` x ``win_size`` window (not
    the paper's 11 x 11 Gaussian), sample covariances (N - 1), ``C1 = (0.01 L)^2`` and ``C2 = (0.03 L)^2`` with
    ``L = data_range``; every pixel gets its own value, windows at the image border are mirrored (scipy.ndimage
    ``reflect``). Pixels whose window touches a NaN in either image are left out (NaN would spread through the
    window's means). Sums and counts of several image pairs add up to the SSIM of all of them at once.

    Parameters
    ----------
    prediction, truth : array-like
        ``(..., y, x)`` images; every 2-D image gets its own SSIM map.
    mask : array-like, optional
        ``(..., y, x)`` bool (broadcast to the images): the pixels to sum over; default all.
    data_range : float
        Value range of the data (1.0 for reflectance).
    win_size : int
        Side of the sliding window (odd).

    Returns
    -------
    tuple of (float, int)
        The sum of the SSIM map over the counted pixels, and their number.

    Raises
    ------
    DimensionError
        The images differ in shape, are not at least 2-D or are smaller than the window.
    """
    from skimage.metrics import structural_similarity

    p, t = _array(prediction), _array(truth)
    if p.shape != t.shape or p.ndim < 2:
        raise DimensionError(f"SSIM needs two images of the same (..., y, x) shape, got {p.shape} and {t.shape}")
    selected = np.broadcast_to(_array(mask).astype(bool), p.shape) if mask is not None else np.ones(p.shape, bool)
    p2, t2, s2 = p.reshape(-1, *p.shape[-2:]), t.reshape(-1, *t.shape[-2:]), selected.reshape(-1, *p.shape[-2:])
    if min(p.shape[-2:]) < win_size:
        raise DimensionError(f"SSIM needs images of at least {win_size} x {win_size} px, got {p.shape[-2:]}")
    total, count = 0.0, 0
    for image, reference, keep in zip(p2, t2, s2, strict=True):
        if not keep.any():  # nothing to score: skip the filters
            continue
        finite = np.isfinite(image) & np.isfinite(reference)
        clean = ndimage.minimum_filter(finite.astype(np.uint8), size=win_size, mode="nearest").astype(bool)
        use = keep & clean
        if not use.any():
            continue
        _, full = structural_similarity(
            np.where(finite, image, 0),
            np.where(finite, reference, 0),
            data_range=data_range,
            win_size=win_size,
            full=True,
        )
        total += float(full[use].sum())
        count += int(use.sum())
    return total, count


def ssim(
    prediction: Any, truth: Any, *, mask: Any | None = None, data_range: float = DEFAULT_DATA_RANGE, win_size: int = 7
) -> float:
    """Mean structural similarity over the selected pixels (NaN when none); defined by :func:`ssim_sum`.

    Parameters
    ----------
    prediction, truth : array-like
        ``(..., y, x)`` images; every 2-D image gets its own SSIM map.
    mask : array-like, optional
        ``(..., y, x)`` bool: the pixels to average over.
    data_range : float
        Value range of the data (1.0 for reflectance).
    win_size : int
        Side of the sliding window (odd).

    Examples
    --------
    >>> import numpy as np
    >>> image = np.linspace(0, 1, 64).reshape(8, 8)
    >>> ssim(image, image)
    1.0
    """
    total, count = ssim_sum(prediction, truth, mask=mask, data_range=data_range, win_size=win_size)
    return total / count if count else np.nan


def _band_axis(values: Any, axis: int, *, keep_float_dtype: bool = False) -> tuple[np.ndarray, int]:
    array = np.asarray(values)
    if not (keep_float_dtype and np.issubdtype(array.dtype, np.floating)):
        array = _array(values)  # float64; integer digital numbers must not wrap around when subtracted
    if array.shape[axis] != len(BANDS):
        raise BandMismatchError(f"expected {len(BANDS)} bands ({', '.join(BANDS)}) on axis {axis}, got {array.shape}")
    return array, axis % array.ndim


def ndvi(reflectance: Any, *, axis: int = -3) -> Any:
    """NDVI = (NIR - red) / (NIR + red), NaN where the sum is 0, clipped to [-1, 1].

    Parameters
    ----------
    reflectance : xarray.DataArray or array-like
        With a ``band`` dim (xarray; ``red`` and ``nir`` are selected by name) or bands blue, green, red, nir
        on ``axis`` (numpy).
    axis : int
        The band axis of a numpy array.

    Returns
    -------
    xarray.DataArray or numpy.ndarray
        Without the band dimension.

    Examples
    --------
    >>> import numpy as np
    >>> float(ndvi(np.array([0.1, 0.1, 0.25, 0.75]), axis=0))
    0.5
    """
    if isinstance(reflectance, xr.DataArray):
        red, nir = reflectance.sel(band="red", drop=True), reflectance.sel(band="nir", drop=True)
        total = nir + red
        return ((nir - red) / total.where(total != 0)).clip(-1, 1).rename("ndvi")
    array, axis = _band_axis(reflectance, axis, keep_float_dtype=True)
    red_band, nir_band = (array[(slice(None),) * axis + (band,)] for band in (_RED, _NIR))  # views, no copies
    band_sum = nir_band + red_band
    # float inputs keep their precision (float32 stays float32); the scene-wide path calls this per block
    index = np.full_like(band_sum, np.nan, dtype=np.result_type(band_sum.dtype, np.float32))
    with np.errstate(invalid="ignore"):
        np.divide(nir_band - red_band, band_sum, out=index, where=band_sum != 0)
    return np.clip(index, -1, 1, out=index)


def ndvi_error(prediction: Any, truth: Any, *, mask: Any | None = None, axis: int = -3) -> float:
    """Mean absolute NDVI difference over the selected pixels (bands on ``axis``)."""
    return mae(ndvi(_array(prediction), axis=axis), ndvi(_array(truth), axis=axis), mask=mask)


def sam(prediction: Any, truth: Any, *, mask: Any | None = None, axis: int = -3) -> float:
    """Mean spectral angle in degrees between the band vectors (bands on ``axis``) over the selected pixels.

    Examples
    --------
    >>> import numpy as np
    >>> round(sam(np.array([1.0, 0, 0, 0]), np.array([1.0, 1.0, 0, 0]), axis=0), 6)
    45.0
    """
    p, axis = _band_axis(prediction, axis)
    t, _ = _band_axis(truth, axis)
    dot = (p * t).sum(axis=axis)
    norms = np.sqrt((p * p).sum(axis=axis) * (t * t).sum(axis=axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.degrees(np.arccos(np.clip(dot / np.where(norms > 0, norms, np.nan), -1, 1)))
    keep = np.isfinite(angle)
    if mask is not None:
        keep &= np.broadcast_to(_array(mask).astype(bool), keep.shape)
    return float(angle[keep].mean()) if keep.any() else np.nan


def _as_cube_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, xr.DataArray):
        order = [d for d in ("time", "band", "y", "x") if d in values.dims]
        if len(order) != values.ndim:
            raise DimensionError(f"{name} has dims {values.dims}; expected (time, band, y, x) or (band, y, x)")
        values = values.transpose(*order)
    array = _array(values)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != len(BANDS):
        raise DimensionError(f"{name} must be (time, band, y, x) with {len(BANDS)} bands, got shape {array.shape}")
    return array


def filled_pixels(reconstructed: Any) -> np.ndarray:
    """``(time, y, x)`` bool: where a ``(time, band, y, x)`` reconstruction is finite in every band."""
    return np.isfinite(_as_cube_array(reconstructed, "reconstructed")).all(axis=1)


def common_pixels(scored: Any, reconstructions: Any) -> np.ndarray:
    """``(time, y, x)`` bool: the ``scored`` pixels that every reconstruction in ``reconstructions`` filled.

    Methods of unequal coverage (the classical fillers leave pixels cloudy on every date empty) are compared
    fairly only on these.
    """
    common = np.asarray(scored, dtype=bool)
    for reconstructed in reconstructions:
        common = common & filled_pixels(reconstructed)
    return common


def _pixel_mask(mask: Any, cube_shape: tuple[int, ...], name: str) -> np.ndarray:
    """Shape ``mask`` as the ``(time, y, x)`` bool mask of a ``(time, band, y, x)`` array (a 2-D mask is one date)."""
    pixels = _array(mask).astype(bool)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape != (cube_shape[0], *cube_shape[2:]):
        raise DimensionError(f"{name} {pixels.shape} does not match (time, y, x) of {cube_shape}")
    return pixels


def evaluate_reconstruction(
    reconstructed: Any,
    truth: Any,
    cloudy_mask: Any,
    *,
    data_range: float = DEFAULT_DATA_RANGE,
    common_mask: Any = None,
) -> pd.DataFrame:
    """Score a reconstruction against the truth, over the cloudy (filled) pixels and over all pixels.

    Parameters
    ----------
    reconstructed, truth : xarray.DataArray or array-like
        ``(time, band, y, x)`` (or ``(band, y, x)``) reflectance, bands blue, green, red, nir.
    cloudy_mask : xarray.DataArray or array-like
        ``(time, y, x)`` bool: the pixels that were filled and can be scored.
    data_range : float
        Value range for PSNR and SSIM (1.0 for reflectance).
    common_mask : xarray.DataArray or array-like, optional
        ``(time, y, x)`` bool: cloudy pixels that every compared method filled. Given, a region ``common``
        scores methods of unequal coverage on the same pixels.

    Returns
    -------
    pandas.DataFrame
        Index ``(region, band)`` with region ``cloudy``/``all`` (and ``common``) and band ``blue … nir, mean``; columns
        :data:`METRICS`. Per band: PSNR, SSIM, MAE, RMSE; ``mean``: PSNR/MAE/RMSE pooled over bands, SSIM
        averaged over bands, SAM and NDVI MAE. ``coverage`` = share of the region's pixels the method filled
        (finite in every band); ``n_pixels`` = pixels in the region (truth finite).
    """
    prediction, reference = _as_cube_array(reconstructed, "reconstructed"), _as_cube_array(truth, "truth")
    if prediction.shape != reference.shape:
        raise DimensionError(f"reconstructed {prediction.shape} and truth {reference.shape} differ in shape")
    cloudy = _pixel_mask(cloudy_mask, prediction.shape, "cloudy_mask")
    known = np.isfinite(reference).all(axis=1)
    filled = filled_pixels(prediction)
    regions = [("cloudy", cloudy & known), ("all", known)]
    if common_mask is not None:
        regions.insert(1, ("common", _pixel_mask(common_mask, prediction.shape, "common_mask") & known))
    rows = []
    for region, pixels in regions:
        n_pixels = int(pixels.sum())
        coverage = float((pixels & filled).sum() / n_pixels) if n_pixels else np.nan
        ssims = []
        for b, band in enumerate(BANDS):
            p, t = prediction[:, b], reference[:, b]
            band_ssim = ssim(p, t, mask=pixels, data_range=data_range)
            ssims.append(band_ssim)
            rows.append(
                {
                    "region": region,
                    "band": band,
                    "psnr": psnr(p, t, mask=pixels, data_range=data_range),
                    "ssim": band_ssim,
                    "mae": mae(p, t, mask=pixels),
                    "rmse": rmse(p, t, mask=pixels),
                    "sam": np.nan,
                    "ndvi_mae": np.nan,
                    "coverage": coverage,
                    "n_pixels": n_pixels,
                }
            )
        pooled = pixels[:, None]
        rows.append(
            {
                "region": region,
                "band": "mean",
                "psnr": psnr(prediction, reference, mask=pooled, data_range=data_range),
                "ssim": float(np.nanmean(ssims)) if np.isfinite(ssims).any() else np.nan,
                "mae": mae(prediction, reference, mask=pooled),
                "rmse": rmse(prediction, reference, mask=pooled),
                "sam": sam(prediction, reference, mask=pixels, axis=1),
                "ndvi_mae": ndvi_error(prediction, reference, mask=pixels, axis=1),
                "coverage": coverage,
                "n_pixels": n_pixels,
            }
        )
    return pd.DataFrame(rows).set_index(["region", "band"])[list(METRICS)]
