"""Fault injection: nothing lost, nothing invented without saying so, every error one line.

Each case is a fault a user meets: a process killed with SIGKILL in the middle of a write (a real kill of a
real process, at a chosen point), a path given twice, a store at the output that is not ours, a changed model or
scene between resumes, empty scenes, digital numbers and ±inf read lazily from a store, deleted and truncated
chunk files, bad numbers, unreachable schedulers, URLs without their filesystem package.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from cmsn_cube.cli import main
from cmsn_cube.cluster import get_client
from cmsn_cube.exceptions import (
    ArgumentError,
    CheckpointError,
    CMSNCubeWarning,
    ModelOutputError,
    NoDataError,
    OutputExistsError,
    OutputLockedError,
    ReflectanceRangeError,
    SchedulerError,
    StoreError,
)
from cmsn_cube.inference import INVENTED, UNOBSERVED, reconstruct, write_reconstruction
from cmsn_cube.model import CMSN, save_checkpoint
from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import append_cube, open_cube, open_reconstruction, write_cube

TILING = {"tile": 64, "overlap": 8, "chunk": 128}
CLI_TILING = ["--tile", "64", "--overlap", "8", "--chunk", "128", "--workers", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CMSN(width=8, depth=1, fusion_depth=1, skip_width=4).eval()
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", model)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = CMSN(width=8, depth=1, fusion_depth=1, skip_width=4).eval()
    return save_checkpoint(tmp_path_factory.mktemp("model") / "other.pt", model)


@pytest.fixture(scope="module")
def scene() -> xr.Dataset:
    return synthetic_scene(height=150, width=140, seed=5)


@pytest.fixture()
def store(tmp_path, scene) -> str:
    return write_cube(scene, tmp_path / "scene.zarr", chunks={"time": 1, "band": 4, "y": 64, "x": 64})


def killed_at(call: str, code: str, *, after: int = 1) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python process whose ``call`` (``module:function``) SIGKILLs the process on its
    ``after``-th call, before doing anything."""
    module, function = call.split(":")
    script = textwrap.dedent(
        f"""
        import os, signal, {module} as target
        original, calls = target.{function}, []
        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) >= {after}:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        target.{function} = dying
        """
    ) + textwrap.dedent(code)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    return run


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    """The CLI's error output, asserted to be exactly one line starting with ``error:``."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert result.exit_code != 0, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ killed writes


def test_reconstruct_killed_then_rerun_equals_an_uninterrupted_run(store, checkpoint, tmp_path):
    out = str(tmp_path / "out.zarr")
    killed_at(
        "cmsn_cube.inference.write:write_region",
        f"""
        import dask
        from cmsn_cube.inference import reconstruct, write_reconstruction
        from cmsn_cube.store import open_cube
        dask.config.set(scheduler="synchronous")  # regions one after the other: killed after exactly two
        write_reconstruction(reconstruct(open_cube({store!r}), model={str(checkpoint)!r}, **{TILING!r}),
                             {out!r}, progress=False)
        """,
        after=3,
    )
    with pytest.raises(StoreError, match=r"incomplete: 2 of 6 regions written"):
        open_reconstruction(out)
    result = reconstruct(open_cube(store), model=checkpoint, **TILING)
    write_reconstruction(result, out, progress=False)
    reopened = open_reconstruction(out)
    expected = result.compute()
    for name in ("reconstructed", "filled", "ndvi", "observed_dates"):
        xr.testing.assert_identical(reopened[name].load().drop_attrs(), expected[name].drop_attrs())
    assert not (Path(out) / "_cmsn_regions").exists(), "markers are removed once the store is complete"


def test_rerunning_a_finished_reconstruction_is_a_no_op(store, checkpoint, tmp_path, monkeypatch):
    from cmsn_cube.inference import write

    out = str(tmp_path / "out.zarr")
    write_reconstruction(reconstruct(open_cube(store), model=checkpoint, **TILING), out, progress=False)
    calls: list[int] = []
    monkeypatch.setattr(write, "write_region", lambda *a, **k: calls.append(1))
    run = CliRunner().invoke(main, ["reconstruct", store, out, "--model", str(checkpoint), "--tile", "64",
                                    "--overlap", "8", "--chunk", "128"])  # fmt: skip
    assert run.exit_code == 0 and "already complete" in run.output, run.output
    assert calls == []


def test_write_cube_killed_leaves_the_old_store_and_no_temporary_folder(scene, tmp_path):
    path = tmp_path / "cube.zarr"
    write_cube(scene.isel(time=[0, 1, 2]), path)
    killed_at(
        "cmsn_cube.store:mark_store_complete",
        f"""
        from cmsn_cube.sources.synthetic import synthetic_scene
        from cmsn_cube.store import write_cube
        write_cube(synthetic_scene(height=150, width=140, seed=6), {str(path)!r}, overwrite=True)
        """,
    )
    assert list(tmp_path.glob(".cube.zarr.writing-*")), "the killed write left its temporary folder"
    xr.testing.assert_identical(open_cube(path).load(), open_cube(path).load())
    np.testing.assert_array_equal(open_cube(path).reflectance.values, scene.reflectance.values)  # the old one
    write_cube(synthetic_scene(height=150, width=140, seed=6), path, overwrite=True)
    assert not list(tmp_path.glob(".cube.zarr.*")), "the next write removes what the killed one left"


def test_append_killed_opens_with_the_original_dates_and_the_next_append_completes(scene, tmp_path):
    path = str(tmp_path / "cube.zarr")
    write_cube(scene.isel(time=[0, 1]), path)
    killed_at(
        "cmsn_cube.store:_set_attrs",
        f"""
        from cmsn_cube.sources.synthetic import synthetic_scene
        from cmsn_cube.store import append_cube
        append_cube(synthetic_scene(height=150, width=140, seed=5).isel(time=[2]), {path!r})
        """,
        after=2,  # the first call flags the append, the second would mark it complete: killed after the data
    )
    with pytest.warns(CMSNCubeWarning, match="append .* was interrupted: opening its 2 original dates"):
        interrupted = open_cube(path)
    assert interrupted.sizes["time"] == 2
    append_cube(scene.isel(time=[2]), path)
    np.testing.assert_array_equal(open_cube(path).reflectance.values, scene.reflectance.values)


# ------------------------------------------------------------------------------------------ nothing overwritten


def test_the_input_is_never_the_output_in_any_spelling(store, checkpoint, tmp_path):
    result = reconstruct(open_cube(store), model=checkpoint, **TILING)
    link = tmp_path / "link.zarr"
    link.symlink_to(store)
    for spelling in (store, store + "/", "file://" + store, str(link)):
        with pytest.raises(StoreError, match="is the input of this reconstruction"):
            write_reconstruction(result, spelling, overwrite=True, progress=False)
    run = CliRunner().invoke(main, ["reconstruct", store, store, "--overwrite", "--model", str(checkpoint)])
    assert "is the input" in one_line_error(run)
    assert open_cube(store).reflectance.sum().values > 0, "the input is intact"


def test_a_store_or_folder_at_the_output_is_left_alone(store, scene, checkpoint, tmp_path):
    result = reconstruct(open_cube(store), model=checkpoint, **TILING)
    other = write_cube(scene, tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="holds a cube; pass overwrite=True"):
        write_reconstruction(result, other, progress=False)
    assert open_cube(other).sizes["time"] == 3
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a Zarr store; it is left alone"):
        write_reconstruction(result, folder, overwrite=True, progress=False)
    assert (folder / "notes.txt").read_text() == "keep me"
    write_reconstruction(result, other, overwrite=True, progress=False)  # replaced on request
    assert "reconstructed" in open_reconstruction(other)


def test_a_resume_with_another_model_or_scene_is_refused(store, scene, checkpoint, other_checkpoint, tmp_path):
    out = str(tmp_path / "out.zarr")
    write_reconstruction(reconstruct(open_cube(store), model=checkpoint, **TILING), out, max_regions=3, progress=False)
    with pytest.raises(StoreError, match="another model_sha256"):
        write_reconstruction(reconstruct(open_cube(store), model=other_checkpoint, **TILING), out, progress=False)
    # another scene on the same grid, times and chunks
    same_grid = scene.copy(deep=True)
    same_grid["reflectance"] = scene.reflectance[::-1].assign_coords(time=scene.time)
    other_store = write_cube(same_grid, tmp_path / "b.zarr", chunks={"time": 1, "band": 4, "y": 64, "x": 64})
    with pytest.raises(StoreError, match="another input_fingerprint"):
        write_reconstruction(reconstruct(open_cube(other_store), model=checkpoint, **TILING), out, progress=False)
    # the same scene rewritten in place is another input too
    write_cube(same_grid, store, overwrite=True, chunks={"time": 1, "band": 4, "y": 64, "x": 64})
    with pytest.raises(StoreError, match="another input_fingerprint"):
        write_reconstruction(reconstruct(open_cube(store), model=checkpoint, **TILING), out, progress=False)


# ------------------------------------------------------------------------------------------ nothing invented


@pytest.mark.parametrize("fault", ["all cloud", "all NaN"])
def test_a_scene_with_nothing_observed_raises_no_data(scene, checkpoint, tmp_path, fault):
    if fault == "all cloud":
        empty = scene.assign(cloud_mask=xr.ones_like(scene.cloud_mask))
    else:
        empty = scene.assign(reflectance=xr.full_like(scene.reflectance, np.nan))
    with pytest.raises(NoDataError, match="no clear pixel on any date"):
        reconstruct(empty, model=checkpoint, **TILING)
    lazy = open_cube(write_cube(empty, tmp_path / "empty.zarr"))
    result = reconstruct(lazy, model=checkpoint, **TILING)  # lazy: nothing read yet
    with pytest.raises(NoDataError):
        write_reconstruction(result, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists(), "nothing is written for an empty scene"
    # nor on a client, where the regions stream through the workers
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster):
            with pytest.raises(NoDataError):
                write_reconstruction(result, tmp_path / "out.zarr", progress=False)
    assert not (tmp_path / "out.zarr").exists(), "nothing is written for an empty scene on a client"


def test_pixels_no_date_observed_are_nan_and_flagged_unless_asked(scene, checkpoint):
    mask = scene.cloud_mask.values.copy()
    mask[:, :20, :30] = True  # cloudy on every date
    cube = scene.assign(cloud_mask=(scene.cloud_mask.dims, mask))
    never = mask.all(axis=0)
    with pytest.warns(
        CMSNCubeWarning, match=rf"{never.sum()} pixels \({100 * never.mean():.2f} %\) of .* observed on no date"
    ):
        result = reconstruct(cube, model=checkpoint, **TILING).compute()
    assert (result.filled.values[:, :20, :30] == UNOBSERVED).all()
    assert np.isnan(result.reconstructed.values[:, :, :20, :30]).all()
    seen = ~mask.all(axis=0)
    assert np.isfinite(result.reconstructed.values[:, :, seen]).all()
    assert np.isnan(result.reconstructed.values[:, :, ~seen]).all()
    with pytest.warns(CMSNCubeWarning):
        guessed = reconstruct(cube, model=checkpoint, fill_unobserved=True, **TILING).compute()
    assert (guessed.filled.values[:, :20, :30] == INVENTED).all()
    assert np.isfinite(guessed.reconstructed.values).all()
    assert guessed.filled.attrs["flag_meanings"].split()[INVENTED] == "unobserved_filled_by_network"


# ------------------------------------------------------------------------------------------ values read lazily


@pytest.mark.parametrize(
    ("value", "match"),
    [(3.0, r"reflectance in rows \d+:\d+, columns \d+:\d+ ranges .*\.\.3, .*digital numbers"), (np.inf, "infinite")],
)
def test_bad_values_in_a_store_are_named_when_read(scene, checkpoint, tmp_path, value, match):
    import zarr

    path = write_cube(scene, tmp_path / "bad.zarr")
    zarr.open_array(f"{path}/reflectance")[1, 2, 100, 120] = value  # another tool writes one bad pixel
    lazy = open_cube(path)  # metadata checks pass: values are not read
    with pytest.raises(ReflectanceRangeError, match=match):
        write_reconstruction(reconstruct(lazy, model=checkpoint, **TILING), tmp_path / "out.zarr", progress=False)
    with pytest.raises(ReflectanceRangeError, match=match.split(" in rows")[0].split(" ranges")[0]):
        reconstruct(lazy.load(), model=checkpoint, **TILING)  # in memory: refused at once


def test_digital_numbers_from_a_store_are_refused(scene, checkpoint, tmp_path):
    digital = scene.assign(reflectance=scene.reflectance * 10000)
    lazy = open_cube(write_cube(digital.chunk({"time": 1}), tmp_path / "dn.zarr"))
    with pytest.raises(ReflectanceRangeError, match="digital numbers"):
        reconstruct(lazy, model=checkpoint, **TILING).compute()


def test_deleted_chunk_files_are_named_not_read_as_empty(store):
    for name in ("reflectance", "cloud_mask"):
        chunk = sorted((Path(store) / name / "c").rglob("*"))[-1]
        saved = chunk.read_bytes()
        chunk.unlink()
        with pytest.raises(StoreError, match=f"chunk c/.* of '{name}' .* is missing"):
            open_cube(store)
        chunk.write_bytes(saved)
    open_cube(store)


def test_a_truncated_chunk_is_named(store, checkpoint, tmp_path):
    chunk = Path(store) / "reflectance" / "c" / "1" / "0" / "1" / "1"
    chunk.write_bytes(chunk.read_bytes()[:20])
    result = reconstruct(open_cube(store), model=checkpoint, **TILING)
    with pytest.raises(StoreError, match=r"chunk reflectance/c/1/0/1/1 cannot be decoded"):
        write_reconstruction(result, tmp_path / "out.zarr", progress=False)


# ------------------------------------------------------------------------------------------ arguments, addresses


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 0},
        {"batch_size": -1},
        {"tile": 0},
        {"overlap": -1},
        {"tile": 64, "overlap": 32},
        {"chunk": -5},
    ],
)
def test_bad_numbers_are_refused_by_the_api(scene, checkpoint, options):
    with pytest.raises(ArgumentError):
        reconstruct(scene, model=checkpoint, **{**TILING, **options})


@pytest.mark.parametrize("workers", [0, -1])
def test_a_cluster_without_workers_is_refused(workers):
    with pytest.raises(ArgumentError, match="workers must be > 0"):
        get_client(workers=workers)


def test_unreachable_and_non_dask_schedulers_fail_within_seconds():
    import time

    listener = socket.socket()  # accepts connections, never answers: not a Dask scheduler
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with listener:
        for address in (f"tcp://127.0.0.1:{listener.getsockname()[1]}", "tcp://127.0.0.1:9"):
            started = time.monotonic()
            with pytest.raises(SchedulerError, match="no Dask scheduler answered"):
                get_client(address, connect_timeout=2)
            assert time.monotonic() - started < 6


# ------------------------------------------------------------------------------------------ every error one line


def cli_cases(store: str, checkpoint: Path, tmp: Path) -> dict[str, list[str]]:
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:500])
    return {
        "synth, negative size": ["synth", str(tmp / "s.zarr"), "--height", "-1"],
        "synth over a store": ["synth", store],
        "synth to s3 without s3fs": ["synth", "s3://bucket/x.zarr"],
        "info of nothing": ["info", str(tmp / "missing.zarr")],
        "evaluate, unknown method": ["evaluate", store, "--methods", "magic"],
        "reconstruct, zero batch": ["reconstruct", store, str(tmp / "o.zarr"), "--batch-size", "0"],
        "reconstruct, no workers": ["reconstruct", store, str(tmp / "o.zarr"), "--workers", "-1"],
        "reconstruct, overlap of half a tile": ["reconstruct", store, str(tmp / "o.zarr"), "--overlap", "128"],
        "reconstruct, missing model": ["reconstruct", store, str(tmp / "o.zarr"), "--model", str(tmp / "no.pt")],
        "reconstruct, truncated model": ["reconstruct", store, str(tmp / "o.zarr"), "--model", str(truncated)],
        "reconstruct, cuda without GPU": ["reconstruct", store, str(tmp / "o.zarr"), "--device", "cuda:7"],
        "reconstruct, dead scheduler": ["reconstruct", store, str(tmp / "o.zarr"), "--scheduler", "tcp://127.0.0.1:9"],
        "reconstruct into its input": ["reconstruct", store, store],
        "train, zero steps": ["train", store, "--out", str(tmp / "run"), "--steps", "0"],
        "train, negative lr": ["train", store, "--out", str(tmp / "run"), "--lr", "-1"],
        "fit, zero budget": ["fit", store, "--time-budget", "0"],
        "pull without a region": ["pull"],
    }


def test_every_command_error_is_one_line(store, checkpoint, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the cuda case needs a machine without a GPU")
    for case, args in cli_cases(store, checkpoint, tmp_path).items():
        run = CliRunner().invoke(main, args)
        assert run.exception is None or isinstance(run.exception, SystemExit), (case, run.exception)
        one_line_error(run)
    assert not Path("s3:").exists(), "a URL never becomes a local folder"
    assert open_cube(store).sizes["time"] == 3


def test_the_s3_error_names_the_missing_package(tmp_path):
    pytest.importorskip("cmsn_cube")  # s3fs is not a dependency: the error must say what to install
    if _has_module("s3fs"):
        pytest.skip("s3fs is installed here")
    run = CliRunner().invoke(main, ["synth", "s3://bucket/x.zarr"])
    assert "s3fs" in one_line_error(run)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_library_calls_leave_global_state_alone(tmp_path):
    import random

    import matplotlib

    from cmsn_cube.plot import plot_ndvi_scatter
    from cmsn_cube.train import train_on_stores

    backend, threads = matplotlib.get_backend(), torch.get_num_threads()
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002 - the legacy global RNG is what callers may rely on
    random.seed(123)
    expected = (torch.rand(1), np.random.rand(), random.random())  # noqa: NPY002
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    store = write_cube(synthetic_scene(height=128, width=64, seed=1), tmp_path / "s.zarr")
    train_on_stores([store], out=tmp_path / "run", steps=1, batch_size=2, patch_size=32, overlap=8, threads=1,
                    width=4, depth=1, fusion_depth=0, skip_width=2, progress=False)  # fmt: skip
    plot_ndvi_scatter(np.random.default_rng(0).random(10), np.random.default_rng(1).random(10), tmp_path / "s.png")
    assert (torch.rand(1), np.random.rand(), random.random()) == expected  # noqa: NPY002
    assert torch.get_num_threads() == threads and matplotlib.get_backend() == backend
    assert os.path.getsize(tmp_path / "s.png") > 0


def test_urls_stay_urls_in_the_cli():
    # fsspec's in-process memory filesystem: a URL that a Path would collapse to a local folder "memory:/..."
    run = CliRunner().invoke(main, ["synth", "memory://cmsn-test/x.zarr", "--height", "64", "--width", "64"])
    assert run.exit_code == 0, run.output
    assert open_cube("memory://cmsn-test/x.zarr").sizes == {"time": 3, "band": 4, "y": 64, "x": 64}
    assert not Path("memory:").exists()


def test_a_cube_without_qa_is_told_to_bring_a_boolean_mask(scene):
    from cmsn_cube.exceptions import CubeValidationError

    with pytest.raises(CubeValidationError, match="without QA bands, add your own boolean cloud_mask"):
        reconstruct(scene.drop_vars(["cloud_mask", "qa_pixel"]))
    no_qa = scene.drop_vars("qa_pixel")  # a boolean mask alone is enough
    assert reconstruct(no_qa, model=None, **TILING)["filled"].dtype == np.uint8


def test_real_cloud_shapes_are_read_only_from_a_folder_the_user_names(monkeypatch, tmp_path):
    from cmsn_cube.clouds import default_reference_masks
    from cmsn_cube.testing import SHARED_DATA_ENV

    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    assert default_reference_masks() is None  # even where ../shared/data lies beside the repository
    (tmp_path / "cloud_masks_ukis").mkdir()
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    assert default_reference_masks() == tmp_path / "cloud_masks_ukis"


def test_a_cube_and_a_reconstruction_are_not_opened_as_each_other(store, checkpoint, tmp_path):
    out = write_reconstruction(reconstruct(open_cube(store), model=checkpoint, **TILING), tmp_path / "o.zarr")
    with pytest.raises(StoreError, match="not a reconstruction"):
        open_reconstruction(store)
    with pytest.raises(StoreError, match="is a reconstruction, not a cube"):
        open_cube(out)


# ------------------------------------------------------------------------------------------ every writer


def test_fit_and_train_never_replace_checkpoints_unasked(store, checkpoint, tmp_path):
    mine = tmp_path / "mine.pt"
    mine.write_bytes(checkpoint.read_bytes())
    fit = ["fit", store, "--steps", "1", "--model", str(checkpoint)]
    assert "mine.pt exists; pass --overwrite" in one_line_error(CliRunner().invoke(main, [*fit, "--out", str(mine)]))
    assert mine.read_bytes() == checkpoint.read_bytes()
    default = Path(store).with_name("scene-fitted.pt")  # the default --out of an earlier fit
    default.write_bytes(b"an earlier fit")
    assert "scene-fitted.pt exists" in one_line_error(CliRunner().invoke(main, fit))
    assert default.read_bytes() == b"an earlier fit"
    assert "is a Zarr store, not a file" in one_line_error(CliRunner().invoke(main, [*fit, "--out", store]))
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "best.pt").write_bytes(b"an earlier run")
    run = CliRunner().invoke(main, ["train", store, "--out", str(runs), "--steps", "1"])
    assert "already holds best.pt; pass --overwrite" in one_line_error(run)
    assert (runs / "best.pt").read_bytes() == b"an earlier run" and sorted(p.name for p in runs.iterdir()) == [
        "best.pt"
    ]
    with pytest.raises(OutputExistsError):
        save_checkpoint(mine, CMSN(width=8, depth=1, fusion_depth=1, skip_width=4))
    assert mine.read_bytes() == checkpoint.read_bytes()


def test_a_resume_on_other_stores_is_refused(store, scene, tmp_path):
    tiny = [
        "--width",
        "4",
        "--depth",
        "1",
        "--fusion-depth",
        "0",
        "--skip-width",
        "2",
        "--patch-size",
        "32",
        "--overlap",
        "8",
    ]
    options = [*tiny, "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "run")]
    first = CliRunner().invoke(main, ["train", store, *options])
    assert first.exit_code == 0, first.output
    best = (tmp_path / "run" / "best.pt").read_bytes()
    other = write_cube(scene.isel(y=slice(0, 120)), tmp_path / "other.zarr")
    run = CliRunner().invoke(main, ["train", other, *options, "--resume"])
    assert "its stores differ from this call's" in one_line_error(run)
    assert (tmp_path / "run" / "best.pt").read_bytes() == best


def test_a_store_is_never_written_inside_another(store, scene, checkpoint, tmp_path):
    for inside in (f"{store}/nested.zarr", f"{store}/reflectance/x.zarr"):
        with pytest.raises(StoreError, match="is inside the Zarr store"):
            write_cube(scene, inside)
        with pytest.raises(StoreError, match="is inside the Zarr store"):
            write_reconstruction(reconstruct(open_cube(store), model=checkpoint, **TILING), inside, progress=False)
    assert not list(Path(store).rglob("nested.zarr")) and not list(Path(store).rglob(".*.lock"))


# ------------------------------------------------------------------------------------------ one writer per output


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_recovered(
    store, scene, checkpoint, tmp_path
):
    out = tmp_path / "out.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from cmsn_cube.outputs import exclusive_writer
            with exclusive_writer({str(out)!r}):
                print("held", flush=True)
                time.sleep(300)
            """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        run = CliRunner().invoke(main, ["reconstruct", store, str(out), "--model", str(checkpoint), *CLI_TILING])
        assert f"is being written by process {holder.pid}" in one_line_error(run)
        with pytest.raises(OutputLockedError, match=f"process {holder.pid}"):
            write_cube(scene, out)
        assert not out.exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up ran, the lock file stays; the kernel released the lock
        holder.wait()
    assert (tmp_path / ".out.zarr.lock").exists()
    run = CliRunner().invoke(main, ["reconstruct", store, str(out), "--model", str(checkpoint), *CLI_TILING])
    assert run.exit_code == 0, run.output
    assert "reconstructed" in open_reconstruction(out) and not (tmp_path / ".out.zarr.lock").exists()


