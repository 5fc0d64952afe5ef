"""The end-to-end demo on the embedded scene: what a new user runs first (``cmsn-cube demo``).

synthetic scene -> Zarr store -> QA decoding -> three-date samples -> model (packaged, optionally adapted to
this scene) -> whole-scene reconstruction with Dask -> evaluation against the classical baselines -> figures
-> ``report.md``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from cmsn_cube.plot import plot_dates, plot_method_bars, plot_ndvi_maps, plot_ndvi_scatter, plot_panel
from cmsn_cube.qa import add_cloud_mask, cloud_fraction
from cmsn_cube.report import describe_cube
from cmsn_cube.selfcheck import format_quality, quality_table
from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import open_cube, open_store, write_cube

#: Scene seed of the demo: not one of the seeds the packaged checkpoint was trained on.
DEMO_SEED = 2026


@dataclass
class DemoResult:
    """Where the demo put things, and what it measured."""

    store: str
    reconstruction: str
    out_dir: str
    report: str = ""
    figures: list[str] = field(default_factory=list)
    cloud_percent: dict[str, float] = field(default_factory=dict)
    cloudy_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)  # output name -> sha256 (a store: its write id)


#: Attribute of the scene store the demo writes: the only store it replaces without ``overwrite``.
DEMO_STORE_ATTR = "cmsn_cube_demo_scene"

#: What the demo writes into its folder besides its figures (``*.png``).
DEMO_FILES = (
    "report.md", "demo.json", "evaluation.csv", "evaluation.json", "reconstruction.zarr", "adapted.pt", "adapted.json",
)  # fmt: skip


def _root_attrs_of(path: str | Path) -> dict[str, Any]:
    """Return the root attributes of the Zarr store at ``path`` ({} where it is none or unreadable)."""
    from cmsn_cube.store import root_attrs

    try:
        return root_attrs(path)
    except Exception:  # not a store, or a damaged one: it is not the demo's
        return {}


def _is_demo_scene(path: str) -> bool:
    """Whether ``path`` holds a scene an earlier demo wrote (what the demo may replace); False when it holds nothing."""
    from cmsn_cube.store import writable_kind

    return writable_kind(path) == "zarr" and _root_attrs_of(path).get(DEMO_STORE_ATTR) is True


def _demo_outputs(out: Path) -> list[Path]:
    """Return the demo's outputs that are in ``out`` now."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name in DEMO_FILES or p.suffix == ".png")


def _digest(path: Path) -> str:
    """Return a file's sha256, or a store's write id: what says it is still what the demo wrote."""
    import hashlib

    from cmsn_cube.store import WRITE_ID_ATTR

    if path.is_dir():
        return str(_root_attrs_of(path).get(WRITE_ID_ATTR, ""))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def claim_demo_folder(out: Path, *, store: str, overwrite: bool) -> None:
    """Check, before any work, that the demo replaces nothing of the user's in ``out`` and at ``store``.

    Outputs of an earlier demo that nobody changed since (recorded with their digests in ``demo.json``) are
    replaced; anything else of the demo's names (a user's ``report.md``, a PNG, another reconstruction) needs
    ``overwrite``. The scene store is replaced only when an earlier demo wrote it.

    Raises
    ------
    OutputExistsError
        Something would be replaced; the message names it.
    StoreError
        ``out`` or ``store`` is inside a Zarr store, or ``store`` is a folder that is not a store.
    """
    from cmsn_cube.exceptions import OutputExistsError
    from cmsn_cube.outputs import claim_folder
    from cmsn_cube.store import writable_kind

    claim_folder(out, (), overwrite=True, what="demo folder")
    if overwrite:
        writable_kind(store)
        return
    if writable_kind(store) == "zarr" and not _is_demo_scene(store):
        raise OutputExistsError(
            f"{store} holds a store the demo did not write; pass --overwrite to replace it, or another --store"
        )
    try:
        recorded = json.loads((out / "demo.json").read_text()).get("written", {})
    except (OSError, ValueError, AttributeError):
        recorded = {}
    foreign = [
        path.name
        for path in _demo_outputs(out)
        if not (path.name == "demo.json" and recorded) and recorded.get(path.name) != _digest(path)
    ]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise OutputExistsError(
            f"{out} holds {shown}, not written by an earlier demo or changed since; "
            "pass --overwrite to replace them, or another --out"
        )


