"""Landsat Collection 2 QA_PIXEL decoding, cloud masks, cloud fractions and date selection."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import xarray as xr

from cmsn_cube.cube import validate_cube
from cmsn_cube.exceptions import CubeValidationError, NoDataError

#: QA_PIXEL single-bit flags. Source: USGS Landsat 8-9 / 4-7 Collection 2 Level-1 Data Format Control Book,
#: "Pixel Quality Assessment" (bit 5 is snow, not cloud: the seed's mistake).
QA_BITS: dict[str, int] = {
    "fill": 0,
    "dilated_cloud": 1,
    "cirrus": 2,
    "cloud": 3,
    "cloud_shadow": 4,
    "snow": 5,
    "clear": 6,
    "water": 7,
}

#: Two-bit confidence fields (0 none, 1 low, 2 medium, 3 high), given by their lowest bit.
QA_CONFIDENCE_BITS: dict[str, int] = {
    "cloud_confidence": 8,
    "cloud_shadow_confidence": 10,
    "snow_ice_confidence": 12,
    "cirrus_confidence": 14,
}

CloudFlag = Literal["cloud", "cloud_shadow", "cirrus", "dilated_cloud", "snow"]

#: What counts as cloud by default: every flag that hides or darkens the ground.
DEFAULT_CLOUD_FLAGS: tuple[CloudFlag, ...] = ("cloud", "cloud_shadow", "cirrus", "dilated_cloud")

#: The seed's cloud levels for T1, T2, T3.
DEFAULT_CLOUD_LEVELS: tuple[float, ...] = (0.25, 0.15, 0.10)


def _check_qa(qa: xr.DataArray) -> None:
    if not np.issubdtype(qa.dtype, np.integer):
        raise CubeValidationError(f"QA_PIXEL must hold integer bit flags, got {qa.dtype}")


def qa_flag(qa: xr.DataArray, flag: str) -> xr.DataArray:
    """One single-bit QA flag (see :data:`QA_BITS`) as a boolean array."""
    if flag not in QA_BITS:
        raise KeyError(f"unknown QA flag {flag!r}; choose from {sorted(QA_BITS)}")
    _check_qa(qa)
    return ((qa >> QA_BITS[flag]) & 1).astype(bool).rename(flag)


def qa_confidence(qa: xr.DataArray, field: str) -> xr.DataArray:
    """A two-bit QA confidence (0 none, 1 low, 2 medium, 3 high) as uint8."""
    if field not in QA_CONFIDENCE_BITS:
        raise KeyError(f"unknown QA confidence {field!r}; choose from {sorted(QA_CONFIDENCE_BITS)}")
    _check_qa(qa)
    return ((qa >> QA_CONFIDENCE_BITS[field]) & 0b11).astype("uint8").rename(field)


def decode_qa(qa: xr.DataArray) -> xr.Dataset:
    """Every QA_PIXEL flag (bool) and confidence (uint8) as variables of one Dataset (lazy if ``qa`` is)."""
    flags = {name: qa_flag(qa, name) for name in QA_BITS}
    confidences = {name: qa_confidence(qa, name) for name in QA_CONFIDENCE_BITS}
    return xr.Dataset({**flags, **confidences})


def encode_qa(flags: dict[str, np.ndarray], confidences: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Pack boolean flags and 0-3 confidences into uint16 QA_PIXEL words (the inverse of :func:`decode_qa`)."""
    shape = np.shape(next(iter(flags.values())))
    qa = np.zeros(shape, dtype=np.uint16)
    for name, values in flags.items():
        qa |= np.asarray(values, dtype=np.uint16) << np.uint16(QA_BITS[name])
    for name, values in (confidences or {}).items():
        qa |= (np.asarray(values, dtype=np.uint16) & 0b11) << np.uint16(QA_CONFIDENCE_BITS[name])
    return qa


