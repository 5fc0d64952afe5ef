from __future__ import annotations

import json
import pickle

import pytest
import torch

import cmsn_cube.model.checkpoint as checkpoint_module
from cmsn_cube.exceptions import BandMismatchError, CheckpointError, UnknownModelError
from cmsn_cube.model import CMSN, list_models, load_model, model_card, save_checkpoint
from cmsn_cube.model.checkpoint import file_sha256


@pytest.fixture
def saved(tmp_path, tiny_config):
    torch.manual_seed(0)
    net = CMSN(**tiny_config).eval()
    path = save_checkpoint(tmp_path / "tiny.pt", net, metadata={"training": {"steps": 3}})
    return net, path


def test_round_trip_reproduces_outputs_exactly(saved, batch_factory):
    net, path = saved
    inputs = batch_factory(batch=1, height=21, width=19)["inputs"]
    loaded = load_model(path)
    assert not loaded.training
    with torch.no_grad():
        expected, actual = net(inputs), loaded(inputs)
    for name in ("coarse", "refined", "output"):
        assert torch.equal(getattr(expected, name), getattr(actual, name)), name


def test_card_describes_the_weights(saved):
    net, path = saved
    card = model_card(path)
    assert card["sha256"] == file_sha256(path)
    assert card["bands"] == ["blue", "green", "red", "nir"]
    assert card["config"] == net.config
    assert card["training"] == {"steps": 3}
    assert card["normalisation"]["band_std"] == net.config["band_std"]
    assert not list(path.parent.glob("*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_respect_the_umask(tmp_path, tiny_config, umask, mode):
    # issue 29 item 4: mkstemp's private 0600 leaked into checkpoints, cards and history files
    import os
    import stat

    from cmsn_cube.training.history import write_history

    previous = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "tiny.pt", CMSN(**tiny_config).eval())
        write_history({"train": [], "val": []}, tmp_path)
    finally:
        os.umask(previous)
    for written in (path, path.with_suffix(".json"), tmp_path / "history.json", tmp_path / "loss.png"):
        assert stat.S_IMODE(written.stat().st_mode) == mode, (written.name, oct(written.stat().st_mode))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_pickle_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="not a (loadable )?cmsn-cube checkpoint"):
        load_model(path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "cmsn-cube-checkpoint", "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(path)
    assert "never run" not in capsys.readouterr().out


def test_bare_state_dict_is_refused(tmp_path, tiny_config):
    path = tmp_path / "state.pt"
    torch.save(CMSN(**tiny_config).state_dict(), path)
    with pytest.raises(CheckpointError, match="bare state_dict"):
        load_model(path)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError):
        load_model(path)


def test_changed_bytes_fail_the_card_hash(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(path)


def test_altered_weights_are_caught_without_a_card(saved):
    _, path = saved
    path.with_suffix(".json").unlink()
    payload = torch.load(path, weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first] = payload["state_dict"][first] + 1.0
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="digest"):
        load_model(path)


def test_config_of_another_architecture_is_refused(saved):
    _, path = saved
    path.with_suffix(".json").unlink()
    payload = torch.load(path, weights_only=True)
    payload["config"]["architecture"] = "someone-else/unet"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="architecture"):
        load_model(path)
    payload["config"]["architecture"] = checkpoint_module.ARCHITECTURE
    payload["config"]["width"] = 12  # weights no longer fit the config
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)


def test_band_order_mismatch_is_refused(tmp_path, saved, tiny_config):
    _, path = saved
    with pytest.raises(BandMismatchError, match="reorder"):
        load_model(path, bands=("red", "green", "blue", "nir"))
    swapped = save_checkpoint(tmp_path / "swapped.pt", CMSN(**tiny_config, bands=("green", "blue", "red", "nir")))
    with pytest.raises(BandMismatchError):
        load_model(swapped)
    assert load_model(swapped, bands=None).config["bands"][0] == "green"


def test_registry_by_name(tmp_path, monkeypatch, tiny_config):
    with pytest.raises(UnknownModelError, match="no packaged model"):
        load_model("no-such-model")
    # A registry folder of our own: the real one ships with the package.
    monkeypatch.setattr(checkpoint_module, "WEIGHTS_DIR", tmp_path)
    save_checkpoint(tmp_path / "cmsn-tiny.pt", CMSN(**tiny_config))
    assert list_models() == ["cmsn-tiny"]
    assert load_model("cmsn-tiny").config["width"] == tiny_config["width"]
    assert json.loads((tmp_path / "cmsn-tiny.json").read_text())["name"] == "cmsn-tiny"
    (tmp_path / "cmsn-tiny.json").unlink()
    with pytest.raises(CheckpointError, match="no card"):
        load_model("cmsn-tiny")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.pt")
