"""Figures: natural-colour composites with one shared stretch, cloud masks, panels, NDVI maps, method bars.

Loss curves are drawn by :func:`cmsn_cube.train.plot_history`, next to the history they plot.

Given a ``path``, every function writes a PNG there and returns the path; without one it returns the figure,
which a Jupyter notebook shows inline when it is a cell's last value::

    plot_ndvi_maps(result.ndvi_observed.isel(time=0), result.ndvi.isel(time=0))       # shown in the notebook
    plot_ndvi_maps(result.ndvi_observed.isel(time=0), result.ndvi.isel(time=0), "ndvi.png")  # written

Figures are :class:`matplotlib.figure.Figure` objects drawn without pyplot: no screen is needed, no backend is
switched (the caller's ``%matplotlib`` choice or ``MPLBACKEND`` is left as it is) and no global figure is kept.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

#: Natural colour: red, green, blue = Landsat 8 B4, B3, B2 (Landsat 5 B3, B2, B1).
RGB_BANDS: tuple[str, str, str] = ("red", "green", "blue")

#: Resolution of written PNGs and of the figures shown in notebooks.
DPI = 110

PathLike = str | os.PathLike[str]


class NotebookFigure(Figure):
    """A :class:`~matplotlib.figure.Figure` that Jupyter shows inline as a PNG, whatever the matplotlib backend.

    IPython shows a plain Figure as an image only once the inline backend is active (after ``import
    matplotlib.pyplot`` or ``%matplotlib inline``, and not under ``MPLBACKEND=Agg``); ``_repr_png_`` does not
    depend on either. Where the inline backend is active its own formatter is used, so the image is shown once.
    """

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        return buffer.getvalue()


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float]) -> tuple[NotebookFigure, Any]:
    """Return a figure and its axes, without pyplot: no backend is switched and no global figure is kept."""
    fig = NotebookFigure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols)


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


def _save(fig: Figure, path: PathLike | None) -> Any:
    """Return the figure itself without ``path``; with one, write the PNG there and return its path."""
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return str(path)


@overload
def plot_date_with_mask(
    cube: xr.Dataset, time_index: int, path: None = None, *, stretch: tuple[np.ndarray, np.ndarray] | None = None
) -> Figure: ...
@overload
def plot_date_with_mask(
    cube: xr.Dataset, time_index: int, path: PathLike, *, stretch: tuple[np.ndarray, np.ndarray] | None = None
) -> str: ...
def plot_date_with_mask(
    cube: xr.Dataset,
    time_index: int,
    path: PathLike | None = None,
    *,
    stretch: tuple[np.ndarray, np.ndarray] | None = None,
) -> Figure | str:
    """One date: natural colour beside its cloud mask (cloud + shadow + dilated), cloud fraction in the title.

    Returns the figure, or with ``path`` writes it there as a PNG and returns the path.
    """
    date = cube.isel(time=time_index)
    rgb = rgb_array(date["reflectance"])
    low, high = stretch or rgb_stretch([rgb])
    fig, axes = _subplots(1, 2, figsize=(11, 5.6))
    axes[0].imshow(to_rgb(rgb, low, high))
    axes[0].set_title(f"{np.datetime_as_string(date.time.values, unit='D')} natural colour (B4/B3/B2)")
    if "cloud_mask" in date:
        mask = np.asarray(date["cloud_mask"].values)
        axes[1].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[1].set_title(f"cloud mask: {100 * mask.mean():.1f} % cloud/shadow")
    for ax in axes:
        ax.set_axis_off()
    return _save(fig, path)


@overload
def plot_dates(cube: xr.Dataset, out_dir: None = None, *, prefix: str = "date") -> list[Figure]: ...
@overload
def plot_dates(cube: xr.Dataset, out_dir: PathLike, *, prefix: str = "date") -> list[str]: ...
def plot_dates(cube: xr.Dataset, out_dir: PathLike | None = None, *, prefix: str = "date") -> list[Figure] | list[str]:
    """One figure per date (natural colour + cloud mask), all with the same stretch.

    Returns the figures, or with ``out_dir`` writes them there as ``<prefix>_<n>_<day>.png`` and returns the paths.
    """
    rgbs = (
        [
            rgb_array(cube["reflectance"].isel(time=t).where(~cube["cloud_mask"].isel(time=t)))
            for t in range(cube.sizes["time"])
        ]
        if "cloud_mask" in cube
        else [rgb_array(cube["reflectance"].isel(time=t)) for t in range(cube.sizes["time"])]
    )
    stretch = rgb_stretch(rgbs)
    if out_dir is None:
        return [plot_date_with_mask(cube, t, stretch=stretch) for t in range(cube.sizes["time"])]
    paths = []
    for t in range(cube.sizes["time"]):
        day = np.datetime_as_string(cube.time.values[t], unit="D")
        paths.append(plot_date_with_mask(cube, t, Path(out_dir) / f"{prefix}_{t + 1}_{day}.png", stretch=stretch))
    return paths


def _outline(ax, mask: np.ndarray, color: str = "yellow") -> None:  # type: ignore[no-untyped-def]
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=0.7)


@overload
def plot_panel(
    cube: xr.Dataset, stages: xr.Dataset, path: None = None, *, date: int = 0, truth: xr.DataArray | None = None
) -> Figure: ...
@overload
def plot_panel(
    cube: xr.Dataset, stages: xr.Dataset, path: PathLike, *, date: int = 0, truth: xr.DataArray | None = None
) -> str: ...
def plot_panel(
    cube: xr.Dataset,
    stages: xr.Dataset,
    path: PathLike | None = None,
    *,
    date: int = 0,
    truth: xr.DataArray | None = None,
) -> Figure | str:
    """Draw the seed's panel done right, for one date of a three-date window.

    Top: T1, T2, T3 as observed (cloud mask outlined in yellow). Bottom: coarse, refined (clear pixels kept),
    truth (when known) and |refined - truth| as a heat map with a colour bar. One stretch for all RGB images.

    Parameters
    ----------
    cube : xarray.Dataset
        The three-date window (``reflectance``, ``cloud_mask``).
    stages : xarray.Dataset
        :func:`cmsn_cube.inference.predict_window` of that window (``coarse``, ``refined``, ``output``).
    path : path-like, optional
        PNG to write; without it the figure is returned (shown inline in Jupyter).
    date : int
        Which date's reconstruction is shown.
    truth : xarray.DataArray, optional
        Cloud-free ``(time, band, y, x)`` reference.

    Returns
    -------
    matplotlib.figure.Figure or str
        The figure, or the PNG's path when ``path`` is given.
    """
    observed = [rgb_array(cube["reflectance"].isel(time=t)) for t in range(3)]
    masks = [np.asarray(cube["cloud_mask"].isel(time=t).values) for t in range(3)]
    coarse = rgb_array(stages["coarse"].isel(time=date))
    refined = rgb_array(stages["output"].isel(time=date))
    clear_views = [np.where(m[None], np.nan, o) for o, m in zip(observed, masks, strict=True)]
    reference = rgb_array(truth.isel(time=date)) if truth is not None else None
    low, high = rgb_stretch(clear_views + [refined] + ([reference] if reference is not None else []))
    fig, axes = _subplots(2, 4, figsize=(17, 9))
    days = [np.datetime_as_string(t, unit="D") for t in cube.time.values]
    for t in range(3):
        axes[0, t].imshow(to_rgb(observed[t], low, high))
        _outline(axes[0, t], masks[t])
        axes[0, t].set_title(f"T{t + 1} {days[t]} observed ({100 * masks[t].mean():.0f} % cloud in this window)")
    axes[0, 3].set_axis_off()
    axes[1, 0].imshow(to_rgb(coarse, low, high))
    axes[1, 0].set_title(f"T{date + 1} coarse (decoder)")
    axes[1, 1].imshow(to_rgb(refined, low, high))
    _outline(axes[1, 1], masks[date])
    axes[1, 1].set_title(f"T{date + 1} refined (clear pixels kept)")
    if reference is not None and truth is not None:
        axes[1, 2].imshow(to_rgb(reference, low, high))
        axes[1, 2].set_title(f"T{date + 1} truth (cloud-free)")
        error = np.abs(stages["output"].isel(time=date).values - truth.isel(time=date).values).mean(axis=0)
        image = axes[1, 3].imshow(error, cmap="magma", vmin=0, vmax=max(float(np.nanpercentile(error, 99.5)), 1e-3))
        fig.colorbar(
            image, ax=axes[1, 3], fraction=0.046, pad=0.04, label="|refined − truth|, reflectance (mean of 4 bands)"
        )
        axes[1, 3].set_title("absolute error")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


DateChoice = int | str | np.datetime64 | None


@overload
def plot_reconstruction(
    cube: xr.Dataset, path: None = None, *, date: DateChoice = None, model: object = None, device: str | None = None
) -> Figure: ...
@overload
def plot_reconstruction(
    cube: xr.Dataset, path: PathLike, *, date: DateChoice = None, model: object = None, device: str | None = None
) -> str: ...
def plot_reconstruction(
    cube: xr.Dataset,
    path: PathLike | None = None,
    *,
    date: DateChoice = None,
    model: object = None,
    device: str | None = None,
) -> Figure | str:
    """Run the network on a three-date window and draw :func:`plot_panel` (with ``truth`` when the cube has it).

    The window is the date shown and its two neighbours in time (the first or last three dates at the series'
    ends): a cube of any number of dates can be drawn.

    Parameters
    ----------
    cube : xarray.Dataset
        Three dates or more; an area small enough to look at (e.g. ``cube.isel(y=slice(0, 256), ...)``).
    path : path-like, optional
        PNG to write; without it the figure is returned (shown inline in Jupyter).
    date : int, date string or datetime64, optional
        The date whose reconstruction is shown: its index among the cube's dates, or a date (the nearest of
        the cube's is taken). Default: the cloudiest date.
    model : None, str, path or CMSN
        Checkpoint (default: the packaged model).
    device : str, optional
        Torch device (default: CUDA when present).

    Returns
    -------
    matplotlib.figure.Figure or str
        The figure, or the PNG's path when ``path`` is given.
    """
    from cmsn_cube.inference import predict_window

    dates, shown = window_around(cube, date)
    window = cube.isel(time=dates).load()
    stages = predict_window(window.drop_vars("truth", errors="ignore"), model=model, device=device)
    truth = window["truth"] if "truth" in window else None
    return plot_panel(window, stages, path, date=shown, truth=truth)


def window_around(cube: xr.Dataset, date: DateChoice = None) -> tuple[list[int], int]:
    """Return the indices of the three dates around ``date`` and the position of ``date`` among them.

    ``date`` is an index among the cube's dates, a date (the nearest of the cube's is taken), or None for the
    cloudiest date (the largest ``cloud_mask`` fraction). A cube of fewer than three dates is returned whole,
    for :func:`cmsn_cube.inference.predict_window` to refuse.

    Examples
    --------
    >>> from cmsn_cube.sources.synthetic import synthetic_scene
    >>> scene = synthetic_scene(height=32, width=32, n_dates=7, cloud_fractions=[0.1, 0.2, 0.1, 0.1, 0.1, 0.4, 0.1])
    >>> window_around(scene), window_around(scene, 0), window_around(scene, 3)
    (([4, 5, 6], 1), ([0, 1, 2], 0), ([2, 3, 4], 1))
    """
    n = int(cube.sizes["time"])
    if date is None:
        if n < 3:
            return list(range(n)), 0
        fractions = cube["cloud_mask"].mean(("y", "x")).values if "cloud_mask" in cube else np.zeros(n)
        index = int(np.argmax(fractions))
    else:
        index = date_index(cube, date)
    if n <= 3:
        return list(range(n)), index
    first = min(max(index - 1, 0), n - 3)
    return [first, first + 1, first + 2], index - first


def date_index(cube: xr.Dataset, date: int | str | np.datetime64) -> int:
    """Return the position of ``date`` among the cube's dates: an index as it is (checked), or the nearest date."""
    n = int(cube.sizes["time"])
    if isinstance(date, (int, np.integer)) and not isinstance(date, bool):
        if not 0 <= date < n:
            choices = f"{', '.join(map(str, range(n - 1)))} or {n - 1}" if n <= 10 else f"0 to {n - 1}"
            raise ValueError(f"date must be {choices} (an index among the cube's {n} dates), got {date!r}")
        return int(date)
    wanted = np.asarray(date, dtype="datetime64[ns]")
    return int(np.argmin(np.abs(cube["time"].values.astype("datetime64[ns]") - wanted)))


