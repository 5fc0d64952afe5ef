"""The end-to-end demo on the embedded scene: what a new user runs first (`cmsn-cube demo`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cmsn_cube.cube import open_cube, write_cube
from cmsn_cube.plot import plot_dates
from cmsn_cube.qa import add_cloud_mask, cloud_fraction
from cmsn_cube.report import describe_cube
from cmsn_cube.sources.synthetic import synthetic_scene


@dataclass
class DemoResult:
    """Where the demo put things."""

    store: str
    out_dir: str
    figures: list[str] = field(default_factory=list)
    cloud_percent: dict[str, float] = field(default_factory=dict)


def run_demo(
    out_dir: str | os.PathLike[str] = "outputs/demo",
    *,
    store: str | os.PathLike[str] | None = None,
    height: int = 512,
    width: int = 512,
    seed: int = 0,
    echo=print,  # type: ignore[no-untyped-def]
) -> DemoResult:
    """Synthetic scene -> Zarr store -> QA decoding -> cloud fractions -> one RGB + mask PNG per date.

    Parameters
    ----------
    out_dir : path-like
        Folder for figures and the report.
    store : path-like, optional
        Zarr store to write; default ``stores/demo.zarr``.
    height, width : int
        Scene size in pixels.
    seed : int
        Scene seed.
    echo : callable
        Where progress lines go.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_path = str(store or Path("stores") / "demo.zarr")
    steps = tqdm(total=3, desc="demo", unit="step")
    scene = synthetic_scene(height=height, width=width, seed=seed)
    write_cube(scene, store_path, overwrite=True)
    steps.update()
    cube = add_cloud_mask(open_cube(store_path).drop_vars("cloud_mask"))  # decode QA afresh from the store
    fractions = cloud_fraction(cube).compute()
    steps.update()
    figures = plot_dates(cube.load(), out, prefix="date")
    steps.update()
    steps.close()
    echo(describe_cube(cube, name=store_path))
    result = DemoResult(store=store_path, out_dir=str(out), figures=figures)
    result.cloud_percent = {
        str(t)[:10]: round(100 * float(f), 2) for t, f in zip(cube.time.values, fractions.values, strict=True)
    }
    echo(f"figures: {', '.join(figures)}")
    return result