def _cloudiest_window(mask: np.ndarray, size: int) -> tuple[slice, slice]:
    """Return the ``size`` window (on a coarse grid) where date 1 is cloudiest, for the panel figure."""
    height, width = mask.shape
    size_y, size_x = min(size, height), min(size, width)
    best, best_origin = -1.0, (0, 0)
    for y0 in range(0, height - size_y + 1, max(size_y // 4, 1)):
        for x0 in range(0, width - size_x + 1, max(size_x // 4, 1)):
            fraction = float(mask[y0 : y0 + size_y, x0 : x0 + size_x].mean())
            if fraction > best and fraction < 0.6:  # enough clear context left to judge the fill
                best, best_origin = fraction, (y0, x0)
    return slice(best_origin[0], best_origin[0] + size_y), slice(best_origin[1], best_origin[1] + size_x)


def run_demo(
    out_dir: str | os.PathLike[str] = "outputs/demo",
    *,
    store: str | os.PathLike[str] | None = None,
    size: int = 512,
    seed: int = DEMO_SEED,
    model: str | None = None,
    adapt_seconds: float = 0.0,
    workers: int = 2,
    overwrite: bool = False,
    echo: Callable[[str], object] = print,
) -> DemoResult:
    """Run the whole story on the embedded scene and write figures, tables and ``report.md`` to ``out_dir``.

    Parameters
    ----------
    out_dir : path-like
        Folder for figures, tables, the reconstruction store and the report.
    store : path-like, optional
        Zarr store of the scene; default ``stores/demo.zarr``.
    size : int
        Scene height and width in pixels (30 m).
    seed : int
        Scene seed.
    model : str, optional
        Checkpoint path or packaged name; default the packaged checkpoint.
    adapt_seconds : float
        When > 0, first fine-tune the model on this scene's own clear pixels for at most this many seconds
        (``ds.cmsn.fit``).
    workers : int
        Dask LocalCluster worker processes for the reconstruction.
    overwrite : bool
        Replace outputs the demo did not write itself (see :func:`claim_demo_folder`), checked before any work.
    echo : callable
        Where progress lines go.

    Returns
    -------
    DemoResult
        Paths of the store, the reconstruction, the figures and ``report.md``, and what the demo measured.
    """
    from cmsn_cube.outputs import claimed_output

    out = Path(out_dir)
    store_path = str(store or Path("stores") / "demo.zarr")
    with claimed_output(out, lambda: claim_demo_folder(out, store=store_path, overwrite=overwrite)):
        return _run_demo(
            out, store_path, size=size, seed=seed, model=model, adapt_seconds=adapt_seconds, workers=workers, echo=echo
        )


def _run_demo(
    out: Path,
    store_path: str,
    *,
    size: int,
    seed: int,
    model: str | None,
    adapt_seconds: float,
    workers: int,
    echo: Callable[[str], object],
) -> DemoResult:
    out.mkdir(parents=True, exist_ok=True)
    reconstruction_path = str(out / "reconstruction.zarr")
    stages = _Stages(total=6)
    with stages.timed("scene"):
        scene, cube = _write_scene(store_path, size=size, seed=seed)
        fractions = cloud_fraction(cube).compute()
    with stages.timed("samples"):
        sample_line = _describe_samples(store_path, size=size, seed=seed)
    with stages.timed("model"):
        checkpoint, adapted_line = _choose_model(store_path, model, adapt_seconds=adapt_seconds, out=out)
    with stages.timed("reconstruction"):
        result = _reconstruct_scene(cube, checkpoint, reconstruction_path, size=size, workers=workers, echo=echo)
    with stages.timed("evaluation"):
        cloudy = _score_methods(cube, result, out)
    with stages.timed("figures"):
        figures = _draw_figures(scene, cube, result, checkpoint, cloudy, out)
    stages.close()

    demo = DemoResult(
        store=store_path,
        reconstruction=reconstruction_path,
        out_dir=str(out),
        figures=[str(f) for f in figures],
        cloud_percent={
            str(t)[:10]: round(100 * float(f), 2) for t, f in zip(cube.time.values, fractions.values, strict=True)
        },
        cloudy_summary=cloudy,
        seconds=stages.seconds,
    )
    demo.report = _write_report(demo, cube, result, sample_line, adapted_line)
    demo.written = {path.name: _digest(path) for path in _demo_outputs(out) if path.name != "demo.json"}
    (out / "demo.json").write_text(json.dumps(asdict(demo), indent=2))
    echo(describe_cube(cube, name=store_path))
    echo(_markdown_table(cloudy))
    echo(f"report: {demo.report}\nfigures: {', '.join(demo.figures)}\nreconstruction: {reconstruction_path}")
    return demo


class _Stages:
    """The demo's progress bar, and the seconds each stage took (rounded to 0.1 s, for the report)."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.seconds: dict[str, float] = {}
        self.bar = tqdm(total=total, desc="demo", unit="stage")

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        self.bar.set_postfix_str(name)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _write_scene(store_path: str, *, size: int, seed: int) -> tuple[xr.Dataset, xr.Dataset]:
    """Write the embedded scene to ``store_path``; return it and the cube read back with its mask decoded anew."""
    scene = synthetic_scene(height=size, width=size, seed=seed)
    scene.attrs[DEMO_STORE_ATTR] = True  # the next demo may replace it (claim_demo_folder checked the rest)
    write_cube(scene, store_path, overwrite=True)
    # decode the cloud mask afresh from the QA bits in the store, as for real Landsat
    cube = add_cloud_mask(open_cube(store_path).drop_vars("cloud_mask"))
    return scene, cube


def _describe_samples(store_path: str, *, size: int, seed: int) -> str:
    """Cut the store into training windows and describe them and one sample, for the report."""
    from cmsn_cube.samples import TripletWindowDataset

    samples = TripletWindowDataset(store_path, size=min(256, size), overlap=32, seed=seed)
    example = samples[0]
    return (
        f"{len(samples.windows)} training windows of {min(256, size)} px (skipped: {samples.skipped}); "
        f"one sample: inputs {tuple(example['inputs'].shape)}, truth {tuple(example['truth'].shape)}, "
        f"pasted clouds {100 * float(example['sim_mask'].float().mean()):.1f} %"
    )


def _choose_model(store_path: str, model: str | None, *, adapt_seconds: float, out: Path) -> tuple[Any, str]:
    """Return the checkpoint to use (``model``, or a fit of it to the scene) and a line saying which."""
    if adapt_seconds <= 0:
        return model, "packaged checkpoint used as is"
    from cmsn_cube.adapt import fit

    fitted = fit(
        store_path, model=model, time_budget=adapt_seconds, out=out / "adapted.pt", overwrite=True, progress=False
    )
    return str(
        fitted.checkpoint
    ), f"adapted to this scene in {adapt_seconds:.0f} s budget: {fitted.card.get('validation', '')}"


def _reconstruct_scene(
    cube: xr.Dataset, checkpoint: Any, path: str, *, size: int, workers: int, echo: Callable[[str], object]
) -> xr.Dataset:
    """Reconstruct the whole scene on a Dask LocalCluster into the Zarr store ``path``; return it loaded."""
    from cmsn_cube.cluster import get_client
    from cmsn_cube.inference import reconstruct, write_reconstruction

    with get_client(workers=workers) as client:
        echo(f"Dask LocalCluster: {len(client.scheduler_info()['workers'])} worker processes")
        # chunks of half the scene so every worker has a block
        lazy = reconstruct(cube, model=checkpoint, chunk=max(256, size // 2))
        write_reconstruction(lazy, path, progress=False, overwrite=True)
    return open_store(path).load()


def _score_methods(cube: xr.Dataset, result: xr.Dataset, out: Path) -> dict[str, dict[str, float]]:
    """Score the reconstruction and the classical gap-fillers against the truth; return the cloudy-pixel table.

    Also writes ``evaluation.csv`` and ``evaluation.json`` to ``out``.
    """
    from cmsn_cube.evaluate import evaluate, summary

    def auto(_: xr.Dataset) -> xr.DataArray:  # the default path: per date the filler the self-check chose
        return result["reconstructed"]

    table = evaluate(
        cube.load(), methods=[auto, "nearest", "linear", "median", "regression"], truth="cube", out=out, echo=None,
        overwrite=True,  # the demo's folder was claimed before any work
    )  # fmt: skip
    table_summary = summary(table)
    # scored on the cloudy pixels every method filled (baselines leave pixels cloudy on all dates empty),
    # with each method's coverage of all cloudy pixels beside it
    return {
        str(method): {
            **{
                metric: float(table_summary.loc[method, ("common", metric)])
                for metric in ("psnr", "ssim", "sam", "mae", "ndvi_mae")
            },
            "coverage": float(table_summary.loc[method, ("cloudy", "coverage")]),
        }
        for method in table_summary.index
    }


def _draw_figures(
    scene: xr.Dataset,
    cube: xr.Dataset,
    result: xr.Dataset,
    checkpoint: Any,
    cloudy: dict[str, dict[str, float]],
    out: Path,
) -> list[Any]:
    """Draw the demo's figures into ``out``; return their paths."""
    from cmsn_cube.inference import FILLED, NO_DATA_FILLED, predict_window
    from cmsn_cube.metrics import ndvi

    figures = plot_dates(cube.load(), out, prefix="date")
    ys, xs = _cloudiest_window(cube["cloud_mask"].values[0], 256)
    window = cube.isel(y=ys, x=xs).load()
    stages = predict_window(window.drop_vars("truth"), model=checkpoint)
    figures.append(plot_panel(window, stages, out / "panel_T1.png", date=0, truth=window["truth"]))
    figures.append(
        plot_ndvi_maps(
            result["ndvi_observed"].isel(time=0),
            result["ndvi"].isel(time=0),
            out / "ndvi_T1.png",
            title=f"{str(cube.time.values[0])[:10]}: NDVI before and after cloud removal",
        )
    )
    filled = np.isin(result["filled"].values, (FILLED, NO_DATA_FILLED)) & np.isfinite(scene["truth"].values).all(axis=1)
    figures.append(
        plot_ndvi_scatter(result["ndvi"].values[filled], ndvi(scene["truth"]).values[filled], out / "ndvi_scatter.png")
    )
    figures.append(plot_method_bars(cloudy, out / "methods_cloudy.png", label="cloudy pixels all methods filled"))
    history = _training_history(checkpoint)
    if history:
        from cmsn_cube.train import plot_history

        figures.append(str(plot_history(history, out / "loss_curves.png")))
    return figures


def _training_history(checkpoint: Any) -> dict | None:
    """Return the loss history recorded in a checkpoint's card, if any."""
    from cmsn_cube.inference import DEFAULT_MODEL
    from cmsn_cube.model import model_card

    try:
        card = model_card(checkpoint or DEFAULT_MODEL)
    except Exception:  # a card is optional for figures; the model itself was already verified
        return None
    history = card.get("history")
    return history if isinstance(history, dict) and (history.get("train") or history.get("val")) else None


def _markdown_table(cloudy: dict[str, dict[str, float]]) -> str:
    lines = [
        "| method | PSNR (dB) | SSIM | SAM (°) | MAE (reflectance) | NDVI MAE | cloudy pixels filled |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in sorted(cloudy.items(), key=lambda item: -item[1]["psnr"]):
        lines.append(
            f"| {method} | {row['psnr']:.2f} | {row['ssim']:.4f} | {row['sam']:.2f} | {row['mae']:.4f} | "
            f"{row['ndvi_mae']:.4f} | {100 * row['coverage']:.1f} % |"
        )
    return "\n".join(lines)


def _write_report(demo: DemoResult, cube: xr.Dataset, result: xr.Dataset, sample_line: str, adapted_line: str) -> str:
    out = Path(demo.out_dir)
    name = lambda path: Path(path).name  # noqa: E731
    clouds = ", ".join(f"{day}: {pct:.1f} %" for day, pct in demo.cloud_percent.items())
    lines = [
        "# cmsn-cube demo report",
        "",
        f"Embedded scene `{demo.store}`: {cube.sizes['y']} × {cube.sizes['x']} px at 30 m, {cube.sizes['time']} dates, "
        f"CRS {cube.rio.crs}. Cloud (cloud + shadow + dilated, from QA_PIXEL) per date: {clouds}.",
        "",
        f"- Samples: {sample_line}.",
        f"- Model: `{result.attrs.get('model')}` (sha256 `{str(result.attrs.get('model_sha256'))[:16]}…`), {adapted_line}.",
        f"- Reconstruction (Dask, region-wise Zarr): `{demo.reconstruction}`.",
        f"- Stage times (s): {', '.join(f'{k} {v}' for k, v in demo.seconds.items())}.",
        "",
        "## Cloudy pixels: model vs classical gap-fillers",
        "",
        "Scored on the cloudy pixels that every method filled (pixels cloudy on every date are left NaN by every "
        "method: the last column). `auto` is the default `reconstruct()` path: each date filled by what the scene "
        "self-check measured best.",
        "",
        _markdown_table(demo.cloudy_summary),
        "",
        "## Scene self-check",
        "",
        "```",
        format_quality(quality_table(result)),
        "```",
        "",
        "Full table (all pixels, per band): `evaluation.csv`, `evaluation.json`.",
        "",
        "## Figures",
        "",
    ]
    captions = {  # what a figure's name does not say
        "loss_curves.png": "The training history recorded in the checkpoint's card (how the model was trained), not this "
        "run: the demo does not train.",
        "panel_T1.png": "The cloudiest window of the scene (its cloud share is in the titles; the report's is the whole "
        "scene's).",
    }
    for figure in demo.figures:
        caption = [captions[name(figure)], ""] if name(figure) in captions else []
        lines += [f"### {name(figure)}", "", *caption, f"![{name(figure)}]({name(figure)})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return str(path)
