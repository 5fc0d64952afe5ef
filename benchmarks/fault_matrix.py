"""The fault matrix: bad inputs and faults against the command line and the Python API, each outcome classified.

Every case runs ``cmsn-cube`` (or, for a Python-API case, ``python -c`` code through one wrapper that prints a
:class:`~cmsn_cube.exceptions.CMSNCubeError` as ``error: ClassName: message`` and exits 1) in a fresh process
(timeout: a hang, the process group killed) on small stores in a scratch folder, then checks what a user would
check: the exit code, whether stderr is one ``error:`` line, whether every store that existed before and every file
a case protects (a user's checkpoint, an earlier run, a report) is intact (else: data loss), and, for runs that
exit 0, whether the result is right (else: silent wrong). Outcomes:

- ``clear``: refused with a one-line ``error: …`` and nothing lost (or done right, for a case that must succeed);
- ``ugly``: refused safely but with a traceback, several lines, or a raw library exception (the command line's
  catch-all line ``error: SomeError: … (CMSN_CUBE_DEBUG=1 shows the traceback)``, which names no cause or file);
- ``silent-wrong``: exit 0 with a wrong or invented result;
- ``hang``: still running after the timeout;
- ``crash``: killed by a signal;
- ``data-loss``: a store or protected file that existed before the command is gone or changed (the command's own
  target may change only when it exits 0; a refused command leaves it as it was).

Issue 31's cases are all here, the STAC one included: a local static catalog of synthetic COGs (written with
rioxarray and pystac in the case's folder) whose items declare ``raster:bands`` scale 1e-4, pulled with
``pull --stac catalog.json`` and compared pixel by pixel with DN x 1e-4. Two writers of one output are started
1 s apart by a ``runner``. Setups import only names the package had before issue 31, so the matrix also runs
against older code (``PYTHONPATH=<old checkout>``).

Usage: ``python benchmarks/fault_matrix.py [--workdir /tmp/faults] [--timeout 60] [--only TEXT]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLI = [sys.executable, "-m", "cmsn_cube.cli"]
FAST = ["--tile", "64", "--overlap", "8", "--chunk", "128", "--workers", "1"]
TINY_TRAIN = ["--width", "4", "--depth", "1", "--fusion-depth", "0", "--skip-width", "2", "--patch-size", "32",
              "--overlap", "8", "--batch-size", "2"]  # fmt: skip
#: Seconds between the starts of the two writers of one output.
RACE_DELAY_S = 1.0

#: Run as ``python -c``: ``CODE`` (prepended) in the case's folder; a package error is one ``error:`` line, exit 1;
#: warnings are one ``warning:`` line each (they are not errors).
PYTHON_WRAPPER = """
import sys
import warnings


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {category.__name__}: {' '.join(str(message).split())}", file=sys.stderr)


warnings.showwarning = _one_line_warning
from cmsn_cube.exceptions import CMSNCubeError

try:
    exec(compile(CODE, "<case>", "exec"), {"__name__": "__case__"})
except CMSNCubeError as error:
    print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(1)