def test_two_runs_started_together_leave_one_whole_output(store, checkpoint, tmp_path):
    out = str(tmp_path / "out.zarr")
    code = textwrap.dedent(f"""
        import dask
        from cmsn_cube.inference import reconstruct, write_reconstruction
        from cmsn_cube.store import open_cube
        dask.config.set(scheduler="synchronous")
        write_reconstruction(reconstruct(open_cube({store!r}), model={str(checkpoint)!r}, **{TILING!r}), {out!r},
                             progress=False)
        """)
    runs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(run.wait(timeout=300), run.stderr.read() if run.stderr else "") for run in runs]
    assert all(code == 0 or "is being written by process" in error for code, error in outcomes), outcomes
    assert any(code == 0 for code, _ in outcomes)
    expected = reconstruct(open_cube(store), model=checkpoint, **TILING).compute()
    xr.testing.assert_identical(open_reconstruction(out)["reconstructed"].load(), expected["reconstructed"])


# ------------------------------------------------------------------------------------------ inputs that change


@pytest.mark.parametrize("edit", ["reflectance halved with zarr", "cloud_mask rewritten with to_zarr(region=...)"])
def test_a_resume_sees_an_input_edited_in_place(store, checkpoint, tmp_path, edit):
    import zarr

    out = str(tmp_path / "out.zarr")
    write_reconstruction(reconstruct(open_cube(store), model=checkpoint, **TILING), out, max_regions=2, progress=False)
    if edit.startswith("reflectance"):
        reflectance = zarr.open_group(store, mode="r+")["reflectance"]
        reflectance[1] = reflectance[1] / 2
    else:
        cube = open_cube(store)
        rows = cube[["cloud_mask"]].isel(time=[1], y=slice(0, 64)).load()
        rows["cloud_mask"][:] = ~rows["cloud_mask"]
        rows.drop_vars([n for n in rows.coords if n not in ("time", "y", "x")]).drop_indexes(
            ["time", "y", "x"]
        ).to_zarr(store, region={"time": slice(1, 2), "y": slice(0, 64), "x": slice(None)})
    with pytest.raises(StoreError, match="another input_fingerprint"):
        write_reconstruction(reconstruct(open_cube(store), model=checkpoint, **TILING), out, progress=False)


