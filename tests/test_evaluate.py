"""evaluate(): a table on the embedded scene (API and CLI), files written, the model hook, real data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cmsn_cube.cli import main
from cmsn_cube.evaluate import evaluate
from cmsn_cube.exceptions import CubeValidationError
from cmsn_cube.testing import shared_data_path, tiny_scene, tiny_store


@pytest.fixture(scope="module")
def scene():
    return tiny_scene(size=96, seed=1)


def test_evaluate_prints_a_table_and_writes_files(scene, tmp_path, capsys):
    table = evaluate(scene, out=tmp_path)
    printed = capsys.readouterr().out
    for name in ("nearest", "linear", "median", "regression", "psnr", "ssim", "cloudy", "all"):
        assert name in printed
    assert set(table.index.get_level_values("method")) == {"nearest", "linear", "median", "regression"}
    cloudy = table.xs(("cloudy", "mean"), level=("region", "band"))
    assert (cloudy["psnr"] > 20).all() and (cloudy["ssim"] > 0.5).all()
    assert cloudy["n_pixels"].iloc[0] == int(scene["cloud_mask"].sum())
    assert (tmp_path / "evaluation.csv").read_text().startswith("method,region,band,psnr")
    records = json.loads((tmp_path / "evaluation.json").read_text())
    assert len(records) == 4 * 3 * 5  # methods x regions (cloudy, common, all) x (4 bands + mean)


def test_methods_of_unequal_coverage_are_also_scored_on_common_pixels(scene):
    def half_filler(cube):
        # fills only the left half of every gap: the common region must shrink to what both methods filled
        filled = cube["reflectance"].where(~cube["cloud_mask"], scene["truth"])  # methods never see truth
        return filled.where(~cube["cloud_mask"] | (cube["x"] < cube["x"][cube.sizes["x"] // 2]))

    table = evaluate(scene, methods=["nearest", half_filler], echo=None)
    cloudy = table.xs(("cloudy", "mean"), level=("region", "band"))
    common = table.xs(("common", "mean"), level=("region", "band"))
    assert cloudy.loc["half_filler", "coverage"] < 0.75
    assert common["coverage"].eq(1.0).all()
    gaps = scene["cloud_mask"].values
    left = scene["x"].values < scene["x"].values[scene.sizes["x"] // 2]
    assert common["n_pixels"].iloc[0] < int((gaps & left[None, None, :]).sum()) + 1
    assert common.loc["half_filler", "psnr"] == np.inf  # it pasted the truth where it filled


def test_a_callable_method_is_scored_and_never_sees_the_truth(scene):
    seen = []

    def truth_peeker(cube):
        seen.append("truth" in cube)
        return cube["reflectance"].fillna(0).where(~cube["cloud_mask"], 0)

    table = evaluate(scene, methods=["nearest", truth_peeker], echo=None)
    assert seen == [False]
    zero_fill = table.loc[("truth_peeker", "cloudy", "mean")]
    assert zero_fill["mae"] > table.loc[("nearest", "cloudy", "mean")]["mae"]
    with pytest.raises(CubeValidationError):
        evaluate(scene, methods=["kriging"], echo=None)


def test_pasting_clouds_and_scoring_baselines_import_no_torch():
    script = (
        "import sys, cmsn_cube.clouds, cmsn_cube.evaluate\n"
        "assert 'torch' not in sys.modules, 'importing clouds/evaluate loaded torch'\n"
        "from cmsn_cube.testing import tiny_scene\n"
        "cube = tiny_scene(size=48, seed=2).drop_vars('truth')\n"
        "cmsn_cube.evaluate.evaluate(cube, methods=['nearest'], truth='pasted', echo=None)\n"
        "assert 'torch' not in sys.modules, 'scoring with pasted clouds loaded torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_cli_evaluate_on_a_store(scene, tmp_path):
    store = tiny_store(tmp_path / "scene.zarr", scene)
    result = CliRunner().invoke(
        main, ["evaluate", store, "--methods", "nearest,median", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "nearest" in result.output and "median" in result.output and "regression" not in result.output
    assert (tmp_path / "out" / "evaluation.json").exists()
    bad = CliRunner().invoke(main, ["evaluate", str(tmp_path / "missing.zarr")])
    assert bad.exit_code == 1 and "no store" in bad.output


def test_evaluate_accepts_every_reconstruct_method(scene, tmp_path):
    # issue 29 item 5: `reconstruct --method weighted-regression` was accepted, `evaluate --methods` refused it
    from cmsn_cube.selfcheck import METHODS

    store = tiny_store(tmp_path / "scene.zarr", scene)
    names = ["auto", *METHODS]
    assert names == ["auto", "cmsn", "regression", "weighted-regression", "blend"]
    result = CliRunner().invoke(main, ["evaluate", store, "--methods", ",".join(names)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[2:-1]}
    assert list(rows) == names
    table = evaluate(scene, methods=["weighted-regression"], echo=None)
    cloudy = table.loc[("weighted-regression", "cloudy", "mean")]
    assert cloudy["coverage"] == 1.0 and 30 < cloudy["psnr"] < 60  # fills every cloudy pixel, as reconstruct
    assert rows["weighted-regression"][0] == f"{cloudy['psnr']:.2f}"


def test_printed_table_is_compact_and_matches_the_table(scene, capsys):
    table = evaluate(scene)  # the four baselines: the old table was 170 columns wide
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) < 120, lines
    assert lines[0].startswith(f"cloudy pixels scored: {int(scene['cloud_mask'].sum())} ")
    assert lines[1].split() == ["method", "PSNR", "dB", "SSIM", "SAM", "deg", "MAE", "filled", "%", "common", "PSNR"]
    nearest = table.loc[("nearest", "cloudy", "mean")]
    common = table.loc[("nearest", "common", "mean")]
    expected = [
        "nearest",
        f"{nearest['psnr']:.2f}",
        f"{nearest['ssim']:.4f}",
        f"{nearest['sam']:.2f}",
        f"{nearest['mae']:.4f}",
        f"{nearest['coverage']:.1%}",
        f"{common['psnr']:.2f}",
    ]
    assert lines[2].split() == expected


@pytest.mark.skipif(
    shared_data_path("cbers_timeseries") is None, reason="shared data (../shared/data or $CMSN_SHARED_DATA) absent"
)
def test_evaluate_real_cbers_with_pasted_clouds():
    from cmsn_cube.sources.cbers import open_cbers_series

    cube = open_cbers_series(shared_data_path("cbers_timeseries")).isel(time=slice(0, 8))
    table = evaluate(cube, methods=["nearest", "linear"], seed=3, echo=None)
    cloudy = table.xs(("cloudy", "mean"), level=("region", "band"))
    assert (cloudy["n_pixels"] > 0).all() and np.isfinite(cloudy["psnr"]).all()
    again = evaluate(cube, methods=["nearest", "linear"], seed=3, echo=None)
    assert again.equals(table)
