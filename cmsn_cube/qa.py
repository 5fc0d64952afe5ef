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
    """Return a two-bit QA confidence (0 none, 1 low, 2 medium, 3 high) as uint8."""
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
    """Return True where any of ``flags`` is set (default: cloud, shadow, cirrus, dilated cloud).

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


#: Sentinel-2 scene classes (SCL) that hide the ground: 3 cloud shadow, 8/9 cloud of medium/high probability,
#: 10 thin cirrus (11 snow is ground).
SCL_CLOUD_CLASSES: tuple[int, ...] = (3, 8, 9, 10)


def cloud_mask_from_scl(scl: xr.DataArray) -> xr.DataArray:
    """Return True where a Sentinel-2 scene class is one of :data:`SCL_CLOUD_CLASSES`."""
    return scl.isin(list(SCL_CLOUD_CLASSES))


def cloud_mask_from_bqa_collection1(bqa: xr.DataArray) -> xr.DataArray:
    """Return True where a Landsat Collection 1 ``BQA`` word flags cloud.

    Cloud (bit 4), or high-confidence cloud shadow (bits 7-8) or cirrus (bits 11-12); never on fill (bit 0).
    """
    cloud = ((bqa >> 4) & 1) == 1
    shadow, cirrus = ((bqa >> 7) & 3) == 3, ((bqa >> 11) & 3) == 3
    return (cloud | shadow | cirrus) & ((bqa & 1) == 0)


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


def ensure_cloud_mask(ds: xr.Dataset, *, min_dates: int = 1, **options: object) -> xr.Dataset:
    """Return ``ds`` validated, with a ``cloud_mask``: its own, or decoded from ``qa_pixel``.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube with ``reflectance`` and ``cloud_mask`` or ``qa_pixel``.
    min_dates : int
        Fewest dates the cube may have.
    **options
        Decoding options of :func:`cloud_mask_from_qa`; given, the mask is decoded anew even where ``ds`` has one.

    Raises
    ------
    CubeValidationError
        Neither ``cloud_mask`` nor ``qa_pixel``, or another schema error (see :func:`validate_cube`).
    """
    if "qa_pixel" in ds and ("cloud_mask" not in ds or options):
        ds = add_cloud_mask(ds.drop_vars("cloud_mask", errors="ignore"), **options)
    return validate_cube(ds, require=("reflectance", "cloud_mask"), min_dates=min_dates)


def cloud_fraction(ds: xr.Dataset) -> xr.DataArray:
    """Fraction (0-1) of valid pixels that are cloud, per date.

    Valid pixels are those with finite reflectance in every band; a date with no valid pixel gives NaN.
    Lazy if the cube is.
    """
    ds = ensure_cloud_mask(ds)
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


# ------------------------------------------------------------------------------- Landsat 7 SLC-off stripes

#: Landsat 7's scan line corrector failed on this day. Source: USGS, "Landsat 7 ETM+ SLC-off": every later ETM+
#: scene misses about 22 % of its pixels in wedge-shaped stripes (Collection 2: QA_PIXEL fill bit, band value 0).
SLC_FAILURE_DAY = "2003-05-31"

#: The sensor whose scenes after :data:`SLC_FAILURE_DAY` are striped.
SLC_OFF_SENSOR = "LANDSAT_7"

#: Name of the SLC-off stripes in ``cloud_mask``'s ``flags`` attribute.
SLC_OFF_FLAG = "slc_off_gap"


def slc_off_dates(ds: xr.Dataset) -> xr.DataArray:
    """Return True for the Landsat 7 dates after the scan line corrector failed (SLC-off: striped scenes).

    Read from the ``sensor(time)`` coordinate and ``time``; all False for a cube without ``sensor``.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube.

    Returns
    -------
    xarray.DataArray
        ``slc_off(time)`` bool.
    """
    if "time" not in ds.coords or not np.issubdtype(ds["time"].dtype, np.datetime64):
        raise CubeValidationError("slc_off_dates needs a datetime64 'time' coordinate (a cube: see make_cube)")
    days = ds["time"].values.astype("datetime64[D]")
    if "sensor" in ds.coords:
        sensors = np.asarray(ds["sensor"].values, dtype=object)
    else:
        sensors = np.full(days.shape, "", dtype=object)
    # failure during 2003-05-31: that day's scenes are still whole, every later one is striped
    flags = (sensors == SLC_OFF_SENSOR) & (days > np.datetime64(SLC_FAILURE_DAY, "D"))
    return xr.DataArray(
        np.asarray(flags, dtype=bool),
        dims="time",
        coords={"time": ds["time"].values},
        name="slc_off",
        attrs={"long_name": f"Landsat 7 date after the scan line corrector failed on {SLC_FAILURE_DAY} (striped)"},
    )


def slc_off_gaps(ds: xr.Dataset) -> xr.DataArray:
    """Return the SLC-off stripes: pixels without data (QA fill bit, or NaN in a band) on Landsat 7 SLC-off dates.

    All False on other dates. The scene's edges on those dates are no data too and are included: both are gaps
    that other dates can fill. Lazy if the cube is.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube with ``reflectance`` (``qa_pixel`` optional).

    Returns
    -------
    xarray.DataArray
        ``slc_off_gaps(time, y, x)`` bool.

    Notes
    -----
    A reconstruction flags the filled stripes ``NO_DATA_FILLED`` (4) in ``filled``, apart from clouds (1)::

        from cmsn_cube.inference import NO_DATA_FILLED

        stripes_filled = result["filled"] == NO_DATA_FILLED
    """
    validate_cube(ds, require=("reflectance",), check_values=False)
    no_data = ds["reflectance"].isnull().any("band")
    if "qa_pixel" in ds:
        no_data = no_data | qa_flag(ds["qa_pixel"], "fill")
    gaps = no_data & slc_off_dates(ds)
    return (
        gaps.transpose("time", "y", "x")
        .rename("slc_off_gaps")
        .assign_attrs(long_name="no data on a Landsat 7 SLC-off date (stripes)")
    )


def add_slc_off_gaps(ds: xr.Dataset) -> xr.Dataset:
    """Return ``ds`` with the SLC-off stripes (:func:`slc_off_gaps`) in ``cloud_mask``: gaps to fill like clouds.

    The reconstruction fills ``cloud_mask`` and pixels without data; with the stripes in ``cloud_mask`` every
    user of the mask sees them as gaps too. Cloud fractions do not change: they count pixels with data only.
    ``cloud_mask``'s ``flags`` attribute gains :data:`SLC_OFF_FLAG`. A cube without SLC-off dates is returned
    as it is.

    Parameters
    ----------
    ds : xarray.Dataset
        A cube with ``reflectance`` and ``cloud_mask`` (decode it first with :func:`add_cloud_mask`).

    Returns
    -------
    xarray.Dataset
    """
    validate_cube(ds, require=("reflectance", "cloud_mask"), check_values=False)
    if not slc_off_dates(ds).values.any():
        return ds
    attrs = dict(ds["cloud_mask"].attrs)
    flags = [flag for flag in str(attrs.get("flags", "")).split(",") if flag]
    attrs["flags"] = ",".join(flags if SLC_OFF_FLAG in flags else [*flags, SLC_OFF_FLAG])
    mask = (ds["cloud_mask"] | slc_off_gaps(ds)).rename("cloud_mask").assign_attrs(attrs)
    out = ds.assign(cloud_mask=mask)
    out["cloud_mask"].encoding["grid_mapping"] = "spatial_ref"
    return out


# ------------------------------------------------------------------ pre-collection Landsat 8 BQA (before 2017)

#: Pre-collection Landsat 8 Level-1 ``BQA`` single-bit flags (scene ids ``LC8...LGN00``, processed before
#: Collection 1 in 2017). Source: Landsat 8 Data Users Handbook v1.0 (2015), section 5.4 "Quality Assessment
#: Band"; the same layout as mapbox/rio-l8qa's ``qa_pre.py``. Bit 3 is reserved. Not the Collection 1 layout
#: (bit 4 cloud, 5-6 cloud confidence) nor Collection 2 (:data:`QA_BITS`): decode each with its own function.
BQA_PRE_COLLECTION_BITS: dict[str, int] = {"fill": 0, "dropped_frame": 1, "terrain_occlusion": 2}

#: Pre-collection ``BQA`` two-bit confidences, given by their lowest bit: 0 not determined (for cloud and cirrus:
#: the algorithm did not run), 1 no (0-33 %), 2 maybe (34-66 %), 3 yes (67-100 %). Bits 6-7 (cloud shadow) and
#: 8-9 (vegetation) were reserved: always 0 in pre-collection products.
BQA_PRE_COLLECTION_CONFIDENCE_BITS: dict[str, int] = {
    "water_confidence": 4,
    "cloud_shadow_confidence": 6,
    "vegetation_confidence": 8,
    "snow_ice_confidence": 10,
    "cirrus_confidence": 12,
    "cloud_confidence": 14,
}


def _as_bqa(bqa: xr.DataArray | np.ndarray) -> xr.DataArray:
    array = bqa if isinstance(bqa, xr.DataArray) else xr.DataArray(np.asarray(bqa))
    if not np.issubdtype(array.dtype, np.integer):
        raise CubeValidationError(f"BQA must hold integer bit flags, got {array.dtype}")
    return array


def decode_bqa_pre_collection(bqa: xr.DataArray | np.ndarray) -> xr.Dataset:
    """Every flag (bool) and confidence (uint8, 0-3) of a pre-collection Landsat 8 ``BQA`` band.

    Parameters
    ----------
    bqa : xarray.DataArray or numpy.ndarray
        The ``BQA`` words (uint16) of a pre-collection Level-1 product (``LC8...LGN00_BQA.TIF``).

    Returns
    -------
    xarray.Dataset
        One variable per entry of :data:`BQA_PRE_COLLECTION_BITS` and :data:`BQA_PRE_COLLECTION_CONFIDENCE_BITS`;
        lazy if ``bqa`` is.

    Examples
    --------
    >>> flags = decode_bqa_pre_collection(np.array([20480, 53248, 1], dtype="uint16"))
    >>> flags["cloud_confidence"].values.tolist(), flags["fill"].values.tolist()
    ([1, 3, 0], [False, False, True])
    """
    array = _as_bqa(bqa)
    out = {name: ((array >> bit) & 1).astype(bool).rename(name) for name, bit in BQA_PRE_COLLECTION_BITS.items()}
    for name, bit in BQA_PRE_COLLECTION_CONFIDENCE_BITS.items():
        out[name] = ((array >> bit) & 0b11).astype("uint8").rename(name)
    return xr.Dataset(out)


def cloud_mask_from_bqa_pre_collection(
    bqa: xr.DataArray | np.ndarray, *, min_cloud_confidence: int = 3, min_cirrus_confidence: int | None = None
) -> xr.DataArray:
    """Cloud mask of a pre-collection Landsat 8 ``BQA``: cloud confidence at least ``min_cloud_confidence``.

    Parameters
    ----------
    bqa : xarray.DataArray or numpy.ndarray
        The ``BQA`` words (uint16).
    min_cloud_confidence : int
        2 (maybe, 34-66 %) or 3 (yes, 67-100 %, the default); 1 would call nearly every pixel cloud.
    min_cirrus_confidence : int, optional
        Also count pixels whose cirrus confidence is at least this.

    Returns
    -------
    xarray.DataArray
        Bool, True = cloud; fill pixels are never cloud.
    """
    from cmsn_cube.exceptions import ArgumentError

    for name, value in (("min_cloud", min_cloud_confidence), ("min_cirrus", min_cirrus_confidence)):
        if value is not None and value not in (1, 2, 3):
            raise ArgumentError(f"{name}_confidence is a BQA confidence 1 (no), 2 (maybe) or 3 (yes), got {value}")
    flags = decode_bqa_pre_collection(bqa)
    mask = flags["cloud_confidence"] >= min_cloud_confidence
    if min_cirrus_confidence is not None:
        mask = mask | (flags["cirrus_confidence"] >= min_cirrus_confidence)
    mask = mask & ~flags["fill"]
    return mask.rename("cloud_mask").assign_attrs(long_name="cloud mask (pre-collection BQA)")


def observed_ndvi(cube: xr.Dataset) -> xr.DataArray:
    """Return the NDVI of the observed reflectance, NaN under clouds (lazy if the cube is).

    The clouds are the cube's ``cloud_mask``, or decoded from ``qa_pixel`` (:func:`ensure_cloud_mask`); a cube
    with neither is taken as clear. NDVI as :func:`cmsn_cube.metrics.ndvi`.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube with ``reflectance``.

    Returns
    -------
    xarray.DataArray
        ``ndvi(time, y, x)``.
    """
    from cmsn_cube.metrics import ndvi

    reflectance = cube["reflectance"]
    if "cloud_mask" in cube or "qa_pixel" in cube:
        reflectance = reflectance.where(~ensure_cloud_mask(cube)["cloud_mask"])
    return ndvi(reflectance).rename("ndvi")