@overload
def plot_ndvi_maps(
    observed: xr.DataArray, reconstructed: xr.DataArray, path: None = None, *, title: str = ""
) -> Figure: ...
@overload
def plot_ndvi_maps(observed: xr.DataArray, reconstructed: xr.DataArray, path: PathLike, *, title: str = "") -> str: ...
def plot_ndvi_maps(
    observed: xr.DataArray, reconstructed: xr.DataArray, path: PathLike | None = None, *, title: str = ""
) -> Figure | str:
    """NDVI observed (NaN under clouds, grey) beside NDVI reconstructed; diverging colours fixed to [-1, 1].

    Returns the figure, or with ``path`` writes it there as a PNG and returns the path.
    """
    fig, axes = _subplots(1, 2, figsize=(12, 5.6))
    import matplotlib

    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="0.6")  # clouds (NaN) in grey
    for ax, data, name in zip(
        axes, (observed, reconstructed), ("observed (clouds masked)", "reconstructed"), strict=True
    ):
        image = ax.imshow(np.asarray(data.values), cmap=cmap, vmin=-1, vmax=1)
        ax.set_title(f"NDVI {name}")
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, fraction=0.025, pad=0.02, label="NDVI (unitless)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


@overload
def plot_uncertainty(result: xr.Dataset, path: None = None, *, date: DateChoice = None) -> Figure: ...
@overload
def plot_uncertainty(result: xr.Dataset, path: PathLike, *, date: DateChoice = None) -> str: ...
def plot_uncertainty(result: xr.Dataset, path: PathLike | None = None, *, date: DateChoice = None) -> Figure | str:
    """Draw a reconstructed date in natural colour beside its uncertainty (RMS over the bands, reflectance).

    ``result`` is a reconstruction (:func:`cmsn_cube.inference.reconstruct`, or a store of one); ``date`` as in
    :func:`plot_reconstruction` (default: the date with the most filled pixels). Observed pixels have no
    uncertainty (white). Computes that date.
    """
    import matplotlib

    if "uncertainty" not in result:
        raise ValueError("no 'uncertainty' in this dataset: reconstruct it again (written before the layer existed)")
    if date is None:
        shown = int(np.argmax(np.asarray((result["filled"] > 0).sum(("y", "x")).values)))
    else:
        shown = date_index(result, date)
    one = result.isel(time=shown)
    spread = np.sqrt((np.asarray(one["uncertainty"].values, dtype=np.float64) ** 2).mean(axis=0))
    fig, axes = _subplots(1, 2, figsize=(12, 5.6))
    rgb = rgb_array(one["reconstructed"])
    axes[0].imshow(to_rgb(rgb, *rgb_stretch([rgb])))
    axes[0].contour(np.asarray(one["filled"].values) > 0, levels=[0.5], colors="yellow", linewidths=0.6)
    axes[0].set_title(f"{np.datetime_as_string(one.time.values, unit='D')} reconstructed (filled: yellow outline)")
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="white")
    finite = spread[np.isfinite(spread)]
    top = float(np.quantile(finite, 0.99)) if finite.size else 1.0
    image = axes[1].imshow(spread, cmap=cmap, vmin=0, vmax=max(top, 1e-4))
    axes[1].set_title("uncertainty: predicted error SD, RMS over bands")
    fig.colorbar(image, ax=axes[1], fraction=0.046, pad=0.02, label="reflectance (unitless)")
    for ax in axes:
        ax.set_axis_off()
    return _save(fig, path)


