"""cmsn-cube train (CLI) end to end, the cmsn evaluation method, and every packaged checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cmsn_cube.cli import main
from cmsn_cube.testing import tiny_scene, tiny_store

torch = pytest.importorskip("torch")

from cmsn_cube.model import CMSN, list_models, load_model, model_card, save_checkpoint  # noqa: E402

TINY = {"width": 8, "depth": 1, "fusion_depth": 0, "skip_width": 4}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("train") / "tiny.zarr", size=96, seed=5)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", CMSN(**TINY))


def test_train_command_writes_a_loadable_checkpoint_and_plot(store, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        str(store),
        "--out",
        str(out),
        "--steps",
        "3",
        "--patch-size",
        "32",
        "--overlap",
        "8",
        "--batch-size",
        "2",
    ]
    args += ["--width", "8", "--depth", "1", "--fusion-depth", "0", "--skip-width", "4", "--lambda-cloudy", "3"]
    args += ["--radiometric", "--balance"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "3 steps" in result.output
    for name in ("best.pt", "best.json", "last.pt", "history.json", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_model(out / "best.pt")
    assert model.config["width"] == 8
    card = model_card(out / "best.pt")
    assert card["training"]["steps"] == 3
    assert card["training"]["loss_weights"]["lambda_cloudy"] == 3
    data = card["training"]["training_data"]
    assert data["stores"][0]["store"] == str(store) and data["stores"][0]["truth"] == "cube"
    assert data["patch_size"] == 32
    assert data["radiometric"] is True and data["balance"] is True
    history = json.loads((out / "history.json").read_text())
    assert history["train"] and history["val"]


def test_train_command_refuses_architecture_options_with_init(store, tmp_path, tiny_checkpoint):
    args = ["train", str(store), "--out", str(tmp_path), "--steps", "1", "--init", str(tiny_checkpoint)]
    result = CliRunner().invoke(main, [*args, "--width", "16"])
    assert result.exit_code == 1
    assert "init" in result.output


def test_evaluate_with_the_cmsn_method_gives_a_row(store, tiny_checkpoint):
    args = ["evaluate", str(store), "--methods", "cmsn,nearest", "--model", str(tiny_checkpoint)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines() if line.split()]
    assert "cmsn" in rows and "nearest" in rows


def test_evaluate_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, cmsn_cube.evaluate; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


@pytest.mark.parametrize("name", list_models())
def test_packaged_model_loads_and_keeps_clear_pixels(name):
    from cmsn_cube.inference import reconstruct

    model = load_model(name)  # verifies the sha256 of the card
    assert model_card(name)["sha256"]
    cube = tiny_scene(size=40, seed=2).drop_vars("truth")
    result = reconstruct(cube, model=name, tile=40, overlap=0)["reconstructed"].values
    observed = cube["reflectance"].values
    clear = ~cube["cloud_mask"].values[:, None] & np.isfinite(observed)
    clear = np.broadcast_to(clear, observed.shape)
    assert np.array_equal(result[clear], observed[clear])
    assert np.isfinite(result).all()
    assert model.num_parameters > 0


def test_there_is_a_packaged_default_model():
    from cmsn_cube.inference import DEFAULT_MODEL

    assert DEFAULT_MODEL in list_models()
