"""Score gap-filling methods on a cube whose truth is known: baselines now, the network through the same hook.

Truth comes from the cube's ``truth`` variable (the embedded scene: its ``cloud_mask`` pixels are scored) or,
for real data, from clear pixels hidden under pasted clouds (:func:`cmsn_cube.clouds.make_scoring_cube`).

Torch is imported only when the network runs (:func:`cmsn_method`): pasting clouds and the baselines need none.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import xarray as xr

from cmsn_cube.baselines import BASELINES
from cmsn_cube.clouds import make_scoring_cube
from cmsn_cube.cube import validate_cube
from cmsn_cube.exceptions import CMSNCubeWarning, CubeValidationError, NoDataError
from cmsn_cube.metrics import SSIM_NAME, common_pixels, evaluate_reconstruction
from cmsn_cube.outputs import claim_folder
from cmsn_cube.selfcheck import METHODS as FILLERS

Method = str | Callable[[xr.Dataset], xr.DataArray]
TruthChoice = Literal["cube", "pasted"]

DEFAULT_METHODS: tuple[str, ...] = ("nearest", "linear", "median", "regression")
#: Columns of the printed summary (band = mean), per region.
SUMMARY_METRICS: tuple[str, ...] = ("psnr", "ssim", "mae", "rmse", "sam", "ndvi_mae", "coverage")


def scoring_setup(
    cube: xr.Dataset, *, truth: TruthChoice | None = None, seed: int = 0
) -> tuple[xr.Dataset, xr.DataArray, xr.DataArray]:
    """Return the cube the methods see, the truth and the scored pixels.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube with ``cloud_mask``.
    truth : {"cube", "pasted"}, optional
        ``cube``: its ``truth`` variable, scored where ``cloud_mask`` is True; ``pasted``: clouds pasted on clear
        pixels (seeded), scored there. Default: ``cube`` when the cube has a ``truth`` variable.
    seed : int
        Seed of the pasted clouds.
    """
    validate_cube(cube, require=("reflectance", "cloud_mask"))
    choice = truth or ("cube" if "truth" in cube.data_vars else "pasted")
    if choice == "cube":
        if "truth" not in cube.data_vars:
            raise CubeValidationError("truth='cube' needs a 'truth' variable; use truth='pasted' for real data")
        reference = cube["truth"].load()
        scored = (cube["cloud_mask"] & reference.notnull().all("band")).load().rename("scored")
        # the methods never see the truth
        return cube.drop_vars("truth"), reference, scored
    if choice != "pasted":
        raise CubeValidationError(f"truth must be 'cube' or 'pasted', got {truth!r}")
    return make_scoring_cube(cube, seed=seed)


def _name(method: Method) -> str:
    return method if isinstance(method, str) else getattr(method, "__name__", type(method).__name__)


#: Method name of the network in :func:`evaluate` (its checkpoint comes from ``model=``).
CMSN_METHOD = "cmsn"
#: Method name of the default :func:`cmsn_cube.inference.reconstruct` path: per date the network or the
#: regression, as the scene self-check chose.
AUTO_METHOD = "auto"
#: Methods of :func:`cmsn_cube.inference.reconstruct` (``--method``) that :func:`evaluate` runs through it
#: (:func:`cmsn_method`); ``"regression"`` is the baseline of that name.
RECONSTRUCT_METHODS: tuple[str, ...] = tuple(m for m in (AUTO_METHOD, *FILLERS) if m not in BASELINES)


def cmsn_method(
    model: object = None,
    *,
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 4,
    device: str | None = None,
    method: str = CMSN_METHOD,
) -> Callable[[xr.Dataset], xr.DataArray]:
    """Wrap the CMSN as an evaluation method: ``cube -> reconstructed`` via :func:`cmsn_cube.inference.reconstruct`.

    Torch is imported only when the method runs, so this module stays light.

    Parameters
    ----------
    model : None, str, path or CMSN
        Packaged name or checkpoint path (default: the packaged model), or a loaded model.
    tile, overlap, batch_size, device
        As :func:`cmsn_cube.inference.reconstruct`.
    method : {"cmsn", "auto", "weighted-regression"}
        The network alone, the default path (the scene self-check picks the network or the regression), or
        any other method of :func:`cmsn_cube.inference.reconstruct` (:data:`RECONSTRUCT_METHODS`): the local
        regression weighted by fit, :class:`cmsn_cube.model.prior.RegressionFill`, run as reconstruct runs it.

    Returns
    -------
    callable
        Named after ``method``; returns the computed ``reconstructed(time, band, y, x)``, with the gaps no date observed
        filled too (``fill_unobserved``): the network is scored on every cloudy pixel, and the ``common`` region
        compares it with the classical fillers on the pixels they fill.
    """

    def cmsn(cube: xr.Dataset) -> xr.DataArray:
        from cmsn_cube.inference import reconstruct

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CMSNCubeWarning)  # the unobserved share: scored here, not a surprise
            result = reconstruct(
                cube,
                model=model,
                tile=tile,
                overlap=overlap,
                batch_size=batch_size,
                device=device,
                fill_unobserved=True,
                method=method,
            )
        return result["reconstructed"].load()

    cmsn.__name__ = method
    return cmsn


#: What :func:`write_table` writes into its folder.
EVALUATION_FILES = ("evaluation.csv", "evaluation.json")


def evaluate(
    cube: xr.Dataset,
    *,
    methods: Sequence[Method] = DEFAULT_METHODS,
    seed: int = 0,
    truth: TruthChoice | None = None,
    out: str | os.PathLike[str] | None = None,
    echo: Callable[[str], object] | None = print,
    model: object = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Run gap-filling methods on a cube with known truth and score them.

    Parameters
    ----------
    cube : xarray.Dataset
        The cube (computed: scoring needs the values).
    methods : sequence of str or callable
        Names from :data:`cmsn_cube.baselines.BASELINES` or :data:`RECONSTRUCT_METHODS`, or callables ``cube -> reconstructed(time, band, y,
        x)`` (the hook for the network; named by their ``__name__``).
    seed : int
        Seed of the pasted clouds (real data).
    truth : {"cube", "pasted"}, optional
        See :func:`scoring_setup`.
    out : path, optional
        Folder to write ``evaluation.csv`` and ``evaluation.json`` to.
    echo : callable, optional
        Where the summary table is printed (None: silent).
    model : None, str, path or CMSN
        Checkpoint of the :data:`RECONSTRUCT_METHODS` (``"cmsn"``, ``"auto"``, ``"weighted-regression"``: see
        :func:`cmsn_method`); default the packaged model.
    overwrite : bool
        Replace ``evaluation.csv``/``evaluation.json`` already in ``out`` (checked before any method runs).

    Returns
    -------
    pandas.DataFrame
        Index ``(method, region, band)``, columns as :func:`cmsn_cube.metrics.evaluate_reconstruction`.

    Raises
    ------
    CubeValidationError
        Unknown method name.
    NoDataError
        No pixel to score.
    OutputExistsError
        ``out`` holds an evaluation and ``overwrite`` is not set.
    """
    if out is not None:
        claim_folder(out, EVALUATION_FILES, overwrite=overwrite, what="evaluation folder")
    methods = [cmsn_method(model, method=m) if m in RECONSTRUCT_METHODS else m for m in methods]
    unknown = [m for m in methods if isinstance(m, str) and m not in BASELINES]
    if unknown:
        choices = sorted([*BASELINES, *RECONSTRUCT_METHODS])
        raise CubeValidationError(f"unknown method(s) {unknown}; choose from {choices} or pass a callable")
    observed, reference, scored = scoring_setup(cube, truth=truth, seed=seed)
    if not bool(scored.any()):
        raise NoDataError("no pixel to score: the cube has no cloudy pixel with truth (try truth='pasted')")
    reconstructions = {}
    for method in methods:
        function = BASELINES[method] if isinstance(method, str) else method
        reconstructions[_name(method)] = function(observed)
    # Methods that leave some gaps unfilled (no clear date there) are scored on easier pixels; "common"
    # scores every method on the cloudy pixels all of them filled.
    common = common_pixels(scored, reconstructions.values())
    tables = {
        name: evaluate_reconstruction(reconstructed, reference, scored, common_mask=common)
        for name, reconstructed in reconstructions.items()
    }
    table = pd.concat(tables, names=["method"])
    if echo is not None:
        echo(format_table(table))
    if out is not None:
        write_table(table, out)
    return table


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Tabulate method x (region, metric) for the band mean: the table people read."""
    means = table.xs("mean", level="band")[list(SUMMARY_METRICS)]
    wide = means.unstack("region")
    order = [(region, metric) for region in ("cloudy", "common", "all") for metric in SUMMARY_METRICS]
    return wide.swaplevel(axis=1)[[c for c in order if c in wide.swaplevel(axis=1).columns]]


#: Columns of the printed table: (header, metric, format), band means on the cloudy pixels.
_PRINTED: tuple[tuple[str, str, str], ...] = (
    ("PSNR dB", "psnr", "{:.2f}"),
    ("SSIM", "ssim", "{:.4f}"),
    ("SAM deg", "sam", "{:.2f}"),
    ("MAE", "mae", "{:.4f}"),
    ("filled %", "coverage", "{:.1%}"),
    ("common PSNR", "psnr", "{:.2f}"),
)


def format_table(table: pd.DataFrame) -> str:
    """Format a compact summary (under 120 columns): per method, band means on the cloudy pixels.

    PSNR in dB (data range 1.0), SSIM, SAM in degrees, MAE in reflectance, the share of cloudy pixels filled,
    and the PSNR on the cloudy pixels every method filled (``common``). Every region and band, and RMSE and
    NDVI MAE, are in the returned table and ``evaluation.csv``.
    """
    cloudy = table.xs(("cloudy", "mean"), level=("region", "band"))
    common = table.xs(("common", "mean"), level=("region", "band"))
    n_scored, n_common = int(cloudy["n_pixels"].iloc[0]), int(common["n_pixels"].iloc[0])
    width = max(len("method"), *(len(str(name)) for name in cloudy.index))
    header = [f"{'method':<{width}}", *(f"{title:>11}" for title, _, _ in _PRINTED)]
    lines = [
        f"cloudy pixels scored: {n_scored} ({n_common} filled by all methods: common); band means, {SSIM_NAME}",
        "  ".join(header),
    ]
    for name in cloudy.index:
        cells = [f"{name!s:<{width}}"]
        for title, metric, style in _PRINTED:
            value = float((common if title.startswith("common") else cloudy).loc[name, metric])
            cells.append(f"{style.format(value) if np.isfinite(value) else str(value):>11}")
        lines.append("  ".join(cells))
    lines.append(f"regions cloudy, common, all; every band; {', '.join(SUMMARY_METRICS)}: in evaluation.csv (--out)")
    return "\n".join(lines)


def write_table(table: pd.DataFrame, out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``evaluation.csv`` (long table) and ``evaluation.json`` (records) into folder ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = (folder / name for name in EVALUATION_FILES)
    table.to_csv(csv_path)
    records = table.reset_index().replace([np.inf, -np.inf], [1e308, -1e308])
    records = records.astype(object).where(records.notna(), None)
    json_path.write_text(json.dumps(records.to_dict(orient="records"), indent=1))
    return csv_path, json_path