"""

Runner = Callable[["Case", Path, float, dict[str, str]], tuple[str, str]]


@dataclass
class Case:
    name: str
    args: list[str] = field(default_factory=list)  # the command line (without ``cmsn-cube``)
    setup: Callable[[Path], None] = lambda work: None
    succeed: Callable[[Path], bool] | None = None  # None: the case must be refused
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None  # Python-API case: this code, run through PYTHON_WRAPPER, instead of ``args``
    protect: tuple[str, ...] = ()  # files or folders (relative to the case folder) that must stay as they are
    target: str = "out.zarr"  # what the command is asked to write: it may change when the command exits 0
    runner: Runner | None = None  # a special run (two processes...): returns (outcome, detail)


def python_argv(code: str) -> list[str]:
    return [sys.executable, "-c", f"CODE = {textwrap.dedent(code)!r}\n{PYTHON_WRAPPER}"]


def digest(path: Path) -> str:
    """A digest of a file, or of every file under a folder (names and bytes): any change changes it."""
    hasher = hashlib.sha256()
    if path.is_file():
        hasher.update(path.read_bytes())
        return hasher.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        hasher.update(str(file.relative_to(path)).encode())
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


def stores(work: Path, protect: Sequence[str] = ()) -> dict[str, str]:
    """Digests of every store in ``work`` and of the protected paths that exist."""
    found = {p.name: digest(p) for p in work.iterdir() if p.is_dir() and p.suffix == ".zarr"}
    found.update({name: digest(work / name) for name in protect if (work / name).exists()})
    return found


#: The end of the command line's catch-all line for an exception it did not expect (a raw library error).
RAW_ERROR = "(CMSN_CUBE_DEBUG=1 shows the traceback)"


def one_clear_line(errors: list[str]) -> bool:
    """Whether the error output is one ``error:`` line of the package's own (not the catch-all's raw exception)."""
    return len(errors) == 1 and errors[0].startswith("error: ") and not errors[0].rstrip().endswith(RAW_ERROR)


def error_lines(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    return [line for line in lines if "%|" not in line]  # progress bars


def execute(
    argv: list[str], work: Path, timeout: float, env: dict[str, str]
) -> subprocess.CompletedProcess[str] | None:
    """Run ``argv`` in ``work``; None after ``timeout`` s (its whole process group killed)."""
    process = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        return None
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def _kill(process: subprocess.Popen[str]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()


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
        array[:] = np.asarray(array[:]) * factor

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


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        for one in setups:
            one(work)

    return setup


def _reconstructed(work: Path, name: str = "out.zarr") -> None:
    from cmsn_cube.inference import reconstruct, write_reconstruction
    from cmsn_cube.store import open_cube

    write_reconstruction(
        reconstruct(open_cube(work / "a.zarr"), tile=64, overlap=8, chunk=128), work / name, progress=False
    )


def reconstructed_at(name: str) -> Callable[[Path], None]:
    return lambda work: _reconstructed(work, name)


def delete_output_chunk(work: Path) -> None:
    """A finished reconstruction loses one chunk file of ``reconstructed``."""
    sorted(p for p in (work / "out.zarr" / "reconstructed").rglob("*") if p.is_file() and p.name != "zarr.json")[
        0
    ].unlink()


# ------------------------------------------------------------------------------------------ a user's files


def user_checkpoint(*names: str) -> Callable[[Path], None]:
    """The user's own checkpoints (a copy of tiny.pt and its card) at ``names``."""

    def setup(work: Path) -> None:
        for name in names:
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "tiny.pt", target)
            if (work / "tiny.json").exists():
                shutil.copyfile(work / "tiny.json", target.with_suffix(".json"))

    return setup


