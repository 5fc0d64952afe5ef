"""What xee returns -> a validated cube (offline and lazy): band names, QA fill, surface reflectance scaling, CRS.

The layout xee 0.1.2 returns is described in :mod:`cmsn_cube.sources.earthengine`; :func:`xee_to_cube` checks
it step by step and raises a clear error where a dataset does not fit it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS, make_cube
from cmsn_cube.exceptions import BandMismatchError, DimensionError, MissingCRSError, TimeAxisError
from cmsn_cube.qa import QA_BITS
from cmsn_cube.sources._common import SR_FILL_DN, SR_OFFSET, SR_SCALE, add_landsat_masks
from cmsn_cube.sources.earthengine.collection import (
    PRODUCT_NAMES,
    QA_BAND,
    SR_BAND_PREFIX,
    Product,
    Sensor,
    collection_id,
    sensor_band_names,
)

#: Other names older xee releases gave the spatial dims (0.0.x: ``X``/``Y`` or ``lon``/``lat``).
_DIM_ALIASES: dict[str, str] = {"X": "x", "Y": "y", "lon": "x", "lat": "y"}

#: QA_PIXEL's fill bit: set where a pixel holds no data.
_FILL = 1 << QA_BITS["fill"]


def xee_to_cube(
    ds: xr.Dataset,
    *,
    sensor: Sensor,
    product: Product = "toa",
    crs: str | None = None,
    source: str | None = None,
    qa_band: str = QA_BAND,
) -> xr.Dataset:
    """Turn what xee returns into a cube: reflectance, qa_pixel, cloud_mask, band names, CRS, sensor. Lazy.

    Parameters
    ----------
    ds : xarray.Dataset
        xee's dataset: one ``(time, y, x)`` float32 variable per band named by its band id in the product's
        collection (common names ``blue``... are accepted too), NaN where Earth Engine masked the pixel.
    sensor : {"LANDSAT_5", "LANDSAT_7", "LANDSAT_8", "LANDSAT_9"}
        The sensor, whose band names (:func:`sensor_band_names`) are looked up.
    product : {"toa", "sr"}
        ``"toa"``: the bands are TOA reflectance already. ``"sr"``: they are Level-2 digital numbers, scaled here
        to ``DN * SR_SCALE + SR_OFFSET`` clipped to [0, 1]; DN 0 is fill.
    crs : str, optional
        The grid's CRS; default the ``crs`` attr xee puts on every variable.
    source : str, optional
        Recorded in ``attrs["source"]``; default names Earth Engine and the collection.
    qa_band : str
        Name of the QA variable.

    Returns
    -------
    xarray.Dataset
        A valid cube with ``cloud_mask`` decoded from QA; pixels without data (masked, QA fill bit, or SR DN 0)
        are NaN in ``reflectance`` and have the fill bit set in ``qa_pixel``. They are False in ``cloud_mask``,
        except on Landsat 7 SLC-off dates, where they are the stripes and count as gaps to fill
        (:func:`cmsn_cube.qa.add_slc_off_gaps`). ``attrs["product"]`` records the product, the ``sensor(time)``
        and ``slc_off(time)`` coordinates the sensor and the SLC-off dates.

    Raises
    ------
    BandMismatchError
        A band of the sensor is missing (wrong ``sensor`` or ``product``?).
    DimensionError, TimeAxisError, MissingCRSError
        The dataset is not laid out as xee lays it out.
    RegionError
        Unknown sensor or product.
    """
    source_id = collection_id(sensor, product)
    ds = _normalise_dims(ds)
    arrays, qa = _band_variables(ds, sensor=sensor, product=product, qa_band=qa_band)
    ds, arrays, qa = _in_time_order(ds, arrays, qa)
    crs = crs or qa.attrs.get("crs") or arrays[0].attrs.get("crs")
    if not crs:
        raise MissingCRSError("the xee dataset names no CRS (no 'crs' attr); pass crs='EPSG:326NN'")
    reflectance, qa_words = _reflectance_and_qa(arrays, qa, product=product)
    cube = make_cube(
        reflectance,
        time=ds["time"].values.astype("datetime64[ns]"),
        y=ds["y"].values,
        x=ds["x"].values,
        crs=crs,
        sensor=sensor,
        qa_pixel=qa_words,
        source=source or f"Google Earth Engine {source_id} via xee",
        attrs={"collection_id": source_id, "reflectance": product.upper(), "product": product},
    )
    cube["reflectance"].attrs["long_name"] = PRODUCT_NAMES[product]
    return add_landsat_masks(cube)


def _normalise_dims(ds: xr.Dataset) -> xr.Dataset:
    """Rename the spatial dims older xee releases used to ``y``/``x``."""
    renames = {old: new for old, new in _DIM_ALIASES.items() if old in ds.dims and new not in ds.dims}
    return ds.rename(renames) if renames else ds


def _xee_variable(ds: xr.Dataset, names: Sequence[str]) -> xr.DataArray | None:
    """Return the first variable of ``ds`` named one of ``names`` (the band id, then the common name)."""
    for name in names:
        if name in ds.data_vars:
            return ds[name]
    return None


def _band_variables(
    ds: xr.Dataset, *, sensor: str, product: str, qa_band: str
) -> tuple[list[xr.DataArray], xr.DataArray]:
    """Return the reflectance variables in :data:`BANDS` order and the QA variable, each ``(time, y, x)``."""
    arrays = []
    for common, sensor_name in zip(BANDS, sensor_band_names(sensor, product), strict=True):
        array = _xee_variable(ds, (sensor_name, common))
        if array is None:
            raise BandMismatchError(
                f"the xee dataset has no band {sensor_name!r} ({common} of {sensor} {product}); it has"
                f" {sorted(map(str, ds.data_vars))} - are sensor and product right? (Landsat 5/7 TM/ETM+: B1-B4,"
                f" Landsat 8/9 OLI: B2-B5; surface reflectance: {SR_BAND_PREFIX}B*)"
            )
        arrays.append(array)
    qa = _xee_variable(ds, (qa_band, "qa_pixel"))
    if qa is None:
        raise BandMismatchError(f"the xee dataset has no {qa_band!r} band; it has {sorted(map(str, ds.data_vars))}")
    for array in (*arrays, qa):
        if set(array.dims) != {"time", "y", "x"}:
            raise DimensionError(
                f"xee variable {array.name!r} has dims {array.dims}; expected ('time', 'y', 'x') as xee 0.1.2 returns"
            )
    return arrays, qa


def _in_time_order(
    ds: xr.Dataset, arrays: list[xr.DataArray], qa: xr.DataArray
) -> tuple[xr.Dataset, list[xr.DataArray], xr.DataArray]:
    """Check that ``time`` is datetime64 and sort the dataset and its variables by it (lazily)."""
    if not np.issubdtype(ds["time"].dtype, np.datetime64):
        raise TimeAxisError(
            f"time is {ds['time'].dtype}, not datetime64: xee could not read system:time_start from the collection"
            " (every image needs it; build the collection with build_collection)"
        )
    if ds.indexes["time"].is_monotonic_increasing:
        return ds, arrays, qa
    ds = ds.sortby("time")  # lazy: a reordering index, no pixels read
    return ds, [ds[a.name] for a in arrays], ds[qa.name]


def _reflectance_and_qa(arrays: list[xr.DataArray], qa: xr.DataArray, *, product: str) -> tuple[Any, Any]:
    """Return ``(time, band, y, x)`` float32 reflectance and uint16 QA words, NaN and fill bit where no data."""
    # xee's encoding holds scale_factor = pixel size: rebuild from .data so no xee encoding reaches the store
    reflectance = xr.Variable.concat([a.transpose("time", "y", "x").variable for a in arrays], dim="band")
    reflectance = reflectance.transpose("time", "band", "y", "x").data.astype("float32")
    qa_values = qa.transpose("time", "y", "x").variable.data
    no_data = np.isnan(qa_values)
    # masked QA means no data: set the fill bit so decoding calls it fill, not clear
    qa_words = np.where(no_data, _FILL, np.nan_to_num(qa_values)).astype("uint16")
    if product == "sr":
        # DN 0 is Level-2 fill (SLC-off stripes among them) where Earth Engine did not mask it: not -0.2 clipped
        qa_words = np.where((reflectance == SR_FILL_DN).any(axis=1), qa_words | _FILL, qa_words)
        scaled = reflectance * np.float32(SR_SCALE) + np.float32(SR_OFFSET)
        reflectance = np.clip(scaled, np.float32(0), np.float32(1)).astype("float32")
    fill = (qa_words & _FILL) != 0
    reflectance = np.where(fill[:, None], np.float32("nan"), reflectance)
    return reflectance, qa_words
