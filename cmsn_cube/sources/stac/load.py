"""The load: a plan's chosen acquisitions through ``odc.stac.load`` into a lazy, valid cube."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS, make_cube
from cmsn_cube.exceptions import CubeValidationError, NoDataError, check_positive
from cmsn_cube.qa import QA_BITS
from cmsn_cube.sources._common import add_landsat_masks
from cmsn_cube.sources.stac.grid import quiet_odc
from cmsn_cube.sources.stac.plan import StacPlan, plan_stac
from cmsn_cube.sources.stac.products import (
    StacProduct,
    declared_scaling,
    import_stac_module,
    product_spec,
    stac_cfg,
)
from cmsn_cube.sources.stac.search import DEFAULT_TIMEOUT_S

#: Dask chunks of the loaded cube: one date, 512 x 512 pixels (the store's chunks on disk).
DEFAULT_STAC_CHUNKS: dict[str, int] = {"time": 1, "y": 512, "x": 512}


def load_stac(
    plan: StacPlan,
    *,
    chunks: Mapping[str, int] | None = None,
    patch_url: Callable[[str], str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> xr.Dataset:
    """Load a plan's chosen acquisitions with ``odc.stac.load`` into a lazy cube.

    Parameters
    ----------
    plan : StacPlan
        From :func:`plan_stac`.
    chunks : mapping, optional
        Dask chunks over ``time``/``y``/``x``; default :data:`DEFAULT_STAC_CHUNKS`.
    patch_url : callable, optional
        Applied to every asset URL before reading (``planetary_computer.sign`` for the Planetary Computer).
    timeout : float
        Seconds GDAL may wait for each HTTP request of an asset read (carried into the lazy reads; see
        :func:`cmsn_cube.sources.stac.reader.http_options`); then the read fails with an error naming the URL.

    Returns
    -------
    xarray.Dataset
        A valid cube, lazy: ``reflectance`` float32 in [0, 1] (DN x scale + offset, clipped; the scale and offset
        the items declare in ``raster:bands``, else the product's; fill DN or QA fill bit -> NaN), ``qa_pixel``
        uint16 as stored, ``cloud_mask`` decoded by :func:`cmsn_cube.qa.add_cloud_mask`,
        ``sensor(time)`` from ``platform``, ``cloud_cover(time)`` the scenes' ``eo:cloud_cover`` (0-1),
        ``slc_off(time)`` the Landsat 7 SLC-off dates, whose stripes are in ``cloud_mask``
        (:func:`cmsn_cube.qa.add_slc_off_gaps`).
    """
    odc_stac = import_stac_module("odc.stac", "odc-stac")
    spec = product_spec(plan.product, plan.assets)
    check_positive(timeout=timeout)
    ds = _load_chosen(odc_stac, plan, spec, chunks=chunks, patch_url=patch_url, timeout=timeout)
    reflectance, qa = _reflectance_and_qa(ds, spec, *_scaling(plan, spec))
    cube = make_cube(
        reflectance,
        time=ds["time"].values.astype("datetime64[ns]"),
        y=ds["y"].values,
        x=ds["x"].values,
        crs=plan.crs,
        sensor=[a.sensor for a in plan.chosen],
        qa_pixel=qa,
        source=f"STAC {plan.collection} ({plan.source}) via odc-stac",
        attrs={
            "collection_id": plan.collection,
            "reflectance": plan.product.upper(),
            "product": plan.product,
            "scale_m": plan.resolution,
            "bbox": list(plan.bbox),
            "window": f"{plan.start}/{plan.end}",
            "stac_items": [",".join(a.item_ids) for a in plan.chosen],
        },
    )
    cube = cube.assign_coords(cloud_cover=("time", np.array([a.cloud_cover for a in plan.chosen], dtype="float64")))
    cube["cloud_cover"].attrs.update(long_name="scene cloud cover (eo:cloud_cover / 100)", units="1")
    cube["reflectance"].attrs["long_name"] = "surface reflectance" if plan.product == "sr" else plan.product
    # as the Earth Engine source: Landsat 7 SLC-off stripes (fill) join cloud_mask as gaps to fill
    return add_landsat_masks(cube)


def _group_key(keys: Sequence[np.datetime64], item: Any, parsed: Any, idx: int) -> np.datetime64:
    """Tell odc-stac's groupby which acquisition (its time) each item belongs to."""
    return keys[idx]


def _load_chosen(
    odc_stac: Any,
    plan: StacPlan,
    spec: StacProduct,
    *,
    chunks: Mapping[str, int] | None,
    patch_url: Callable[[str], str] | None,
    timeout: float,
) -> xr.Dataset:
    """Load the plan's items with odc-stac, one time per acquisition, on the plan's grid (``y``/``x`` dims)."""
    items = list(plan.items)
    if not items or plan.geobox is None:
        raise NoDataError("the plan holds no items to load; build it with plan_stac(...)")
    import rasterio

    from cmsn_cube.sources.stac.reader import NamingRioDriver, http_options

    by_id = {item_id: a.time for a in plan.chosen for item_id in a.item_ids}
    group_of = [by_id[item.id] for item in items]
    # odc-stac captures the GDAL options in force here and sets them again around each lazy read
    with quiet_odc(), rasterio.Env(**http_options(timeout)):
        ds = odc_stac.load(
            items,
            bands=list(spec.asset_keys),
            geobox=plan.geobox,
            groupby=functools.partial(_group_key, group_of),
            chunks=dict(chunks or DEFAULT_STAC_CHUNKS),
            resampling="nearest",  # QA bits must not be interpolated; reflectance keeps its own values
            stac_cfg=stac_cfg(spec),
            patch_url=patch_url,
            fail_on_error=True,
            driver=NamingRioDriver(),  # a failed read names its asset
        )
    renames = {old: new for old, new in (("latitude", "y"), ("longitude", "x")) if old in ds.dims}
    ds = ds.rename(renames) if renames else ds
    times = ds["time"].values.astype("datetime64[ns]")
    expected = np.array([a.time for a in plan.chosen], dtype="datetime64[ns]")
    if times.shape != expected.shape or (times != expected).any():
        raise CubeValidationError(f"odc-stac returned times {times} for the planned acquisitions {expected}")
    return ds


def _scaling(plan: StacPlan, spec: StacProduct) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(time, band)`` scale and offset: what each acquisition's items declare, else the product's.

    Items of one acquisition are mosaicked into one date, so they must agree on their scaling.
    """
    by_id = {item.id: item for item in plan.items}
    scales, offsets = np.empty((len(plan.chosen), len(BANDS))), np.empty((len(plan.chosen), len(BANDS)))
    for t, acquisition in enumerate(plan.chosen):
        for b, band in enumerate(BANDS):
            key = spec.assets[band]
            declared = {
                declared_scaling(by_id[item_id].assets[key]) or (spec.scale, spec.offset)
                for item_id in acquisition.item_ids
            }
            if len(declared) > 1:
                raise CubeValidationError(
                    f"the STAC items {', '.join(acquisition.item_ids)} of {acquisition.day} declare different "
                    f"(scale, offset) {sorted(declared)} for asset {key!r}: they cannot be mosaicked into one date"
                )
            scales[t, b], offsets[t, b] = declared.pop()
    return scales, offsets


def _reflectance_and_qa(ds: xr.Dataset, spec: StacProduct, scales: np.ndarray, offsets: np.ndarray) -> tuple[Any, Any]:
    """Return ``(time, band, y, x)`` float32 reflectance (NaN at fill) and the uint16 QA words, both lazy.

    ``scales`` and ``offsets`` are ``(time, band)``: reflectance = DN x scale + offset.
    """
    qa = ds[spec.qa_asset].transpose("time", "y", "x").data.astype("uint16")
    dn = xr.concat([ds[spec.assets[band]] for band in BANDS], dim="band").transpose("time", "band", "y", "x")
    dn = dn.chunk({"band": -1})  # the four bands of a pixel block in one chunk, as the store keeps them
    fill = (qa & np.uint16(1 << QA_BITS["fill"])) != 0
    missing = (dn.data == spec.nodata) | fill[:, None]
    # float64 for the affine step so DN x 2.75e-5 - 0.2 is exact before the float32 cast
    per_date = np.s_[:, :, None, None]
    values = np.clip(dn.data.astype("float64") * scales[per_date] + offsets[per_date], 0.0, 1.0)
    return np.where(missing, np.nan, values).astype("float32"), qa


def open_stac(
    catalog: Any,
    *,
    patch_url: Callable[[str], str] | None = None,
    chunks: Mapping[str, int] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    **plan_options: Any,
) -> xr.Dataset:
    """Open Landsat Collection 2 Level-2 of a STAC catalog as a lazy cube: :func:`plan_stac`, then :func:`load_stac`.

    Parameters
    ----------
    catalog : str, path, pystac.Catalog, pystac.ItemCollection or list of pystac.Item
        Where the items are (see :func:`find_items`).
    patch_url, chunks
        As :func:`load_stac` takes them.
    timeout : float
        Seconds each HTTP request may wait for an answer, in the search and in the asset reads.
    **plan_options
        The other arguments of :func:`plan_stac` (what to find, which dates, which grid): ``bbox``, ``start`` and
        ``end`` at least.

    Returns
    -------
    xarray.Dataset
        A valid, lazy cube (see :func:`load_stac`).

    Examples
    --------
    >>> cube = open_stac(  # doctest: +SKIP
    ...     "https://planetarycomputer.microsoft.com/api/stac/v1", bbox=(114.17, 30.48, 114.33, 30.62),
    ...     start="2021-01-01", end="2021-12-31", max_cloud=0.5, n_dates=3, patch_url=planetary_computer.sign)
    """
    plan = plan_stac(catalog, timeout=timeout, **plan_options)
    return load_stac(plan, chunks=chunks, patch_url=patch_url, timeout=timeout)