def user_synth_store(name: str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        from cmsn_cube.sources.synthetic import synthetic_scene
        from cmsn_cube.store import write_cube

        write_cube(synthetic_scene(height=64, width=64, seed=7), work / name)

    return setup


def user_demo_folder(work: Path) -> None:
    """A folder ``d`` holding a reconstruction and a report of the user's, under the demo's names."""
    (work / "d").mkdir()
    _reconstructed(work, "d/reconstruction.zarr")
    (work / "d" / "report.md").write_text("# My report\n\nWeeks of notes.\n")


def user_notes(work: Path) -> None:
    (work / "notes").mkdir()
    (work / "notes" / "keep.txt").write_text("mine")


def model_folder(work: Path) -> None:
    (work / "models").mkdir()
    shutil.copyfile(work / "tiny.pt", work / "models" / "best.pt")


def nan_checkpoint(work: Path) -> None:
    import torch

    from cmsn_cube.model import CMSN, save_checkpoint

    model = CMSN(width=8, depth=1, fusion_depth=1, skip_width=4).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    save_checkpoint(work / "nan.pt", model)


def earlier_training_run(work: Path) -> None:
    """A real (tiny) training run in ``run`` on a.zarr, as a later ``--resume`` finds it."""
    argv = [*CLI, "train", "a.zarr", "--out", "run", "--steps", "2", *TINY_TRAIN]
    done = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the earlier training run failed: {done.stderr[-500:]}")


# ------------------------------------------------------------------------------------------ inputs edited in place


def halve_reflectance(work: Path) -> None:
    import zarr

    reflectance = zarr.open_array(str(work / "a.zarr" / "reflectance"), mode="r+")
    reflectance[1] = np.asarray(reflectance[1]) / 2


def flip_cloud_rows(work: Path) -> None:
    from cmsn_cube.store import open_cube

    store = str(work / "a.zarr")
    rows = open_cube(store)[["cloud_mask"]].isel(time=[1], y=slice(0, 64)).load()
    rows["cloud_mask"][:] = ~rows["cloud_mask"]
    rows = rows.drop_vars([name for name in rows.coords if name not in ("time", "y", "x")])
    rows.drop_indexes(["time", "y", "x"]).to_zarr(
        store, region={"time": slice(1, 2), "y": slice(0, 64), "x": slice(None)}
    )


# ------------------------------------------------------------------------------------------ open_stack files

STACK_BANDS = {"blue": 1, "green": 2, "red": 3, "nir": 4}
STACK_DATES = ["2020-01-05", "2020-01-21"]
STACK_LEFT, STACK_TOP = 5e5, 3.4e6


def stack_dn(date: int) -> np.ndarray:
    """Four bands of a synthetic date as int16 reflectance x 10^4, nodata -9999: ``(4, 64, 64)``."""
    from cmsn_cube.sources.synthetic import synthetic_scene

    reflectance = synthetic_scene(height=64, width=64, seed=3).reflectance.values[date]
    return np.where(np.isfinite(reflectance), np.round(reflectance * 1e4), -9999).astype("int16")


def write_tif(path: Path, values: np.ndarray, *, left: float = STACK_LEFT, top: float = STACK_TOP,
              nodata: float | None = -9999) -> Path:  # fmt: skip
    import rasterio
    from rasterio.transform import from_origin

    count, height, width = values.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": values.dtype.name}
    with rasterio.open(path, "w", **profile, crs="EPSG:32650", transform=from_origin(left, top, 30, 30),
                       nodata=nodata) as dst:  # fmt: skip
        dst.write(values)
    return path


def shifted_dates(work: Path) -> None:
    write_tif(work / "t1.tif", stack_dn(0))
    write_tif(work / "north.tif", stack_dn(1), top=STACK_TOP + 30)


def bare_netcdf(work: Path) -> None:
    """One date as NetCDF variable ``dn`` (band, y, x) whose x/y have no CF attributes and whose grid mapping has
    no GeoTransform: GDAL finds no grid in it, the file's own x/y hold it."""
    import rioxarray
    import xarray as xr

    np.save(work / "dn.npy", stack_dn(0))
    tif = write_tif(work / "bare.tif", stack_dn(0))
    raster = rioxarray.open_rasterio(tif)
    assert isinstance(raster, xr.DataArray)
    dataset = raster.rename("dn").to_dataset()
    for axis in ("x", "y"):
        dataset[axis].attrs = {}
    dataset["spatial_ref"].attrs.pop("GeoTransform", None)
    dataset.to_netcdf(work / "bare.nc")
    tif.unlink()


def netcdf_read_right(work: Path) -> bool:
    result = np.load(work / "result.npz")
    dn = np.load(work / "dn.npy")
    expected = np.where(dn == -9999, np.nan, dn * 1e-4).astype("float32")
    return (
        np.array_equal(result["x"], STACK_LEFT + 15 + 30 * np.arange(64))
        and np.array_equal(result["y"], STACK_TOP - 15 - 30 * np.arange(64))
        and np.allclose(result["reflectance"][0], expected, rtol=0, atol=1e-7, equal_nan=True)
    )


def float_tif(work: Path) -> None:
    dn = stack_dn(0)
    write_tif(work / "float.tif", np.where(dn == -9999, np.nan, dn * 1e-4).astype("float32"), nodata=None)


def truncated_tif(work: Path) -> None:
    data = write_tif(work / "whole.tif", stack_dn(0)).read_bytes()
    (work / "cut.tif").write_bytes(data[: len(data) // 2])


def stack_code(call: str) -> str:
    return f"import numpy as np\nfrom cmsn_cube.sources.stack import open_stack\n{call}\n"


# ------------------------------------------------------------------------------------------ a local STAC catalog

STAC_CRS = "EPSG:32619"
STAC_LEFT, STAC_TOP, STAC_SIZE = 600_000.0, 1_200_000.0, 64
STAC_DAYS = ["2020-01-10", "2020-01-26", "2020-02-11"]
STAC_SCALE = 1e-4


def stac_bbox() -> str:
    """W,S,E,N in degrees of the footprint's inner part (8 pixels in from every edge)."""
    from pyproj import Transformer

    inset = 30 * 8
    left, right = STAC_LEFT + inset, STAC_LEFT + 30 * STAC_SIZE - inset
    top, bottom = STAC_TOP - inset, STAC_TOP - 30 * STAC_SIZE + inset
    lons, lats = Transformer.from_crs(STAC_CRS, "EPSG:4326", always_xy=True).transform(
        [left, right, right, left], [top, top, bottom, bottom]
    )
    return f"{max(lons[0], lons[3]):.5f},{max(lats[2], lats[3]):.5f},{min(lons[1], lons[2]):.5f},{min(lats[0], lats[1]):.5f}"


def stac_catalog(work: Path) -> None:
    """stac/catalog.json -> collection landsat-c2-l2 -> 3 items of synthetic uint16 COGs (blue, green, red, nir08,
    qa_pixel) whose raster:bands declare reflectance = DN x 1e-4 (not Collection 2's x 2.75e-5 - 0.2)."""
    import datetime as dt

    import pystac
    import rioxarray  # noqa: F401
    import xarray as xr
    from pyproj import Transformer
    from pystac.extensions.eo import EOExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension

    from cmsn_cube.sources.synthetic import synthetic_scene

    scene = synthetic_scene(height=STAC_SIZE, width=STAC_SIZE, n_dates=len(STAC_DAYS), seed=11)
    reflectance = scene.reflectance.values
    dn = np.where(np.isfinite(reflectance), np.clip(np.round(reflectance / STAC_SCALE), 1, 60000), 0).astype("uint16")
    np.save(work / "stac_dn.npy", dn)
    x = STAC_LEFT + 15 + 30 * np.arange(STAC_SIZE)
    y = STAC_TOP - 15 - 30 * np.arange(STAC_SIZE)
    right, bottom = STAC_LEFT + 30 * STAC_SIZE, STAC_TOP - 30 * STAC_SIZE
    lons, lats = Transformer.from_crs(STAC_CRS, "EPSG:4326", always_xy=True).transform(
        [STAC_LEFT, right, right, STAC_LEFT], [STAC_TOP, STAC_TOP, bottom, bottom]
    )
    ring = [[float(lon), float(lat)] for lon, lat in zip(lons, lats, strict=True)]
    root = work / "stac"
    collection = pystac.Collection(
        id="landsat-c2-l2",
        description="synthetic Landsat-like COGs",
        extent=pystac.Extent(
            pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
            pystac.TemporalExtent([[dt.datetime(2020, 1, 1, tzinfo=dt.UTC), None]]),
        ),
    )
    qa = np.full((STAC_SIZE, STAC_SIZE), 21824, dtype="uint16")  # clear, low confidences (Collection 2)
    for t, day in enumerate(STAC_DAYS):
        item_id = f"LC08_SYNTH_{day.replace('-', '')}"
        folder = root / "data" / item_id
        folder.mkdir(parents=True)
        item = pystac.Item(
            id=item_id,
            geometry={"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
            bbox=[float(min(lons)), float(min(lats)), float(max(lons)), float(max(lats))],
            datetime=dt.datetime.fromisoformat(f"{day}T14:30:00+00:00"),
            properties={"platform": "landsat-8", "instruments": ["oli", "tirs"]},
        )
        layers = {"blue": dn[t, 0], "green": dn[t, 1], "red": dn[t, 2], "nir08": dn[t, 3], "qa_pixel": qa}
        for key, layer in layers.items():
            path = folder / f"{key}.tif"
            nodata = 1 if key == "qa_pixel" else 0
            array = xr.DataArray(layer, dims=("y", "x"), coords={"y": y, "x": x})
            array.rio.write_crs(STAC_CRS).rio.write_nodata(nodata).rio.to_raster(path, driver="COG")
            asset = pystac.Asset(href=str(path), media_type=pystac.MediaType.COG, roles=["data"])
            item.add_asset(key, asset)
            scaling = (None, None) if key == "qa_pixel" else (STAC_SCALE, 0.0)
            RasterExtension.ext(asset, add_if_missing=True).bands = [
                RasterBand.create(nodata=nodata, data_type=DataType.UINT16, scale=scaling[0], offset=scaling[1])
            ]
        EOExtension.ext(item, add_if_missing=True).cloud_cover = float(5 * t)
        proj = ProjectionExtension.ext(item, add_if_missing=True)
        proj.epsg = int(STAC_CRS.split(":")[1])
        proj.shape, proj.transform = [STAC_SIZE, STAC_SIZE], [30.0, 0.0, STAC_LEFT, 0.0, -30.0, STAC_TOP]
        collection.add_item(item)
    top = pystac.Catalog(id="synthetic", description="a local STAC catalog of synthetic COGs")
    top.add_child(collection)
    top.normalize_hrefs(str(root))
    top.make_all_asset_hrefs_relative()
    top.save(pystac.CatalogType.SELF_CONTAINED)


def stac_values_right(work: Path) -> bool:
    """Every pixel of the pulled cube is its COG's DN x 1e-4 (read on the COG's own pixel)."""
    import xarray as xr

    try:
        cube = xr.open_zarr(work / "stac.zarr", consolidated=None)
    except Exception:
        return False
    dn = np.load(work / "stac_dn.npy")
    cols = (cube.x.values - STAC_LEFT - 15) / 30
    rows = (STAC_TOP - 15 - cube.y.values) / 30
    if cube.sizes.get("time") != len(STAC_DAYS) or not (
        np.allclose(cols, np.round(cols)) and np.allclose(rows, np.round(rows))
    ):
        return False
    cols, rows = np.round(cols).astype(int), np.round(rows).astype(int)
    if cols.min() < 0 or rows.min() < 0 or cols.max() >= STAC_SIZE or rows.max() >= STAC_SIZE:
        return False
    expected = (dn[:, :, rows][:, :, :, cols] * STAC_SCALE).astype("float32")
    got = cube.reflectance.transpose("time", "band", "y", "x").values
    return bool(np.allclose(got, expected, rtol=0, atol=1e-6))


# ------------------------------------------------------------------------------------------ two writers


def race(case: Case, work: Path, timeout: float, env: dict[str, str]) -> tuple[str, str]:
    """Start ``case.args`` twice, RACE_DELAY_S apart, into one output: one must write it whole, the other refuse
    (naming the writer) or find it complete."""
    argv = CLI + case.args
    processes = []
    for index in range(2):
        if index:
            time.sleep(RACE_DELAY_S)
        processes.append(subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))  # fmt: skip
    deadline = time.monotonic() + timeout
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            for other in processes:
                _kill(other)
            return "hang", f"still running after {timeout:g} s"
        results.append((process.returncode, out, err))
    if any(code < 0 for code, _, _ in results):
        return "crash", f"signal {-min(code for code, _, _ in results)}"
    wrote = [r for r in results if r[0] == 0 and "already complete" not in r[1] + r[2]]
    found_complete = [r for r in results if r[0] == 0 and "already complete" in r[1] + r[2]]
    refused = [r for r in results if r[0] != 0]
    lines = [error_lines(err) for code, _, err in refused]
    one_line = all(one_clear_line(e) for e in lines)
    detail = " | ".join(e[-1][:90] if e else "(no stderr)" for e in lines) or "no process refused"
    right = case.succeed is not None and case.succeed(work)
    if not right:
        return ("silent-wrong" if wrote or found_complete else "ugly"), f"OUT not the reconstruction; {detail}"
    if len(wrote) == 2:
        return "silent-wrong", "both processes wrote OUT at once, neither was refused"
    if len(wrote) == 1 and (found_complete or (one_line and "is being written by process" in detail)):
        return "clear", f"one wrote OUT, the other: {detail if refused else 'already complete'}"
    return "ugly", f"{len(wrote)} wrote; {detail}"


def cases(work: Path, silent_port: str) -> list[Case]:
    out = str(work / "out.zarr")
    a, b = str(work / "a.zarr"), str(work / "b.zarr")
    tiny = str(work / "tiny.pt")
    truncated = str(work / "truncated.pt")
    reconstruct = ["reconstruct", a, out, *FAST]
    silent_http = silent_port.replace("tcp://", "http://") + "/"
    far_bbox = "--bbox=-68.08,10.825,-68.055,10.85"
    scene = "from cmsn_cube.sources.synthetic import synthetic_scene\nscene = synthetic_scene(height=64, width=64, seed=3)\n"
    later = (
        "import numpy as np\nfrom cmsn_cube.sources.synthetic import synthetic_scene\nfrom cmsn_cube.store import append_cube\n"
        "scene = synthetic_scene(height=150, width=140, seed=5)\n"
        "later = scene.assign_coords(time=scene['time'] + np.timedelta64(100, 'D'))\n"
    )
    paris = (
        "import pandas as pd\n"
        "paris = pd.DatetimeIndex(['2020-01-01 00:30', '2020-07-01 00:30', '2020-07-17 00:30']).tz_localize('Europe/Paris')\n"
    )
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
            setup=user_notes,
            protect=("notes",),
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
        Case("resume after reflectance halved in place", reconstruct, setup=both(partial_output, halve_reflectance)),
        Case("resume after cloud_mask rewritten in place", reconstruct, setup=both(partial_output, flip_cloud_rows)),
        Case("two reconstructs into one OUT, 1 s apart", reconstruct, runner=race, succeed=reconstruction_is_right),
        Case(
            "complete OUT missing a chunk, --overwrite",
            [*reconstruct, "--overwrite"],
            setup=both(_reconstructed, delete_output_chunk),
            succeed=reconstruction_is_right,
        ),
        Case("complete OUT missing a chunk", reconstruct, setup=both(_reconstructed, delete_output_chunk)),
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
        Case("info of a truncated chunk", ["info", a], setup=modify_store("a.zarr", truncate_chunk)),
        Case("missing input store", ["reconstruct", str(work / "none.zarr"), out, *FAST]),
        Case("missing --model file", [*reconstruct, "--model", str(work / "none.pt")]),
        Case("truncated --model file", [*reconstruct, "--model", truncated]),
        Case("--model cut in its middle", [*reconstruct, "--model", str(work / "half.pt")]),
        Case("--model a folder", [*reconstruct, "--model", str(work / "models")], setup=model_folder),
        Case(
            "--model with all-NaN weights, --method cmsn",
            [*reconstruct, "--model", str(work / "nan.pt"), "--method", "cmsn"],
            setup=nan_checkpoint,
        ),
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
        Case("synth --cloud abc", ["synth", str(work / "s.zarr"), "--cloud", "abc"]),
        Case("synth --seed -1", ["synth", str(work / "s.zarr"), "--seed", "-1", "--height", "32", "--width", "32"]),
        Case("info of a reconstruction", ["info", out], setup=_reconstructed, succeed=lambda w: True),
        Case("info of an interrupted reconstruction", ["info", out], setup=partial_output),
        Case("evaluate an unknown method", ["evaluate", a, "--methods", "magic"]),
        Case("evaluate --methods ''", ["evaluate", a, "--methods", ""]),
        Case("evaluate a missing store", ["evaluate", str(work / "none.zarr")]),
        Case(
            "export a reconstruction into itself",
            ["export", "ref.zarr", "ref.zarr"],
            setup=reconstructed_at("ref.zarr"),
        ),
        Case("export into a cube store", ["export", "ref.zarr", a], setup=reconstructed_at("ref.zarr")),
        Case("train --steps 0", ["train", a, "--out", str(work / "run"), "--steps", "0"]),
        Case("train --lr -1", ["train", a, "--out", str(work / "run"), "--lr", "-1"]),
        Case("train --batch-size 0", ["train", a, "--out", str(work / "run"), "--batch-size", "0"]),
        Case("train --val-fraction 1", ["train", a, "--out", str(work / "run"), "--val-fraction", "1"]),
        Case(
            "train into an earlier run, no --resume",
            ["train", a, "--out", "runs/prev", "--steps", "1", *TINY_TRAIN],
            setup=user_checkpoint("runs/prev/best.pt", "runs/prev/last.pt"),
            protect=("runs/prev/best.pt", "runs/prev/last.pt"),
        ),
        Case(
            "train --resume on another store",
            ["train", b, "--out", "run", "--steps", "4", *TINY_TRAIN, "--resume"],
            setup=earlier_training_run,
            protect=("run/best.pt", "run/last.pt"),
            target="run",
        ),
        Case("fit --time-budget 0", ["fit", a, "--time-budget", "0"]),
        Case("fit --steps -3", ["fit", a, "--steps", "-3"]),
        Case("fit a missing store", ["fit", str(work / "none.zarr")]),
        Case(
            "fit --out onto the user's checkpoint",
            ["fit", a, "--steps", "3", "--model", tiny, "--out", "mine.pt"],
            setup=user_checkpoint("mine.pt"),
            protect=("mine.pt", "mine.json"),
        ),
        Case(
            "fit twice to the default --out",
            ["fit", a, "--steps", "2", "--model", tiny],
            setup=user_checkpoint("a-fitted.pt"),
            protect=("a-fitted.pt", "a-fitted.json"),
        ),
        Case("fit --out a store", ["fit", a, "--steps", "2", "--model", tiny, "--out", b]),
        Case(
            "demo --store onto the user's store",
            ["demo", "--store", "mine.zarr", "--size", "64", "--workers", "1"],
            setup=user_synth_store("mine.zarr"),
        ),
        Case(
            "demo --out onto the user's report",
            ["demo", "--out", "d", "--size", "64", "--workers", "1"],
            setup=user_demo_folder,
            protect=("d/reconstruction.zarr", "d/report.md"),
        ),
        Case("pull without a region", ["pull"]),
        Case("pull --bbox malformed", ["pull", "--bbox", "1,2,3", "--start", "2020-01-01", "--end", "2020-02-01"]),
        Case(
            "pull --stac at a server that never answers",
            ["pull", "--stac", silent_http, far_bbox, "--start", "2019-01-01", "--end", "2019-03-01", "--dry-run"],
        ),
        Case(
            "pull --stac items declaring scale 1e-4",
            [
                "pull",
                "--stac",
                "stac/catalog.json",
                f"--bbox={stac_bbox()}",
                "--start",
                STAC_DAYS[0],
                "--end",
                STAC_DAYS[-1],
                "--n-dates",
                str(len(STAC_DAYS)),
                "--out",
                "stac.zarr",
            ],
            setup=stac_catalog,
            succeed=stac_values_right,
            target="stac.zarr",
        ),  # fmt: skip
        # ---------------------------------------------------------------- the Python API
        Case("append_cube to a missing store", python=later + "append_cube(later, 'missing.zarr')\n"),
        Case(
            "append_cube of a lazy date x 10,000",
            python=later
            + "append_cube(later.assign(reflectance=later['reflectance'] * 10_000).chunk({'time': 1}), 'a.zarr')\n",
            target="a.zarr",
        ),
        Case(
            "make_cube of 5 bands",
            python=scene + "import numpy as np\nfrom cmsn_cube.cube import make_cube\nr = scene['reflectance'].values\n"
            "make_cube(np.concatenate([r, r[:, :1]], axis=1), time=scene['time'].values, y=scene['y'].values,\n"
            "          x=scene['x'].values, crs='EPSG:32650', sensor='LANDSAT_8')\n",
        ),
        Case(
            "make_cube of tz-aware times",
            python=scene + paris + "import numpy as np\nfrom cmsn_cube.cube import make_cube\n"
            "cube = make_cube(scene['reflectance'].values, time=paris, y=scene['y'].values, x=scene['x'].values,\n"
            "                 crs='EPSG:32650', sensor='LANDSAT_8')\n"
            "np.save('times.npy', cube['time'].values)\n",
            succeed=lambda w: np.array_equal(
                np.load(w / "times.npy"),
                np.array(["2019-12-31T23:30", "2020-06-30T22:30", "2020-07-16T22:30"], dtype="datetime64[ns]"),
            ),
        ),
        Case(
            "validate_cube of tz-aware times",
            python=scene
            + paris
            + "from cmsn_cube.cube import validate_cube\nvalidate_cube(scene.assign_coords(time=paris))\n",
        ),
        Case(
            "open_stack, a date shifted 30 m north",
            python=stack_code(
                f"open_stack(['t1.tif', 'north.tif'], dates={STACK_DATES!r}, bands={STACK_BANDS!r}, scale=1e-4)"
            ),
            setup=shifted_dates,
        ),
        Case(
            "open_stack, NetCDF x/y without CF attributes",
            python=stack_code(
                f"cube = open_stack('bare.nc', variable='dn', dates={STACK_DATES[:1]!r}, bands={STACK_BANDS!r}, "
                "bands_per_date=4, scale=1e-4)\n"
                "np.savez('result.npz', x=cube.x.values, y=cube.y.values, reflectance=cube.reflectance.values)"
            ),
            setup=bare_netcdf,
            succeed=netcdf_read_right,
        ),
        Case(
            "open_stack, scale=1e-4 on float reflectance",
            python=stack_code(
                f"open_stack('float.tif', dates={STACK_DATES[:1]!r}, bands={STACK_BANDS!r}, bands_per_date=4, scale=1e-4)"
            ),
            setup=float_tif,
        ),
        Case(
            "open_stack, a truncated GeoTIFF",
            python=stack_code(
                f"open_stack('cut.tif', dates={STACK_DATES[:1]!r}, bands={STACK_BANDS!r}, bands_per_date=4, scale=1e-4)"
            ),
            setup=truncated_tif,
        ),
    ]
    return listed


def run_case(case: Case, root: Path, timeout: float, silent_port: str) -> tuple[str, str]:
    work = root / "case"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(root / "base", work, symlinks=True)
    # the case list refers to paths under ``work``: rebuild it there
    case = next(c for c in cases(work, silent_port) if c.name == case.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the setup's own writes warn about is no outcome
        case.setup(work)
    before = stores(work, case.protect)
    env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""), **case.env}
    started = time.monotonic()
    if case.runner is not None:
        outcome = case.runner(case, work, timeout, env)
        run, exited_0 = None, outcome[0] in ("clear", "silent-wrong")
    else:
        run = execute(python_argv(case.python) if case.python is not None else CLI + case.args, work, timeout, env)
        exited_0 = run is not None and run.returncode == 0
    elapsed = time.monotonic() - started
    after = stores(work, case.protect)

    def asked_for(name: str) -> bool:  # the command's own target may change, when it succeeded
        return exited_0 and (name == case.target or name.startswith(case.target.rstrip("/") + "/"))

    lost = [name for name, value in before.items() if after.get(name) != value and not asked_for(name)]
    if case.runner is not None:
        return ("data-loss", f"{lost} changed; {outcome[1]}") if lost else outcome
    if run is None:
        return (
            ("data-loss", f"{lost} changed; killed after {timeout:g} s")
            if lost
            else ("hang", f"still running after {timeout:g} s")
        )
    errors = error_lines(run.stderr)
    detail = (errors[-1] if errors else (run.stdout.strip().splitlines() or [""])[-1])[:150]
    if lost:
        return "data-loss", f"{lost} changed; {detail}"
    if run.returncode < 0:
        return "crash", f"signal {-run.returncode}"
    if case.succeed is not None:
        if run.returncode == 0 and case.succeed(work):
            return "clear", f"done right in {elapsed:.1f} s"
        if run.returncode == 0:
            return "silent-wrong", f"exit 0, wrong result: {detail}"
        return "ugly", f"{len(errors)} lines: {detail}"
    if run.returncode == 0:
        return "silent-wrong", f"exit 0: {detail}"
    if one_clear_line(errors):
        return "clear", f"{elapsed:.1f} s: {detail}"
    raw = len(errors) == 1 and errors[0].rstrip().endswith(RAW_ERROR)
    return "ugly", f"{'raw exception' if raw else f'{len(errors)} lines'}: {detail}"


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
    (base / "half.pt").write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])  # cut in the zip's data
    server, silent_port = listening_socket()
    selected = [c for c in cases(base, silent_port) if args.only is None or args.only in c.name]
    outcomes: list[tuple[str, str, str]] = []
    with server:
        for case in tqdm(selected, desc="fault cases", unit="case"):
            try:
                outcome, detail = run_case(case, args.workdir, args.timeout, silent_port)
            except Exception as error:  # a setup or check that fails is the matrix's fault: say so, go on
                outcome, detail = "not-run", f"{type(error).__name__}: {' '.join(str(error).split())[:140]}"
            outcomes.append((case.name, outcome, detail))
    width = max(len(name) for name, _, _ in outcomes)
    for name, outcome, detail in outcomes:
        print(f"{name:<{width}}  {outcome:<12}  {detail}")
    counts = Counter(outcome for _, outcome, _ in outcomes)
    kinds = ("clear", "ugly", "silent-wrong", "hang", "crash", "data-loss")
    extra = f", {counts['not-run']} not run (setup failed)" if counts.get("not-run") else ""
    print(f"{len(outcomes)} cases: " + ", ".join(f"{counts.get(kind, 0)} {kind}" for kind in kinds) + extra)
    (args.workdir / "matrix.json").write_text(json.dumps(outcomes, indent=1))


if __name__ == "__main__":
    main()