@overload
def plot_ndvi_scatter(
    reconstructed: np.ndarray, truth: np.ndarray, path: None = None, *, label: str = "cloudy pixels"
) -> Figure: ...
@overload
def plot_ndvi_scatter(
    reconstructed: np.ndarray, truth: np.ndarray, path: PathLike, *, label: str = "cloudy pixels"
) -> str: ...
def plot_ndvi_scatter(
    reconstructed: np.ndarray, truth: np.ndarray, path: PathLike | None = None, *, label: str = "cloudy pixels"
) -> Figure | str:
    """2-D histogram of reconstructed vs true NDVI (log counts) with the 1:1 line, MAE and bias in the title.

    Returns the figure, or with ``path`` writes it there as a PNG and returns the path.
    """
    from matplotlib.colors import LogNorm

    valid = np.isfinite(reconstructed) & np.isfinite(truth)
    x, y = truth[valid], reconstructed[valid]
    fig, ax = _subplots(figsize=(6.2, 5.6))
    counts = ax.hist2d(x, y, bins=120, range=[[-0.3, 1], [-0.3, 1]], norm=LogNorm(), cmap="viridis")
    fig.colorbar(counts[3], ax=ax, label="pixels per bin")
    ax.plot([-0.3, 1], [-0.3, 1], color="white", linewidth=1, linestyle="--")
    ax.set_xlabel("true NDVI")
    ax.set_ylabel("reconstructed NDVI")
    ax.set_title(f"NDVI in {label}: MAE {np.abs(y - x).mean():.3f}, bias {np.mean(y - x):+.3f} (n={x.size})")
    return _save(fig, path)


