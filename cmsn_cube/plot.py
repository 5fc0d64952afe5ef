"""Figures: natural-colour composites with one shared stretch, cloud masks, panels, NDVI maps, loss curves.

Every function writes a PNG and returns its path. matplotlib runs on the Agg backend (no screen needed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

#: Natural colour: red, green, blue = Landsat 8 B4, B3, B2 (Landsat 5 B3, B2, B1).
RGB_BANDS: tuple[str, str, str] = ("red", "green", "blue")


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rgb_stretch(
    images: Sequence[np.ndarray], *, percentiles: tuple[float, float] = (2, 98)
) -> tuple[np.ndarray, np.ndarray]:
    """One stretch for a whole figure: per-band low/high percentiles over all clear pixels of all images.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        ``(3, y, x)`` RGB arrays (NaN ignored).
    percentiles : tuple of float
        Lower and upper percentile mapped to 0 and 1.

    Returns
    -------
    tuple of numpy.ndarray
        ``low`` and ``high``, each of shape ``(3,)``.
    """
    stacked = np.concatenate([np.asarray(img, dtype="float64").reshape(3, -1) for img in images], axis=1)
    low = np.nanpercentile(stacked, percentiles[0], axis=1)
    high = np.nanpercentile(stacked, percentiles[1], axis=1)
    return low, np.maximum(high, low + 1e-6)


def to_rgb(image: np.ndarray, low: np.ndarray, high: np.ndarray, *, gamma: float = 1 / 1.6) -> np.ndarray:
    """``(3, y, x)`` reflectance to a displayable ``(y, x, 3)`` array in [0, 1] (NaN shown black)."""
    scaled = (np.asarray(image, dtype="float64") - low[:, None, None]) / (high - low)[:, None, None]
    scaled = np.clip(np.nan_to_num(scaled, nan=0.0), 0, 1) ** gamma
    return np.moveaxis(scaled, 0, -1)


def rgb_array(reflectance: xr.DataArray) -> np.ndarray:
    """``(band, y, x)`` or ``(time, band, y, x)`` reflectance to numpy in red, green, blue order."""
    return np.asarray(reflectance.sel(band=list(RGB_BANDS)).values)


def _save(fig, path: str | os.PathLike[str]) -> str:  # type: ignore[no-untyped-def]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return str(path)


def plot_date_with_mask(
    cube: xr.Dataset,
    time_index: int,
    path: str | os.PathLike[str],
    *,
    stretch: tuple[np.ndarray, np.ndarray] | None = None,
) -> str:
    """One date: natural colour beside its cloud mask (cloud + shadow + dilated), cloud fraction in the title."""
    plt = _pyplot()
    date = cube.isel(time=time_index)
    rgb = rgb_array(date["reflectance"])
    low, high = stretch or rgb_stretch([rgb])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    axes[0].imshow(to_rgb(rgb, low, high))
    axes[0].set_title(f"{np.datetime_as_string(date.time.values, unit='D')} natural colour (B4/B3/B2)")
    if "cloud_mask" in date:
        mask = np.asarray(date["cloud_mask"].values)
        axes[1].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[1].set_title(f"cloud mask: {100 * mask.mean():.1f} % cloud/shadow")
    for ax in axes:
        ax.set_axis_off()
    return _save(fig, path)


def plot_dates(cube: xr.Dataset, out_dir: str | os.PathLike[str], *, prefix: str = "date") -> list[str]:
    """One PNG per date (natural colour + cloud mask), all with the same stretch."""
    rgbs = (
        [
            rgb_array(cube["reflectance"].isel(time=t).where(~cube["cloud_mask"].isel(time=t)))
            for t in range(cube.sizes["time"])
        ]
        if "cloud_mask" in cube
        else [rgb_array(cube["reflectance"].isel(time=t)) for t in range(cube.sizes["time"])]
    )
    stretch = rgb_stretch(rgbs)
    paths = []
    for t in range(cube.sizes["time"]):
        day = np.datetime_as_string(cube.time.values[t], unit="D")
        paths.append(plot_date_with_mask(cube, t, Path(out_dir) / f"{prefix}_{t + 1}_{day}.png", stretch=stretch))
    return paths
