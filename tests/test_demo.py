"""The end-to-end demo, its figures, the CLI's foundation commands and the analysis notebook."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.image import imread

from cmsn_cube.cli import main
from cmsn_cube.exceptions import CMSNCubeError
from cmsn_cube.model import CMSN, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return str(save_checkpoint(path, CMSN(width=8, depth=1, skip_width=4)))


def assert_real_png(path: str | Path | io.BytesIO) -> None:
    image = imread(path, format="png")
    assert image.ndim == 3 and min(image.shape[:2]) >= 200, f"{path} is too small: {image.shape}"
    assert float(image[..., :3].std()) > 0.02, f"{path} is (nearly) uniform"


def test_synth_and_info(tmp_path):
    runner = CliRunner()
    store = tmp_path / "s.zarr"
    result = runner.invoke(main, ["synth", str(store), "--height", "64", "--width", "80", "--cloud", "0.3,0.1,0.2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["info", str(store)])
    assert result.exit_code == 0, result.output
    assert "EPSG:32650" in result.output and "64 x 80 px" in result.output
    percents = [float(line.split()[-1]) for line in result.output.splitlines() if "LANDSAT_8" in line]
    assert np.allclose(percents, [30, 10, 20], atol=2)


def test_cli_reports_bad_store_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 1
    assert "error: no store" in result.output and "Traceback" not in result.output


def test_info_on_a_folder_of_cogs_points_to_import(tmp_path):
    # issue 29 item 5: a folder of GeoTIFFs is not a store to synthesize over
    folder = tmp_path / "cogs"
    folder.mkdir()
    for date in ("2020-01-01", "2020-01-17"):
        (folder / f"LC08_{date}.tif").write_bytes(b"II*\x00")
    result = CliRunner().invoke(main, ["info", str(folder)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: {folder} is not a Zarr store (no zarr.json or .zgroup in it); to read GeoTIFFs or COGs as a cube, "
        "convert them with `cmsn-cube import` or open them with cmsn_cube.sources.stack.open_stack"
    )
    assert "synth" not in result.output and list(folder.iterdir())  # nothing written or removed


def test_demo_writes_report_tables_and_figures(tmp_path, tiny_checkpoint):
    out = tmp_path / "demo"

    def demo(size: int) -> list[str]:
        return ["demo", "--out", str(out), "--store", str(tmp_path / "demo.zarr"), "--size", str(size), "--model",
                tiny_checkpoint]  # fmt: skip

    result = CliRunner().invoke(main, demo(256))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["cloudy_summary"]) == {"auto", "nearest", "linear", "median", "regression"}
    for method, row in summary["cloudy_summary"].items():
        assert 15 < row["psnr"] < 80, (method, row)
    report = (out / "report.md").read_text()
    assert "## Scene self-check" in report and "weighted-regression" in report
    for figure in summary["figures"]:
        assert_real_png(figure)
        assert f"({Path(figure).name})" in report, f"report does not link {figure}"
    assert {Path(f).name for f in summary["figures"]} >= {
        "panel_T1.png",
        "ndvi_T1.png",
        "ndvi_scatter.png",
        "methods_cloudy.png",
    }
    assert (out / "evaluation.csv").stat().st_size > 0
    assert (out / "reconstruction.zarr").exists()

    again = demo(64)
    rerun = CliRunner().invoke(main, again)
    assert rerun.exit_code == 0, rerun.output  # a demo replaces what an earlier demo wrote
    assert json.loads((out / "demo.json").read_text())["written"]["report.md"] != summary["written"]["report.md"]
    (out / "report.md").write_text("edited by hand")
    refused = CliRunner().invoke(main, again)
    assert refused.exit_code == 1 and "report.md, not written by an earlier demo" in refused.output, refused.output
    assert (out / "report.md").read_text() == "edited by hand"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CMSN_NOTEBOOK_STORE", str(tmp_path / "nb.zarr"))
    monkeypatch.setenv("CMSN_NOTEBOOK_FIGURES", str(tmp_path / "figures"))
    # headless, as `make test` runs it: the kernel inherits MPLBACKEND=Agg and must still embed its figures
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(REPO / "notebooks" / "cloud_removal_analysis.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit notebooks without outputs"
    )
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    for name in ("clouds_per_date.png", "before_after.png", "ndvi_T1.png", "methods_psnr.png"):
        assert_real_png(tmp_path / "figures" / name)
    # every figure is embedded in the notebook as a PNG, the one cmsn_cube.plot returns included
    embedded = {
        i: [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
    }
    drawing = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" and "savefig" in cell.source]
    assert len(drawing) == 4 and all(len(embedded[i]) == 1 for i in drawing), {i: len(embedded[i]) for i in drawing}
    for i in drawing:
        assert_real_png(io.BytesIO(base64.b64decode(embedded[i][0]["data"]["image/png"])))


def test_accessor_plot_draws_the_panel_with_truth(tmp_path, tiny_checkpoint):
    from cmsn_cube.testing import tiny_scene

    scene = tiny_scene(size=96, seed=3)
    path = scene.cmsn.plot(tmp_path / "panel.png", date=1, model=tiny_checkpoint)
    assert_real_png(path)
    with pytest.raises(ValueError, match="date must be 0, 1 or 2"):
        scene.cmsn.plot(tmp_path / "other.png", date=3, model=tiny_checkpoint)
    with pytest.raises(CMSNCubeError, match="at least 3"):
        scene.isel(time=[0, 1]).cmsn.plot(tmp_path / "two.png", model=tiny_checkpoint)
    assert not (tmp_path / "other.png").exists() and not (tmp_path / "two.png").exists()


def test_accessor_plot_draws_a_window_of_a_longer_series(tmp_path, tiny_checkpoint):
    # issue 29 item 5: on more than three dates plot() said "predict_window takes exactly 3 dates"
    from cmsn_cube.sources.synthetic import synthetic_scene

    scene = synthetic_scene(height=96, width=96, n_dates=5, seed=3, cloud_fractions=[0.1, 0.1, 0.1, 0.35, 0.1])
    days = [str(np.datetime_as_string(t, unit="D")) for t in scene.time.values]

    def titles(figure) -> list[str]:
        return [ax.get_title() for ax in figure.axes if ax.get_title()]

    cloudiest = titles(scene.cmsn.plot(model=tiny_checkpoint))  # default: the cloudiest date, 3, between 2 and 4
    assert [title.split()[1] for title in cloudiest[:3]] == days[2:5]
    assert cloudiest[3:5] == ["T2 coarse (decoder)", "T2 refined (clear pixels kept)"]
    first = titles(scene.cmsn.plot(date=0, model=tiny_checkpoint))  # the series' start: dates 0, 1, 2, the first
    assert [title.split()[1] for title in first[:3]] == days[:3] and first[3] == "T1 coarse (decoder)"
    by_day = titles(scene.cmsn.plot(date=days[1], model=tiny_checkpoint))
    assert [title.split()[1] for title in by_day[:3]] == days[:3] and by_day[3] == "T2 coarse (decoder)"
    assert_real_png(scene.cmsn.plot(tmp_path / "panel.png", date=4, model=tiny_checkpoint))
    with pytest.raises(ValueError, match=r"date must be 0, 1, 2, 3 or 4 \(an index among the cube's 5 dates\)"):
        scene.cmsn.plot(date=5, model=tiny_checkpoint)


def test_demo_never_replaces_a_users_cube_or_files(tmp_path):
    from cmsn_cube.sources.synthetic import synthetic_scene
    from cmsn_cube.store import open_cube, write_cube

    users = synthetic_scene(height=32, width=32, seed=1)  # a synth store of the user's, another seed
    path = write_cube(users, tmp_path / "mine.zarr")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--store", path, "--size", "64"])
    assert result.exit_code == 1 and "the demo did not write; pass --overwrite" in result.output, result.output
    np.testing.assert_array_equal(open_cube(path)["reflectance"].values, users["reflectance"].values)
    assert not (tmp_path / "demo").exists(), "refused before any work"

    own = tmp_path / "d"
    own.mkdir()
    (own / "report.md").write_text("my notes")
    result = CliRunner().invoke(
        main, ["demo", "--out", str(own), "--store", str(tmp_path / "fresh.zarr"), "--size", "64"]
    )
    assert result.exit_code == 1 and "report.md, not written by an earlier demo" in result.output, result.output
    assert (own / "report.md").read_text() == "my notes"
    assert not (tmp_path / "fresh.zarr").exists(), "refused before the scene was written"
