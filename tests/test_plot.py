"""Figures: returned for notebooks, written for scripts, never touching the caller's matplotlib backend."""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from cmsn_cube import plot
from cmsn_cube.metrics import ndvi
from cmsn_cube.qa import add_cloud_mask
from cmsn_cube.testing import tiny_scene

PACKAGE = Path(plot.__file__).resolve().parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def scene():
    cube = tiny_scene(size=48, seed=2)
    return cube if "cloud_mask" in cube else add_cloud_mask(cube)


def _draws(scene) -> dict[str, object]:
    """Each plotting function's call without a path (the figure is returned)."""
    observed = ndvi(scene["reflectance"].isel(time=0).where(~scene["cloud_mask"].isel(time=0)))
    truth = ndvi(scene["truth"].isel(time=0)).values.ravel()
    summary = {"cmsn": {"psnr": 31.0, "ssim": 0.9, "sam": 3.0}, "linear": {"psnr": 27.0, "ssim": 0.8, "sam": 5.0}}
    return {
        "date_with_mask": lambda path=None: plot.plot_date_with_mask(scene, 0, path),
        "ndvi_maps": lambda path=None: plot.plot_ndvi_maps(observed, ndvi(scene["truth"].isel(time=0)), path),
        "ndvi_scatter": lambda path=None: plot.plot_ndvi_scatter(truth + 0.01, truth, path),
        "method_bars": lambda path=None: plot.plot_method_bars(summary, path),
    }


@pytest.mark.parametrize("name", ["date_with_mask", "ndvi_maps", "ndvi_scatter", "method_bars"])
def test_figures_are_returned_shown_by_ipython_and_written_on_request(scene, tmp_path, name):
    backend = matplotlib.get_backend()
    draw = _draws(scene)[name]
    figure = draw()
    assert isinstance(figure, Figure)
    png = figure._repr_png_()
    assert png.startswith(PNG_SIGNATURE)
    image = imread(io.BytesIO(png), format="png")
    assert min(image.shape[:2]) >= 200 and float(image[..., :3].std()) > 0.02
    path = draw(tmp_path / name / "figure.png")
    assert path == str(tmp_path / name / "figure.png") and Path(path).read_bytes().startswith(PNG_SIGNATURE)
    assert matplotlib.get_backend() == backend


def test_ipython_displays_a_returned_figure_without_the_inline_backend(scene):
    """What Jupyter does with a cell's last value: the figure becomes an image/png output."""
    formatters = pytest.importorskip("IPython.core.formatters")
    data, _ = formatters.DisplayFormatter().format(plot.plot_ndvi_scatter(np.linspace(0, 1, 50), np.linspace(0, 1, 50)))
    assert data["image/png"].startswith(PNG_SIGNATURE)


def test_plot_dates_returns_one_figure_per_date_or_writes_them(scene, tmp_path):
    figures = plot.plot_dates(scene)
    assert len(figures) == scene.sizes["time"] and all(isinstance(f, Figure) for f in figures)
    paths = plot.plot_dates(scene, tmp_path, prefix="d")
    assert [Path(p).name[:4] for p in paths] == ["d_1_", "d_2_", "d_3_"] and all(Path(p).is_file() for p in paths)


def test_the_package_never_switches_the_matplotlib_backend():
    """No ``matplotlib.use``, ``switch_backend``, ``MPLBACKEND`` write or pyplot import (pyplot picks a backend)."""
    offending = re.compile(
        r"matplotlib\.use\(|switch_backend|MPLBACKEND.\]\s*=|setenv\(\s*.MPLBACKEND|setdefault\(\s*.MPLBACKEND"
        r"|import matplotlib\.pyplot|from matplotlib import pyplot|matplotlib\.pyplot import"
    )
    found = [
        f"{source.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for source in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(source.read_text().splitlines(), start=1)
        if offending.search(line)
    ]
    assert not found, found