def test_equal_data_of_another_write_is_another_input(scene):
    from cmsn_cube.inference import input_fingerprint
    from cmsn_cube.store import WRITE_ID_ATTR

    first, second = scene.copy(), scene.copy()
    first.attrs[WRITE_ID_ATTR], second.attrs[WRITE_ID_ATTR] = "a" * 32, "b" * 32
    assert input_fingerprint(first) != input_fingerprint(second)
    assert input_fingerprint(first) == input_fingerprint(first.copy())


def test_a_finished_output_missing_a_chunk_is_not_called_complete(store, checkpoint, tmp_path):
    out = tmp_path / "out.zarr"
    reconstruct_out = ["reconstruct", store, str(out), "--model", str(checkpoint), *CLI_TILING]
    assert CliRunner().invoke(main, reconstruct_out).exit_code == 0
    next(p for p in (out / "reconstructed").rglob("*") if p.is_file() and p.name != "zarr.json").unlink()
    assert "is missing; pass overwrite=True (--overwrite)" in one_line_error(CliRunner().invoke(main, reconstruct_out))
    run = CliRunner().invoke(main, [*reconstruct_out, "--overwrite"])
    assert run.exit_code == 0 and "already complete" not in run.output, run.output
    open_reconstruction(out)  # every chunk is there again