def cloud_mask_from_qa(
    qa: xr.DataArray, *, flags: Iterable[CloudFlag] = DEFAULT_CLOUD_FLAGS, min_cloud_confidence: int | None = None
) -> xr.DataArray:
    """True where any of ``flags`` is set (default: cloud, shadow, cirrus, dilated cloud).

    Parameters
    ----------
    qa : xarray.DataArray
        Collection 2 QA_PIXEL words.
    flags : iterable of str
        Which single-bit flags count as cloud.
    min_cloud_confidence : int, optional
        Also count pixels whose cloud confidence is at least this (1 low, 2 medium, 3 high).
    """
    mask = xr.zeros_like(qa, dtype=bool)
    for flag in flags:
        mask = mask | qa_flag(qa, flag)
    if min_cloud_confidence is not None:
        mask = mask | (qa_confidence(qa, "cloud_confidence") >= min_cloud_confidence)
    return mask.rename("cloud_mask").assign_attrs(flags=",".join(flags), long_name="cloud mask")


def add_cloud_mask(ds: xr.Dataset, **options: object) -> xr.Dataset:
    """Return ``ds`` with ``cloud_mask`` decoded from ``qa_pixel`` (options as :func:`cloud_mask_from_qa`).

    Fill pixels (QA bit 0) and pixels without reflectance are no data, not cloud: they stay False here and are
    NaN in ``reflectance``.
    """
    validate_cube(ds, require=("reflectance", "qa_pixel"))
    mask = cloud_mask_from_qa(ds["qa_pixel"], **options)  # type: ignore[arg-type]
    mask = mask & ~qa_flag(ds["qa_pixel"], "fill")
    out = ds.assign(cloud_mask=mask)
    out["cloud_mask"].encoding["grid_mapping"] = "spatial_ref"
    return out


def cloud_fraction(ds: xr.Dataset) -> xr.DataArray:
    """Fraction (0-1) of valid pixels that are cloud, per date.

    Valid pixels are those with finite reflectance in every band; a date with no valid pixel gives NaN.
    Lazy if the cube is.
    """
    if "cloud_mask" not in ds and "qa_pixel" in ds:
        ds = add_cloud_mask(ds)
    validate_cube(ds, require=("reflectance", "cloud_mask"))
    valid = ds["reflectance"].notnull().all("band")
    cloudy = (ds["cloud_mask"] & valid).sum(("y", "x"))
    n_valid = valid.sum(("y", "x"))
    return (cloudy / n_valid.where(n_valid > 0)).rename("cloud_fraction").assign_attrs(units="1")


def select_dates(
    fractions: xr.DataArray, levels: Sequence[float] = DEFAULT_CLOUD_LEVELS, *, keep_order: bool = True
) -> list[int]:
    """Pick one distinct date per target cloud level, each the date whose cloud fraction is nearest the level.

    Parameters
    ----------
    fractions : xarray.DataArray
        Cloud fraction per date (from :func:`cloud_fraction`, computed).
    levels : sequence of float
        Target fractions, e.g. ``(0.25, 0.15, 0.10)`` for T1, T2, T3.
    keep_order : bool
        Return the chosen positions sorted in time (True) or in the order of ``levels``.

    Returns
    -------
    list of int
        Positions along ``time``.
    """
    values = np.asarray(fractions.values, dtype="float64")
    if len(levels) > np.isfinite(values).sum():
        raise NoDataError(f"{len(levels)} dates requested but only {np.isfinite(values).sum()} dates have valid pixels")
    chosen: list[int] = []
    # greedy by closeness so the best-matching level gets its date first
    candidates = sorted(
        ((abs(v - level), i, li) for li, level in enumerate(levels) for i, v in enumerate(values) if np.isfinite(v))
    )
    by_level: dict[int, int] = {}
    for _, i, li in candidates:
        if li in by_level or i in chosen:
            continue
        by_level[li] = i
        chosen.append(i)
    ordered = [by_level[li] for li in range(len(levels))]
    return sorted(ordered) if keep_order else ordered