@overload
def plot_method_bars(
    summary: dict[str, dict[str, float]], path: None = None, *, label: str = "cloudy pixels"
) -> Figure: ...
@overload
def plot_method_bars(summary: dict[str, dict[str, float]], path: PathLike, *, label: str = "cloudy pixels") -> str: ...
def plot_method_bars(
    summary: dict[str, dict[str, float]], path: PathLike | None = None, *, label: str = "cloudy pixels"
) -> Figure | str:
    """Bar charts of PSNR (dB), SSIM and SAM (degrees) in cloudy pixels, one bar per method.

    Returns the figure, or with ``path`` writes it there as a PNG and returns the path.
    """
    methods = list(summary)
    fig, axes = _subplots(1, 3, figsize=(14, 4.2))
    for ax, (metric, unit) in zip(axes, (("psnr", "dB"), ("ssim", "unitless"), ("sam", "degrees")), strict=True):
        values = [summary[m][metric] for m in methods]
        colors = ["tab:orange" if m.startswith("cmsn") else "tab:blue" for m in methods]
        bars = ax.bar(methods, values, color=colors)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(f"{metric.upper()} ({unit})")
        ax.tick_params(axis="x", rotation=30)
        if metric == "psnr":
            ax.set_ylim(min(values) - 3, max(values) + 1.5)
        if metric == "ssim":
            ax.set_ylim(min(values) - 0.02, 1.0)
    fig.suptitle(f"Methods in {label}")
    return _save(fig, path)
