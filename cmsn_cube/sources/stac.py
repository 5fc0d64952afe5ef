"""Landsat Collection 2 Level-2 from a STAC catalog, loaded lazily with odc-stac into the cube.

The flow is find items -> plan (choose acquisitions by ``eo:cloud_cover``) -> ``odc.stac.load`` -> cube::

    plan = plan_stac("https://planetarycomputer.microsoft.com/api/stac/v1", bbox=(114.17, 30.48, 114.33, 30.62),
                     start="2021-01-01", end="2021-12-31", levels=(0.25, 0.15, 0.10))
    print(plan.describe())                          # items chosen, dates, cloud %, grid
    cube = load_stac(plan, patch_url=planetary_computer.sign)   # lazy Dask arrays

    cube = open_stac(items, bbox=..., start=..., end=...)      # both steps at once

The catalog may be a STAC API URL (searched with ``pystac_client``), a static catalog (a ``catalog.json`` path or
URL, walked), a :class:`pystac.Catalog`, an :class:`pystac.ItemCollection` or a list of :class:`pystac.Item`;
only an API URL or a remote static catalog touches the network, and planning reads metadata only (no pixels).

What is read, from the Planetary Computer / USGS ``landsat-c2-l2`` collection: the assets ``blue``, ``green``,
``red``, ``nir08`` (surface reflectance, uint16, DN 0 = fill; reflectance = DN x 2.75e-5 - 0.2, USGS Collection 2
Level-2 Science Product Guide) and ``qa_pixel`` (the Collection 2 QA bits of :mod:`cmsn_cube.qa`); the item
properties ``datetime``, ``platform`` (``landsat-8`` or ``LANDSAT_8`` -> sensor ``LANDSAT_8``), ``eo:cloud_cover``
(percent of the scene) and the projection extension (native grid).

odc-stac, pystac and pystac-client are the ``stac`` extra (``pip install "cmsn-cube[stac]"``) and are imported
inside the functions that use them, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS, LANDSAT_SCALE_M, make_cube
from cmsn_cube.exceptions import (
    ArgumentError,
    BandMismatchError,
    CubeValidationError,
    MissingDateError,
    NoDataError,
    RegionError,
)
from cmsn_cube.extras import missing_message, require
from cmsn_cube.qa import QA_BITS, add_cloud_mask, add_slc_off_gaps, select_dates, slc_off_dates

# the Earth Engine source's offline helpers (no ee import at module level): same bbox/date checks, same UTM rule
from cmsn_cube.sources.earthengine import _STORE_BYTES_PER_PIXEL, BBox, _check_bbox, _iso_day, utm_crs

if TYPE_CHECKING:  # pragma: no cover
    import pystac

__all__ = [
    "DEFAULT_STAC_CHUNKS",
    "PRODUCTS",
    "StacAcquisition",
    "StacPlan",
    "StacProduct",
    "find_items",
    "load_stac",
    "missing_package_message",
    "open_stac",
    "plan_stac",
    "sensor_for_platform",
]


#: Default collection: Landsat Collection 2 Level-2 on the Planetary Computer (same id and asset keys at USGS).
DEFAULT_COLLECTION = "landsat-c2-l2"

#: Dask chunks of the loaded cube: one date, 512 x 512 pixels (the store's chunks on disk).
DEFAULT_STAC_CHUNKS: dict[str, int] = {"time": 1, "y": 512, "x": 512}


@dataclass(frozen=True)
class StacProduct:
    """How one product's STAC assets become reflectance.

    Attributes
    ----------
    assets : mapping
        Asset key of each common band of :data:`cmsn_cube.cube.BANDS`.
    qa_asset : str
        Asset key of the Collection 2 QA_PIXEL band.
    scale, offset : float
        Reflectance = DN x ``scale`` + ``offset``, clipped to [0, 1].
    nodata : int
        DN of fill pixels in the reflectance assets (NaN in the cube).
    qa_nodata : int
        QA word where no scene covers a pixel (the fill bit alone, as the Planetary Computer's metadata says).
    description : str
        What the product is (printed by the plan).
    """

    assets: Mapping[str, str]
    qa_asset: str
    scale: float
    offset: float
    nodata: int
    qa_nodata: int
    description: str

    @property
    def asset_keys(self) -> tuple[str, ...]:
        """Reflectance asset keys in :data:`BANDS` order, then the QA asset."""
        return tuple(self.assets[band] for band in BANDS) + (self.qa_asset,)


#: Products this reader knows. Source: Planetary Computer ``landsat-c2-l2`` item assets and the USGS Landsat
#: Collection 2 Level-2 Science Product Guide (SR scale 2.75e-5, offset -0.2, fill 0; QA_PIXEL fill = bit 0).
PRODUCTS: dict[str, StacProduct] = {
    "sr": StacProduct(
        assets={"blue": "blue", "green": "green", "red": "red", "nir": "nir08"},
        qa_asset="qa_pixel",
        scale=2.75e-5,
        offset=-0.2,
        nodata=0,
        qa_nodata=1 << QA_BITS["fill"],
        description="Collection 2 Level-2 surface reflectance",
    )
}


# ------------------------------------------------------------------------------------------ optional imports


def missing_package_message(package: str) -> str:
    """The message of the ImportError raised when a package of the ``stac`` extra is missing."""
    return missing_message(package, "stac")


def _import(module: str, package: str) -> Any:
    """Import ``module`` of the ``stac`` extra, or raise an ImportError that names the extra."""
    return require(module, "stac", package=package)


# ----------------------------------------------------------------------------------------------- sensors


def sensor_for_platform(platform: str | None, *, item_id: str = "") -> str:
    """The cube's sensor name for a STAC ``platform`` (``landsat-8``, ``LANDSAT_8`` -> ``LANDSAT_8``).

    Examples
    --------
    >>> sensor_for_platform("landsat-9"), sensor_for_platform("LANDSAT_7"), sensor_for_platform("Landsat 5")
    ('LANDSAT_9', 'LANDSAT_7', 'LANDSAT_5')
    """
    match = re.fullmatch(r"landsat[-_ ]?(\d)", str(platform or "").strip().lower())
    if match is None:
        where = f" of item {item_id}" if item_id else ""
        raise CubeValidationError(
            f"platform {platform!r}{where} is not a Landsat (expected landsat-5, landsat-7, landsat-8 or landsat-9)"
        )
    return f"LANDSAT_{match.group(1)}"


# ------------------------------------------------------------------------------------------ finding items


def _is_url(value: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*://", value, flags=re.IGNORECASE) is not None


def _describe_source(catalog: Any) -> str:
    if isinstance(catalog, (str, os.PathLike)):
        return str(catalog)
    if isinstance(catalog, Sequence) or type(catalog).__name__ == "ItemCollection":
        return f"{len(list(catalog))} STAC items given"
    return f"{type(catalog).__name__} {getattr(catalog, 'id', '')}".strip()


def _search_or_walk(catalog: Any, *, collection: str, bbox: BBox, start: str, end: str) -> list[pystac.Item]:
    """Items of ``catalog``: an API search where the catalog offers one, else every item (filtered later)."""
    pystac = _import("pystac", "pystac")
    if isinstance(catalog, pystac.Item):
        return [catalog]
    if isinstance(catalog, pystac.ItemCollection):
        return list(catalog)
    if isinstance(catalog, Sequence) and not isinstance(catalog, str):
        items = list(catalog)
        wrong = [type(item).__name__ for item in items if not isinstance(item, pystac.Item)]
        if wrong:
            raise ArgumentError(f"catalog list must hold pystac.Item objects, found {sorted(set(wrong))}")
        return items
    if isinstance(catalog, pystac.Catalog) and not type(catalog).__module__.startswith("pystac_client"):
        return list(catalog.get_items(recursive=True))
    if not isinstance(catalog, (str, os.PathLike)) and type(catalog).__module__.startswith("pystac_client"):
        client = catalog
    elif isinstance(catalog, (str, os.PathLike)):
        where = str(catalog)
        if not _is_url(where) and not Path(where).exists():
            raise ArgumentError(f"no STAC catalog at {where}: give an API URL, a catalog.json path or pystac items")
        pystac_client = _import("pystac_client", "pystac-client")
        with warnings.catch_warnings():
            # a static catalog advertises no conformance classes: that is expected, it is walked below
            warnings.simplefilter("ignore", getattr(pystac_client.warnings, "NoConformsTo", UserWarning))
            try:
                client = pystac_client.Client.open(where)
            except Exception as error:  # requests, JSON and STAC errors alike: one line with the address
                raise ArgumentError(f"cannot open the STAC catalog {where}: {type(error).__name__}: {error}") from None
    else:
        raise ArgumentError(
            f"catalog must be a STAC API URL, a catalog.json path, a pystac Catalog/ItemCollection or a list of "
            f"pystac.Item, got {type(catalog).__name__}"
        )
    from pystac_client import ConformanceClasses

    if client.conforms_to(ConformanceClasses.ITEM_SEARCH):
        # the window's end day is included: pystac-client expands a bare end date to its last second
        search = client.search(collections=[collection], bbox=list(bbox), datetime=f"{start}/{end}")
        return list(search.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FallbackToPystac: a static catalog has no /search, walking it is the way
        return list(client.get_items(recursive=True))


def _item_time(item: pystac.Item) -> dt.datetime:
    """The item's acquisition time as a naive UTC datetime (odc-stac's time coordinate is naive UTC)."""
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        raise CubeValidationError(f"STAC item {item.id} has no datetime (nor start_datetime)")
    return when.astimezone(dt.UTC).replace(tzinfo=None) if when.tzinfo else when


def _item_day(item: pystac.Item) -> str:
    return _item_time(item).date().isoformat()


def _intersects(item: pystac.Item, bbox: BBox) -> bool:
    box = item.bbox
    if not box and item.geometry:
        import shapely.geometry

        box = list(shapely.geometry.shape(item.geometry).bounds)
    if not box:
        return True  # no footprint to test: odc-stac's load leaves it out if it does not cover the grid
    west, south, east, north = box[0], box[1], box[-2], box[-1]
    return not (east < bbox[0] or west > bbox[2] or north < bbox[1] or south > bbox[3])


def _cloud_cover(item: pystac.Item) -> float:
    """``eo:cloud_cover`` as a fraction (NaN when the item does not say)."""
    value = item.properties.get("eo:cloud_cover")
    return float(value) / 100.0 if value is not None else float("nan")


def find_items(
    catalog: Any,
    *,
    bbox: Sequence[float],
    start: str | dt.date,
    end: str | dt.date,
    collection: str = DEFAULT_COLLECTION,
    max_cloud: float | None = None,
) -> list[pystac.Item]:
    """The STAC items of ``collection`` over ``bbox`` in the window, at most ``max_cloud`` cloudy.

    Parameters
    ----------
    catalog : str, path, pystac.Catalog, pystac.ItemCollection or list of pystac.Item
        A STAC API URL (searched), a static catalog path or URL (walked), or items already in hand.
    bbox : sequence of float
        ``(west, south, east, north)`` in degrees; items whose ``bbox`` does not intersect it are left out.
    start, end : str or datetime.date
        First and last day (UTC), both included.
    collection : str
        Collection id; items that name another collection are left out.
    max_cloud : float, optional
        Leave out items whose ``eo:cloud_cover`` is above this fraction (0-1); items without one, too.

    Returns
    -------
    list of pystac.Item
        Sorted by time.

    Raises
    ------
    NoDataError
        No item fits; the message says which filter left none.
    RegionError, ArgumentError
        A bad bbox, window or ``max_cloud``; a catalog that cannot be opened.
    """
    box = _check_bbox(bbox)
    start_day, end_day = _iso_day(start, "start"), _iso_day(end, "end")
    if end_day < start_day:
        raise RegionError(f"end {end_day} comes before start {start_day}")
    if max_cloud is not None and not 0.0 <= max_cloud <= 1.0:
        hint = f" (did you mean {max_cloud / 100:g}?)" if 1 < max_cloud <= 100 else ""
        raise ArgumentError(f"max_cloud is a fraction in [0, 1] (eo:cloud_cover / 100), got {max_cloud:g}{hint}")
    items = _search_or_walk(catalog, collection=collection, bbox=box, start=start_day, end=end_day)
    where = _describe_source(catalog)
    if not items:
        raise NoDataError(f"no STAC items of {collection} in {where} for bbox {box} and {start_day} .. {end_day}")
    found = len(items)
    of_collection = [item for item in items if item.collection_id in (None, collection)]
    if not of_collection:
        others = sorted({str(item.collection_id) for item in items})
        raise NoDataError(
            f"none of the {found} STAC items in {where} is of collection {collection!r}; they are of {others}"
        )
    in_window = [item for item in of_collection if start_day <= _item_day(item) <= end_day]
    in_bbox = [item for item in in_window if _intersects(item, box)]
    if not in_bbox:
        days = sorted({_item_day(item) for item in of_collection})
        raise NoDataError(
            f"no STAC item of {collection} in {where} intersects bbox {box} between {start_day} and {end_day} "
            f"({len(of_collection)} items of the collection, {len(in_window)} in the window; their days run "
            f"{days[0]} .. {days[-1]})"
        )
    kept = in_bbox
    if max_cloud is not None:
        kept = [item for item in in_bbox if _cloud_cover(item) <= max_cloud]
        if not kept:
            covers = sorted(round(100 * _cloud_cover(item), 1) for item in in_bbox)
            raise NoDataError(
                f"all {len(in_bbox)} STAC items over the bbox in the window are cloudier than max_cloud "
                f"{100 * max_cloud:g} % (eo:cloud_cover {covers} %); raise max_cloud or widen the window"
            )
    return sorted(kept, key=lambda item: (_item_time(item), item.id))


# ------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class StacAcquisition:
    """One date of the cube: the items of one platform on one solar day (mosaicked by odc-stac).

    Attributes
    ----------
    time : numpy.datetime64
        The first item's acquisition time (UTC): the cube's ``time``.
    day : str
        Solar day at the bbox centre (ISO date).
    sensor : str
        ``LANDSAT_5`` ... ``LANDSAT_9`` from the items' ``platform``.
    cloud_cover : float
        Mean ``eo:cloud_cover`` of the items, as a fraction (NaN: unknown).
    item_ids : tuple of str
        The items.
    """

    time: np.datetime64
    day: str
    sensor: str
    cloud_cover: float
    item_ids: tuple[str, ...]

    @property
    def utc_day(self) -> str:
        """The UTC day of :attr:`time`."""
        return str(self.time.astype("datetime64[D]"))


def _acquisitions(items: Sequence[pystac.Item], lon: float) -> list[StacAcquisition]:
    """Group items by (solar day at ``lon``, sensor): the scenes one satellite took along its path that day."""
    groups: dict[tuple[str, str], list[pystac.Item]] = {}
    for item in items:
        when = _item_time(item)
        # the local solar day, as odc-stac's groupby="solar_day": no midnight-UTC split of one overpass
        solar_day = (when + dt.timedelta(hours=lon / 15.0)).date().isoformat()
        sensor = sensor_for_platform(item.properties.get("platform"), item_id=item.id)
        groups.setdefault((solar_day, sensor), []).append(item)
    out = []
    for (day, sensor), members in groups.items():
        times = [_item_time(item) for item in members]
        covers = np.array([_cloud_cover(item) for item in members])
        out.append(
            StacAcquisition(
                time=np.datetime64(min(times), "ns"),
                day=day,
                sensor=sensor,
                cloud_cover=float(np.nanmean(covers)) if np.isfinite(covers).any() else float("nan"),
                item_ids=tuple(item.id for _, item in sorted(zip(times, members, strict=True), key=_by_time_id)),
            )
        )
    return sorted(out, key=lambda a: a.time)


def _by_time_id(pair: tuple[dt.datetime, pystac.Item]) -> tuple[dt.datetime, str]:
    return pair[0], pair[1].id


def _choose(
    acquisitions: Sequence[StacAcquisition],
    *,
    levels: Sequence[float] | None,
    n_dates: int | None,
    dates: Sequence[str | dt.date] | None,
) -> list[StacAcquisition]:
    """The acquisitions to keep, in time order (see :func:`plan_stac`)."""
    given = [name for name, value in (("levels", levels), ("n_dates", n_dates), ("dates", dates)) if value]
    if len(given) > 1:
        raise ArgumentError(f"give at most one of levels, n_dates and dates, got {given}")
    if dates:
        wanted = [_iso_day(d, "dates") for d in dates]
        missing = [d for d in wanted if not any(d in (a.day, a.utc_day) for a in acquisitions)]
        if missing:
            available = ", ".join(a.day for a in acquisitions)
            raise MissingDateError(f"no acquisition on {', '.join(missing)}; the window has {available}")
        return [a for a in acquisitions if a.day in wanted or a.utc_day in wanted]
    if levels:
        # the Earth Engine source's rule (cmsn_cube.qa.select_dates), on the scenes' own cloud cover
        fractions = xr.DataArray(np.array([a.cloud_cover for a in acquisitions], dtype="float64"), dims="time")
        return [acquisitions[i] for i in select_dates(fractions, levels)]
    if n_dates:
        known = [a for a in acquisitions if np.isfinite(a.cloud_cover)]
        if len(known) < n_dates:
            raise NoDataError(
                f"{n_dates} dates requested but only {len(known)} acquisitions (with eo:cloud_cover) fit the window"
            )
        clearest = sorted(known, key=lambda a: (a.cloud_cover, a.time))[:n_dates]
        return sorted(clearest, key=lambda a: a.time)
    return list(acquisitions)


@dataclass(frozen=True)
class StacPlan:
    """Everything a STAC load will read, worked out from metadata alone.

    Attributes
    ----------
    source : str
        The catalog (URL, path) or what was given.
    collection : str
        Collection id.
    product : str
        Key of :data:`PRODUCTS`.
    assets : tuple of str
        Asset keys read, in :data:`BANDS` order, then the QA asset.
    bbox : tuple of float
        ``(west, south, east, north)`` in degrees.
    start, end : str
        The window (UTC days, both included).
    max_cloud : float or None
        Items above this ``eo:cloud_cover`` fraction were left out.
    n_items : int
        Items found over the bbox in the window (after ``max_cloud``).
    selection : str
        How dates were chosen (``cloud levels 0.25, 0.15, 0.1``, ``3 clearest``, ``dates ...``, ``all dates``).
    acquisitions : tuple of StacAcquisition
        Every acquisition found (after ``max_cloud``).
    chosen : tuple of StacAcquisition
        The ones the cube holds, in time order.
    crs : str
        The grid's CRS (the items' own where they agree).
    resolution : float
        Pixel size in CRS units.
    transform : tuple of float
        Affine transform of the grid (GDAL/rasterio order ``a, b, c, d, e, f``).
    shape : tuple of int
        ``(height, width)`` in pixels.
    """

    source: str
    collection: str
    product: str
    assets: tuple[str, ...]
    bbox: BBox
    start: str
    end: str
    max_cloud: float | None
    n_items: int
    selection: str
    acquisitions: tuple[StacAcquisition, ...]
    chosen: tuple[StacAcquisition, ...]
    crs: str
    resolution: float
    transform: tuple[float, ...]
    shape: tuple[int, int]
    items: tuple[pystac.Item, ...] = field(default=(), repr=False, compare=False)
    geobox: Any = field(default=None, repr=False, compare=False)

    @property
    def pixel_count(self) -> int:
        """Pixels per date and band."""
        return self.shape[0] * self.shape[1]

    @property
    def expected_store_mb(self) -> float:
        """Store size for the chosen dates, uncompressed."""
        return len(self.chosen) * self.pixel_count * _STORE_BYTES_PER_PIXEL / 2**20

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-able data (items and geobox left out)."""

        def acquisition(a: StacAcquisition) -> dict[str, Any]:
            cover = None if np.isnan(a.cloud_cover) else round(a.cloud_cover, 4)
            return {
                "time": str(a.time),
                "day": a.day,
                "sensor": a.sensor,
                "cloud_cover": cover,
                "items": list(a.item_ids),
            }

        return {
            "source": self.source,
            "collection": self.collection,
            "product": self.product,
            "assets": list(self.assets),
            "bbox": list(self.bbox),
            "start": self.start,
            "end": self.end,
            "max_cloud": self.max_cloud,
            "n_items": self.n_items,
            "selection": self.selection,
            "acquisitions": [acquisition(a) for a in self.acquisitions],
            "chosen": [acquisition(a) for a in self.chosen],
            "crs": self.crs,
            "resolution": self.resolution,
            "transform": list(self.transform),
            "shape": list(self.shape),
            "pixel_count": self.pixel_count,
            "expected_store_mb": round(self.expected_store_mb, 2),
        }

    def describe(self) -> str:
        """A human-readable summary (what ``cmsn-cube pull --stac ... --dry-run`` prints)."""
        height, width = self.shape
        west, south, east, north = self.bbox
        product = PRODUCTS[self.product]
        limit = f", max cloud {100 * self.max_cloud:g} %" if self.max_cloud is not None else ""
        lines = [
            f"source      {self.source}",
            f"collection  {self.collection}, {product.description} ({self.product})",
            f"assets      {', '.join(self.assets)} -> reflectance {', '.join(BANDS)} + qa_pixel",
            f"dates       {self.start} .. {self.end}: {self.n_items} items, {len(self.acquisitions)} acquisitions"
            f"{limit}; keep {self.selection}",
        ]
        for i, a in enumerate(self.chosen):
            cover = "   n/a" if np.isnan(a.cloud_cover) else f"{100 * a.cloud_cover:5.1f} %"
            lines.append(f"{'chosen' if i == 0 else '':<12}{a.day}  {a.sensor}  cloud {cover}  {', '.join(a.item_ids)}")
        lines += [
            f"bbox        W {west} S {south} E {east} N {north}",
            f"crs         {self.crs}, {self.resolution:g} m, transform {tuple(round(v, 3) for v in self.transform)}",
            f"grid        {width} x {height} px = {self.pixel_count:,} px per date and band",
            f"store       ~{self.expected_store_mb:.1f} MB uncompressed for {len(self.chosen)} dates",
        ]
        return "\n".join(lines)