@pytest.mark.parametrize("change", [{"tile": 32}, {"overlap": 4}, {"tile": 60, "overlap": 4}])
def test_a_resume_with_another_tiling_is_refused_and_the_regions_kept(store, checkpoint, tmp_path, change):
    out = tmp_path / "out.zarr"
    write_reconstruction(reconstruct(open_cube(store), model=checkpoint, **TILING), out, max_regions=2, progress=False)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(StoreError):
        write_reconstruction(
            reconstruct(open_cube(store), model=checkpoint, **{**TILING, **change}), out, progress=False
        )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    write_reconstruction(reconstruct(open_cube(store), model=checkpoint, **TILING), out, progress=False)  # resumes
    assert len(open_reconstruction(out).ndvi) == 3


# ------------------------------------------------------------------------------------------ models that yield NaN


def test_a_model_that_yields_non_finite_values_is_refused_before_anything_is_written(store, tmp_path):
    broken = CMSN(width=8, depth=1, fusion_depth=1, skip_width=4).eval()
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    nan_weights = save_checkpoint(tmp_path / "nan.pt", broken)
    out = tmp_path / "out.zarr"
    run = CliRunner().invoke(main, ["reconstruct", store, str(out), "--model", str(nan_weights), "--method", "cmsn"])
    assert "has non-finite weights" in one_line_error(run) and not out.exists()
    with pytest.raises(CheckpointError, match="non-finite weights"):
        reconstruct(open_cube(store), model=broken, method="cmsn", **TILING)
    with torch.no_grad():  # finite weights whose output overflows
        for parameter in broken.parameters():
            parameter.fill_(1e30)
    with pytest.raises(ModelOutputError, match="non-finite values"):
        write_reconstruction(reconstruct(open_cube(store), model=broken, method="cmsn", **TILING), out, progress=False)
    with pytest.raises(StoreError, match="incomplete: 0 of"):
        open_reconstruction(out)
