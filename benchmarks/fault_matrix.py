"""The fault matrix: bad inputs and faults against the command line, each outcome classified; prints the counts.

Every case runs ``cmsn-cube`` in a fresh process (timeout: a hang) on small stores in a scratch folder, then
checks what a user would check: the exit code, whether stderr is one ``error:`` line, whether every store that
existed before is intact (else: data loss), and, for runs that exit 0, whether the result is right (else: silent
wrong). Outcomes:

- ``clear``: refused with a one-line ``error: …`` and nothing lost (or done right, for a case that must succeed);
- ``ugly``: refused safely but with a traceback or several lines;
- ``silent-wrong``: exit 0 with a wrong or invented result;
- ``hang``: still running after the timeout;
- ``crash``: killed by a signal;
- ``data-loss``: a store that existed before the command is gone or changed.

Usage: ``python benchmarks/fault_matrix.py [--workdir /tmp/faults] [--timeout 60]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "cmsn_cube.cli"]
FAST = ["--tile", "64", "--overlap", "8", "--chunk", "128", "--workers", "1"]


@dataclass
class Case:
    name: str
    args: list[str]
    setup: Callable[[Path], None] = lambda work: None
    succeed: Callable[[Path], bool] | None = None  # None: the case must be refused
    env: dict[str, str] = field(default_factory=dict)


def digest(folder: Path) -> str:
    """A digest of every file under ``folder`` (names and bytes): any change to a store changes it."""
    hasher = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        hasher.update(str(path.relative_to(folder)).encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()


def stores(work: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in work.iterdir() if p.is_dir() and p.suffix == ".zarr"}


def base_stores(work: Path) -> None:
    from cmsn_cube.sources.synthetic import synthetic_scene
    from cmsn_cube.store import write_cube

    scene = synthetic_scene(height=150, width=140, seed=5)
    write_cube(scene, work / "a.zarr", chunks={"time": 1, "band": 4, "y": 64, "x": 64})
    other = scene.copy(deep=True)
    other["reflectance"] = scene.reflectance[::-1].assign_coords(time=scene.time)
    write_cube(other, work / "b.zarr", chunks={"time": 1, "band": 4, "y": 64, "x": 64})


def modify_store(name: str, change: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        change(work / name)

    return setup


def write_bad_value(value: float) -> Callable[[Path], None]:
    def change(store: Path) -> None:
        import zarr

        zarr.open_array(str(store / "reflectance"))[1, 2, 100, 120] = value

    return change


def cloud_everywhere(store: Path) -> None:
    import zarr

    zarr.open_array(str(store / "cloud_mask"))[:] = True


def nan_everywhere(store: Path) -> None:
    import zarr

    zarr.open_array(str(store / "reflectance"))[:] = np.nan


def scaled(factor: float) -> Callable[[Path], None]:
    def change(store: Path) -> None:
        import zarr

        array = zarr.open_array(str(store / "reflectance"))
        array[:] = array[:] * factor

    return change


def delete_chunk(variable: str) -> Callable[[Path], None]:
    def change(store: Path) -> None:
        sorted((store / variable / "c").rglob("*"))[-1].unlink()

    return change


def truncate_chunk(store: Path) -> None:
    chunk = sorted(p for p in (store / "reflectance" / "c").rglob("*") if p.is_file())[5]
    chunk.write_bytes(chunk.read_bytes()[:20])


def partial_output(work: Path, model: str | None = None, source: str = "a.zarr") -> None:
    """OUT holds an interrupted reconstruction (3 regions) of ``source``."""
    from cmsn_cube.inference import reconstruct, write_reconstruction
    from cmsn_cube.store import open_cube

    result = reconstruct(open_cube(work / source), model=model, tile=64, overlap=8, chunk=128)
    write_reconstruction(result, work / "out.zarr", max_regions=3, progress=False)


def reconstruction_is_right(work: Path) -> bool:
    """OUT opens, matches a reconstruction computed here in memory, and flags unobserved pixels as NaN."""
    import xarray as xr

    from cmsn_cube.inference import reconstruct
    from cmsn_cube.store import open_cube, open_reconstruction

    try:
        written = open_reconstruction(work / "out.zarr").load()
    except Exception:
        return False
    expected = reconstruct(open_cube(work / "a.zarr"), tile=64, overlap=8, chunk=128).compute()
    try:
        xr.testing.assert_allclose(written.reconstructed, expected.reconstructed, rtol=0, atol=1e-6)
    except AssertionError:
        return False
    return bool((written.filled.values == expected.filled.values).all())


def listening_socket() -> tuple[socket.socket, str]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server, f"tcp://127.0.0.1:{server.getsockname()[1]}"


def cases(work: Path, silent_port: str) -> list[Case]:
    out = str(work / "out.zarr")
    a, b = str(work / "a.zarr"), str(work / "b.zarr")
    tiny = str(work / "tiny.pt")
    truncated = str(work / "truncated.pt")
    reconstruct = ["reconstruct", a, out, *FAST]
    listed = [
        Case("reconstruct, the right way", reconstruct, succeed=reconstruction_is_right),
        Case("reconstruct into its own input", ["reconstruct", a, a, *FAST]),
        Case("reconstruct into its input, --overwrite", ["reconstruct", a, a, "--overwrite", *FAST]),
        Case("reconstruct into its input, trailing /", ["reconstruct", a, a + "/", "--overwrite", *FAST]),
        Case("reconstruct into its input, file://", ["reconstruct", a, "file://" + a, "--overwrite", *FAST]),
        Case("reconstruct onto another cube", ["reconstruct", a, b, *FAST]),
        Case(
            "reconstruct onto a folder of files, --overwrite",
            ["reconstruct", a, str(work / "notes"), "--overwrite", *FAST],
            setup=lambda w: (w / "notes").mkdir() or (w / "notes" / "keep.txt").write_text("mine"),
        ),
        Case("resume with another scene", ["reconstruct", b, out, *FAST], setup=partial_output),
        Case(
            "resume with another model",
            ["reconstruct", a, out, "--model", tiny, *FAST],
            setup=partial_output,
        ),
        Case(
            "resume with another tiling",
            ["reconstruct", a, out, "--tile", "96", "--overlap", "8", "--chunk", "128", "--workers", "1"],
            setup=partial_output,
        ),  # fmt: skip
        Case("resume the same run", reconstruct, setup=partial_output, succeed=reconstruction_is_right),
        Case("all-cloud scene", reconstruct, setup=modify_store("a.zarr", cloud_everywhere)),
        Case("all-NaN scene", reconstruct, setup=modify_store("a.zarr", nan_everywhere)),
        Case("digital numbers in the store", reconstruct, setup=modify_store("a.zarr", scaled(10000))),
        Case("one +inf pixel in the store", reconstruct, setup=modify_store("a.zarr", write_bad_value(np.inf))),
        Case("one -inf pixel in the store", reconstruct, setup=modify_store("a.zarr", write_bad_value(-np.inf))),
        Case("reflectance of 3 in the store", reconstruct, setup=modify_store("a.zarr", write_bad_value(3.0))),
        Case("deleted reflectance chunk", reconstruct, setup=modify_store("a.zarr", delete_chunk("reflectance"))),
        Case("deleted cloud-mask chunk", reconstruct, setup=modify_store("a.zarr", delete_chunk("cloud_mask"))),
        Case("truncated reflectance chunk", reconstruct, setup=modify_store("a.zarr", truncate_chunk)),
        Case("info of a store missing a chunk", ["info", a], setup=modify_store("a.zarr", delete_chunk("qa_pixel"))),
        Case("missing input store", ["reconstruct", str(work / "none.zarr"), out, *FAST]),
        Case("missing --model file", [*reconstruct, "--model", str(work / "none.pt")]),
        Case("truncated --model file", [*reconstruct, "--model", truncated]),
        Case("--device cuda without a GPU", [*reconstruct, "--device", "cuda"]),
        Case("--device nonsense", [*reconstruct, "--device", "abacus"]),
        Case("--batch-size -1", [*reconstruct, "--batch-size", "-1"]),
        Case("--batch-size 0", [*reconstruct, "--batch-size", "0"]),
        Case("--workers -1", ["reconstruct", a, out, "--workers", "-1"]),
        Case("--workers 0", ["reconstruct", a, out, "--workers", "0"]),
        Case("--tile 0", ["reconstruct", a, out, "--tile", "0"]),
        Case("--overlap -1", ["reconstruct", a, out, "--overlap", "-1"]),
        Case("--overlap of half a tile", ["reconstruct", a, out, "--overlap", "128"]),
        Case("--chunk smaller than a tile", ["reconstruct", a, out, "--chunk", "100"]),
        Case("--scheduler with nothing listening", [*reconstruct, "--scheduler", "tcp://127.0.0.1:9"]),
        Case("--scheduler at a non-Dask port", [*reconstruct, "--scheduler", silent_port]),
        Case("--scheduler malformed", [*reconstruct, "--scheduler", "nonsense::x"]),
        Case("synth to s3:// without s3fs", ["synth", "s3://bucket/x.zarr"]),
        Case("reconstruct from s3:// without s3fs", ["reconstruct", "s3://bucket/a.zarr", out, *FAST]),
        Case("synth over an existing store", ["synth", a]),
        Case("synth --height -5", ["synth", str(work / "s.zarr"), "--height", "-5"]),
        Case("synth --dates 1", ["synth", str(work / "s.zarr"), "--dates", "1"]),
        Case("info of a reconstruction", ["info", out], setup=lambda w: _reconstructed(w), succeed=lambda w: True),
        Case("info of an interrupted reconstruction", ["info", out], setup=partial_output),
        Case("evaluate an unknown method", ["evaluate", a, "--methods", "magic"]),
        Case("evaluate a missing store", ["evaluate", str(work / "none.zarr")]),
        Case("train --steps 0", ["train", a, "--out", str(work / "run"), "--steps", "0"]),
        Case("train --lr -1", ["train", a, "--out", str(work / "run"), "--lr", "-1"]),
        Case("train --batch-size 0", ["train", a, "--out", str(work / "run"), "--batch-size", "0"]),
        Case("train --val-fraction 1", ["train", a, "--out", str(work / "run"), "--val-fraction", "1"]),
        Case("fit --time-budget 0", ["fit", a, "--time-budget", "0"]),
        Case("fit --steps -3", ["fit", a, "--steps", "-3"]),
        Case("fit a missing store", ["fit", str(work / "none.zarr")]),
        Case("pull without a region", ["pull"]),
        Case("pull --bbox malformed", ["pull", "--bbox", "1,2,3", "--start", "2020-01-01", "--end", "2020-02-01"]),
    ]
    return listed


def _reconstructed(work: Path) -> None:
    from cmsn_cube.inference import reconstruct, write_reconstruction
    from cmsn_cube.store import open_cube

    write_reconstruction(
        reconstruct(open_cube(work / "a.zarr"), tile=64, overlap=8, chunk=128), work / "out.zarr", progress=False
    )


def run_case(case: Case, root: Path, timeout: float, silent_port: str) -> tuple[str, str]:
    work = root / "case"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(root / "base", work, symlinks=True)
    # the case list refers to paths under ``work``: rebuild it there
    case = next(c for c in cases(work, silent_port) if c.name == case.name)
    case.setup(work)
    before = stores(work)
    env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""), **case.env}
    started = time.monotonic()
    try:
        run = subprocess.run(CLI + case.args, capture_output=True, text=True, timeout=timeout, env=env, cwd=work)
    except subprocess.TimeoutExpired:
        return "hang", f"still running after {timeout:g} s"
    elapsed = time.monotonic() - started
    after = stores(work)
    lost = [name for name, value in before.items() if after.get(name) != value and name != "out.zarr"]
    if case.setup is partial_output and "out.zarr" in before and run.returncode != 0:
        lost += ["out.zarr"] if after.get("out.zarr") != before["out.zarr"] else []
    errors = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    errors = [line for line in errors if "%|" not in line]  # progress bars
    detail = (errors[-1] if errors else (run.stdout.strip().splitlines() or [""])[-1])[:150]
    if lost:
        return "data-loss", f"{lost} changed; {detail}"
    if run.returncode < 0:
        return "crash", f"signal {-run.returncode}"
    if case.succeed is not None:
        if run.returncode == 0 and case.succeed(work):
            return "clear", f"done right in {elapsed:.1f} s"
        return ("silent-wrong" if run.returncode == 0 else "ugly"), detail
    if run.returncode == 0:
        return "silent-wrong", f"exit 0: {detail}"
    if len(errors) == 1 and errors[0].startswith("error: "):
        return "clear", f"{elapsed:.1f} s: {detail}"
    return "ugly", f"{len(errors)} lines: {detail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmsn-fault-matrix"))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this text")
    args = parser.parse_args()
    import torch
    from tqdm import tqdm

    from cmsn_cube.model import CMSN, save_checkpoint

    shutil.rmtree(args.workdir, ignore_errors=True)
    base = args.workdir / "base"
    base.mkdir(parents=True)
    base_stores(base)
    torch.manual_seed(1)
    tiny = save_checkpoint(base / "tiny.pt", CMSN(width=8, depth=1, fusion_depth=1, skip_width=4))
    (base / "truncated.pt").write_bytes(tiny.read_bytes()[:500])
    server, silent_port = listening_socket()
    selected = [c for c in cases(base, silent_port) if args.only is None or args.only in c.name]
    outcomes: list[tuple[str, str, str]] = []
    with server:
        for case in tqdm(selected, desc="fault cases", unit="case"):
            outcome, detail = run_case(case, args.workdir, args.timeout, silent_port)
            outcomes.append((case.name, outcome, detail))
    width = max(len(name) for name, _, _ in outcomes)
    for name, outcome, detail in outcomes:
        print(f"{name:<{width}}  {outcome:<12}  {detail}")
    counts = Counter(outcome for _, outcome, _ in outcomes)
    kinds = ("clear", "ugly", "silent-wrong", "hang", "crash", "data-loss")
    print(f"{len(outcomes)} cases: " + ", ".join(f"{counts.get(kind, 0)} {kind}" for kind in kinds))
    (args.workdir / "matrix.json").write_text(json.dumps(outcomes, indent=1))


if __name__ == "__main__":
    main()