def _stac_cfg(product: StacProduct, assets: Sequence[str]) -> dict[str, Any]:
    """odc-stac's per-asset defaults where items carry no ``raster:bands`` (item metadata wins where present)."""
    return {
        "*": {
            "assets": {
                **{key: {"data_type": "uint16", "nodata": product.nodata} for key in assets[:-1]},
                # QA's no-data is the fill bit, so decoding calls pixels outside every scene fill, not clear
                assets[-1]: {"data_type": "uint16", "nodata": product.qa_nodata},
            },
            "warnings": "ignore",
        }
    }


def _check_assets(items: Sequence[pystac.Item], assets: Sequence[str], collection: str) -> None:
    for item in items:
        missing = [key for key in assets if key not in item.assets]
        if missing:
            raise BandMismatchError(
                f"STAC item {item.id} of {collection} has no asset(s) {missing}; it has {sorted(item.assets)}. "
                f"This reader expects the landsat-c2-l2 keys {list(assets)} (Planetary Computer, USGS): "
                "for a collection named otherwise pass assets={'blue': ..., 'green': ..., 'red': ..., 'nir': ..., "
                "'qa_pixel': ...}"
            )


@contextlib.contextmanager
def _quiet_odc() -> Iterator[None]:
    """Silence the deprecations odc-geo triggers in shapely (``shapely.ops.transform``): not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"odc\.")
        yield


def _grid(
    items: Sequence[pystac.Item],
    assets: Sequence[str],
    cfg: Mapping[str, Any],
    *,
    bbox: BBox,
    crs: str | None,
    resolution: float,
) -> Any:
    """The output GeoBox: the bbox at ``resolution`` in ``crs``; the items' own CRS and pixel alignment by default."""
    odc_stac = _import("odc.stac", "odc-stac")
    with _quiet_odc():
        parsed = list(odc_stac.parse_items(items, cfg=cfg))
        native = odc_stac.output_geobox(parsed, bands=list(assets))  # the items' most common grid, or None
        if crs is None:
            crs = str(native.crs) if native is not None else utm_crs((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
        grid = odc_stac.output_geobox(parsed, bands=list(assets), crs=crs, resolution=resolution, bbox=tuple(bbox))
        if native is not None and native.crs == crs and np.isclose(abs(native.resolution.x), resolution):
            # keep the scenes' pixel edges (Landsat's sit at 15 m offsets): no sub-pixel resampling
            grid = snap_to_grid(grid, native)
        return grid


def snap_to_grid(grid: Any, reference: Any) -> Any:
    """``grid`` (an odc-geo GeoBox) moved by less than half a pixel so its pixel edges fall on ``reference``'s.

    Done on the transforms, not with odc-geo's ``anchor`` (whose value read from one GeoBox and passed to
    ``output_geobox`` moved edges off by a third of a pixel for a 5 m offset).

    Examples
    --------
    >>> from odc.geo.geobox import GeoBox
    >>> from affine import Affine
    >>> native = GeoBox((10, 10), Affine(30, 0, 500005, 0, -30, 100025), "EPSG:32650")
    >>> snapped = snap_to_grid(GeoBox((4, 4), Affine(30, 0, 500090, 0, -30, 99990), "EPSG:32650"), native)
    >>> snapped.transform.c, snapped.transform.f
    (500095.0, 99995.0)
    """
    from affine import Affine
    from odc.geo.geobox import GeoBox

    def shift(origin: float, target: float, step: float) -> float:
        offset = (target - origin) % abs(step)
        return offset - abs(step) if offset > abs(step) / 2 else offset

    t, r = grid.transform, reference.transform
    moved = Affine(t.a, t.b, t.c + shift(t.c, r.c, t.a), t.d, t.e, t.f + shift(t.f, r.f, t.e))
    return GeoBox(grid.shape, moved, grid.crs)


def _product(product: str, assets: Mapping[str, str] | Sequence[str] | None = None) -> StacProduct:
    """The product's spec, with its asset keys replaced by ``assets`` (a mapping, or keys in plan order)."""
    if product not in PRODUCTS:
        raise ArgumentError(
            f"unknown STAC product {product!r}; choose from {sorted(PRODUCTS)} (landsat-c2-l2 is Level-2 surface "
            "reflectance; TOA reflectance comes from Earth Engine)"
        )
    spec = PRODUCTS[product]
    if assets is None:
        return spec
    if not isinstance(assets, Mapping):
        assets = dict(zip([*BANDS, "qa_pixel"], assets, strict=True))
    expected = sorted([*BANDS, "qa_pixel"])
    if sorted(assets) != expected:
        raise ArgumentError(f"assets must map each of {expected} to an asset key, got {dict(assets)}")
    return StacProduct(
        assets={band: assets[band] for band in BANDS},
        qa_asset=assets["qa_pixel"],
        scale=spec.scale,
        offset=spec.offset,
        nodata=spec.nodata,
        qa_nodata=spec.qa_nodata,
        description=spec.description,
    )


def plan_stac(
    catalog: Any,
    *,
    bbox: Sequence[float],
    start: str | dt.date,
    end: str | dt.date,
    collection: str = DEFAULT_COLLECTION,
    product: str = "sr",
    assets: Mapping[str, str] | None = None,
    max_cloud: float | None = None,
    levels: Sequence[float] | None = None,
    n_dates: int | None = None,
    dates: Sequence[str | dt.date] | None = None,
    crs: str | None = None,
    resolution: float = LANDSAT_SCALE_M,
) -> StacPlan:
    """Find the items, choose the dates by scene cloud cover and fix the grid; reads metadata only.

    Parameters
    ----------
    catalog : str, path, pystac.Catalog, pystac.ItemCollection or list of pystac.Item
        Where the items are (see :func:`find_items`); a local catalog or items in hand need no network.
    bbox : sequence of float
        ``(west, south, east, north)`` in degrees; the grid covers it.
    start, end : str or datetime.date
        First and last day (UTC), both included.
    collection : str
        STAC collection id (default the Planetary Computer/USGS ``landsat-c2-l2``).
    product : str
        Key of :data:`PRODUCTS` (``"sr"``: surface reflectance, DN x 2.75e-5 - 0.2).
    assets : mapping, optional
        Asset keys for ``blue``, ``green``, ``red``, ``nir`` and ``qa_pixel`` where the collection names them
        otherwise than the product (default ``blue, green, red, nir08, qa_pixel``).
    max_cloud : float, optional
        Leave out items whose ``eo:cloud_cover`` is above this fraction (0-1).
    levels : sequence of float, optional
        Keep one date per target cloud fraction, the one whose scene cloud cover is nearest (the Earth Engine
        source's rule, :func:`cmsn_cube.qa.select_dates`), e.g. ``(0.25, 0.15, 0.10)``.
    n_dates : int, optional
        Keep the ``n_dates`` clearest dates instead.
    dates : sequence of str, optional
        Keep exactly these days (solar or UTC day of the acquisition) instead.
    crs : str, optional
        Grid CRS; default the items' own (their ``proj:code``/``proj:epsg``), else the bbox centre's UTM zone.
    resolution : float
        Pixel size in CRS units (30 m).

    Returns
    -------
    StacPlan
        Without ``levels``, ``n_dates`` or ``dates`` every acquisition is kept.

    Raises
    ------
    NoDataError
        No item in the bbox and window (or none clear enough); fewer dates than asked for.
    BandMismatchError
        The items lack the product's asset keys.
    MissingDateError
        A requested day has no acquisition.
    ArgumentError, RegionError, CubeValidationError
        A bad argument; an item whose platform is not a Landsat.
    """
    spec = _product(product, assets)
    if n_dates is not None and n_dates < 1:
        raise ArgumentError(f"n_dates must be >= 1, got {n_dates}")
    if resolution <= 0:
        raise ArgumentError(f"resolution must be > 0, got {resolution}")
    box = _check_bbox(bbox)
    items = find_items(catalog, bbox=box, start=start, end=end, collection=collection, max_cloud=max_cloud)
    keys = spec.asset_keys
    _check_assets(items, keys, collection)
    found = _acquisitions(items, lon=(box[0] + box[2]) / 2)
    chosen = _choose(found, levels=levels, n_dates=n_dates, dates=dates)
    chosen_ids = {item_id for a in chosen for item_id in a.item_ids}
    chosen_items = tuple(item for item in items if item.id in chosen_ids)
    geobox = _grid(chosen_items, keys, _stac_cfg(spec, keys), bbox=box, crs=crs, resolution=float(resolution))
    if levels:
        selection = f"cloud levels {', '.join(f'{v:g}' for v in levels)}"
    elif n_dates:
        selection = f"the {n_dates} clearest dates"
    elif dates:
        selection = f"dates {', '.join(_iso_day(d, 'dates') for d in dates)}"
    else:
        selection = "all dates"
    crs_name = geobox.crs.epsg
    return StacPlan(
        source=_describe_source(catalog),
        collection=collection,
        product=product,
        assets=keys,
        bbox=box,
        start=_iso_day(start, "start"),
        end=_iso_day(end, "end"),
        max_cloud=max_cloud,
        n_items=len(items),
        selection=selection,
        acquisitions=tuple(found),
        chosen=tuple(chosen),
        crs=f"EPSG:{crs_name}" if crs_name else geobox.crs.to_wkt(),
        resolution=float(resolution),
        transform=tuple(float(v) for v in tuple(geobox.affine)[:6]),
        shape=(int(geobox.shape.y), int(geobox.shape.x)),
        items=chosen_items,
        geobox=geobox,
    )


# ------------------------------------------------------------------------------------------------- the load


def _group_key(keys: Sequence[np.datetime64], item: Any, parsed: Any, idx: int) -> np.datetime64:
    """odc-stac groupby callback: the acquisition (its time) each item belongs to."""
    return keys[idx]


def load_stac(
    plan: StacPlan,
    *,
    chunks: Mapping[str, int] | None = None,
    patch_url: Callable[[str], str] | None = None,
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

    Returns
    -------
    xarray.Dataset
        A valid cube, lazy: ``reflectance`` float32 in [0, 1] (DN x scale + offset, clipped; fill DN or QA fill
        bit -> NaN), ``qa_pixel`` uint16 as stored, ``cloud_mask`` decoded by :func:`cmsn_cube.qa.add_cloud_mask`,
        ``sensor(time)`` from ``platform``, ``cloud_cover(time)`` the scenes' ``eo:cloud_cover`` (0-1),
        ``slc_off(time)`` the Landsat 7 SLC-off dates, whose stripes are in ``cloud_mask``
        (:func:`cmsn_cube.qa.add_slc_off_gaps`).
    """
    odc_stac = _import("odc.stac", "odc-stac")
    spec = _product(plan.product, plan.assets)
    keys = spec.asset_keys
    items = list(plan.items)
    if not items or plan.geobox is None:
        raise NoDataError("the plan holds no items to load; build it with plan_stac(...)")
    by_id = {item_id: a.time for a in plan.chosen for item_id in a.item_ids}
    group_of = [by_id[item.id] for item in items]
    with _quiet_odc():
        ds = odc_stac.load(
            items,
            bands=list(keys),
            geobox=plan.geobox,
            groupby=functools.partial(_group_key, group_of),
            chunks=dict(chunks or DEFAULT_STAC_CHUNKS),
            resampling="nearest",  # QA bits must not be interpolated; reflectance keeps its own values
            stac_cfg=_stac_cfg(spec, keys),
            patch_url=patch_url,
            fail_on_error=True,
        )
    renames = {old: new for old, new in (("latitude", "y"), ("longitude", "x")) if old in ds.dims}
    ds = ds.rename(renames) if renames else ds
    times = ds["time"].values.astype("datetime64[ns]")
    expected = np.array([a.time for a in plan.chosen], dtype="datetime64[ns]")
    if times.shape != expected.shape or (times != expected).any():
        raise CubeValidationError(f"odc-stac returned times {times} for the planned acquisitions {expected}")

    qa = ds[spec.qa_asset].transpose("time", "y", "x").data.astype("uint16")
    dn = xr.concat([ds[spec.assets[band]] for band in BANDS], dim="band").transpose("time", "band", "y", "x")
    dn = dn.chunk({"band": -1})  # the four bands of a pixel block in one chunk, as the store keeps them
    fill = (qa & np.uint16(1 << QA_BITS["fill"])) != 0
    missing = (dn.data == spec.nodata) | fill[:, None]
    # float64 for the affine step so DN x 2.75e-5 - 0.2 is exact before the float32 cast
    values = np.clip(dn.data.astype("float64") * spec.scale + spec.offset, 0.0, 1.0)
    reflectance = np.where(missing, np.nan, values).astype("float32")

    cube = make_cube(
        reflectance,
        time=times,
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
    cube = cube.assign_coords(slc_off=slc_off_dates(cube))
    return add_slc_off_gaps(add_cloud_mask(cube))


def open_stac(
    catalog: Any,
    *,
    bbox: Sequence[float],
    start: str | dt.date,
    end: str | dt.date,
    collection: str = DEFAULT_COLLECTION,
    product: str = "sr",
    assets: Mapping[str, str] | None = None,
    max_cloud: float | None = None,
    levels: Sequence[float] | None = None,
    n_dates: int | None = None,
    dates: Sequence[str | dt.date] | None = None,
    chunks: Mapping[str, int] | None = None,
    crs: str | None = None,
    resolution: float = LANDSAT_SCALE_M,
    patch_url: Callable[[str], str] | None = None,
) -> xr.Dataset:
    """Landsat Collection 2 Level-2 of a STAC catalog as a lazy cube: :func:`plan_stac` then :func:`load_stac`.

    Parameters are those of :func:`plan_stac` (what to find, which dates, which grid) and of :func:`load_stac`
    (``chunks``, ``patch_url``).

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
    plan = plan_stac(
        catalog,
        bbox=bbox,
        start=start,
        end=end,
        collection=collection,
        product=product,
        assets=assets,
        max_cloud=max_cloud,
        levels=levels,
        n_dates=n_dates,
        dates=dates,
        crs=crs,
        resolution=resolution,
    )
    return load_stac(plan, chunks=chunks, patch_url=patch_url)
