"""The STAC plan, from metadata alone: acquisitions of the items found, the dates to keep, the grid to load on."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from cmsn_cube.cube import BANDS, LANDSAT_SCALE_M
from cmsn_cube.exceptions import ArgumentError, MissingDateError, NoDataError
from cmsn_cube.qa import select_dates
from cmsn_cube.sources._common import STORE_BYTES_PER_PIXEL, BBox, check_bbox, iso_day
from cmsn_cube.sources.stac.grid import output_grid
from cmsn_cube.sources.stac.products import DEFAULT_COLLECTION, PRODUCTS, check_assets, product_spec
from cmsn_cube.sources.stac.search import (
    DEFAULT_TIMEOUT_S,
    cloud_cover,
    describe_source,
    find_items,
    item_time,
    sensor_for_platform,
)

if TYPE_CHECKING:  # pragma: no cover
    import pystac


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


def group_acquisitions(items: Sequence[pystac.Item], lon: float) -> list[StacAcquisition]:
    """Group items by (solar day at ``lon``, sensor): the scenes one satellite took along its path that day."""
    groups: dict[tuple[str, str], list[pystac.Item]] = {}
    for item in items:
        when = item_time(item)
        # the local solar day, as odc-stac's groupby="solar_day": no midnight-UTC split of one overpass
        solar_day = (when + dt.timedelta(hours=lon / 15.0)).date().isoformat()
        sensor = sensor_for_platform(item.properties.get("platform"), item_id=item.id)
        groups.setdefault((solar_day, sensor), []).append(item)
    out = []
    for (day, sensor), members in groups.items():
        times = [item_time(item) for item in members]
        covers = np.array([cloud_cover(item) for item in members])
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
    """Sort key of ``(time, item)`` pairs: time, then item id."""
    return pair[0], pair[1].id


def choose_acquisitions(
    found: Sequence[StacAcquisition],
    *,
    levels: Sequence[float] | None,
    n_dates: int | None,
    dates: Sequence[str | dt.date] | None,
) -> list[StacAcquisition]:
    """Choose the acquisitions to keep, in time order (see :func:`plan_stac`)."""
    given = [name for name, value in (("levels", levels), ("n_dates", n_dates), ("dates", dates)) if value]
    if len(given) > 1:
        raise ArgumentError(f"give at most one of levels, n_dates and dates, got {given}")
    if dates:
        wanted = [iso_day(d, "dates") for d in dates]
        missing = [d for d in wanted if not any(d in (a.day, a.utc_day) for a in found)]
        if missing:
            available = ", ".join(a.day for a in found)
            raise MissingDateError(f"no acquisition on {', '.join(missing)}; the window has {available}")
        return [a for a in found if a.day in wanted or a.utc_day in wanted]
    if levels:
        # the Earth Engine source's rule (cmsn_cube.qa.select_dates), on the scenes' own cloud cover
        fractions = xr.DataArray(np.array([a.cloud_cover for a in found], dtype="float64"), dims="time")
        return [found[i] for i in select_dates(fractions, levels)]
    if n_dates:
        known = [a for a in found if np.isfinite(a.cloud_cover)]
        if len(known) < n_dates:
            raise NoDataError(
                f"{n_dates} dates requested but only {len(known)} acquisitions (with eo:cloud_cover) fit the window"
            )
        clearest = sorted(known, key=lambda a: (a.cloud_cover, a.time))[:n_dates]
        return sorted(clearest, key=lambda a: a.time)
    return list(found)


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
        return len(self.chosen) * self.pixel_count * STORE_BYTES_PER_PIXEL / 2**20

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as plain JSON-able data (items and geobox left out)."""

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
        """Return a human-readable summary (what ``cmsn-cube pull --stac ... --dry-run`` prints)."""
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
    timeout: float = DEFAULT_TIMEOUT_S,
) -> StacPlan:
    """Find the items, choose the dates by scene cloud cover and fix the grid; reads metadata only.

    Parameters
    ----------
    catalog, bbox, start, end, collection, max_cloud, timeout
        What to find, as :func:`find_items` takes them (a local catalog or items in hand need no network; the
        default collection is the Planetary Computer/USGS ``landsat-c2-l2``); the grid covers ``bbox``.
    product : str
        Key of :data:`PRODUCTS` (``"sr"``: surface reflectance, DN x 2.75e-5 - 0.2).
    assets : mapping, optional
        Asset keys for ``blue``, ``green``, ``red``, ``nir`` and ``qa_pixel`` where the collection names them
        otherwise than the product (default ``blue, green, red, nir08, qa_pixel``).
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
    BandMismatchError, MissingDateError
        The items lack the product's asset keys; a requested day has no acquisition.
    ArgumentError, RegionError, CubeValidationError
        A bad argument; an item whose platform is not a Landsat.
    """
    spec = product_spec(product, assets)
    _check_counts(n_dates=n_dates, resolution=resolution)
    box = check_bbox(bbox)
    items = find_items(
        catalog, bbox=box, start=start, end=end, collection=collection, max_cloud=max_cloud, timeout=timeout
    )
    check_assets(items, spec, collection)
    found = group_acquisitions(items, lon=(box[0] + box[2]) / 2)
    chosen = choose_acquisitions(found, levels=levels, n_dates=n_dates, dates=dates)
    chosen_items = _items_of(chosen, items)
    geobox = output_grid(chosen_items, spec, bbox=box, crs=crs, resolution=float(resolution))
    return StacPlan(
        source=describe_source(catalog),
        collection=collection,
        product=product,
        assets=spec.asset_keys,
        bbox=box,
        start=iso_day(start, "start"),
        end=iso_day(end, "end"),
        max_cloud=max_cloud,
        n_items=len(items),
        selection=_selection(levels=levels, n_dates=n_dates, dates=dates),
        acquisitions=tuple(found),
        chosen=tuple(chosen),
        resolution=float(resolution),
        items=chosen_items,
        **_grid_fields(geobox),
    )


def _items_of(chosen: Sequence[StacAcquisition], items: Sequence[pystac.Item]) -> tuple[pystac.Item, ...]:
    """Return the items of the chosen acquisitions, in the order of ``items``."""
    chosen_ids = {item_id for a in chosen for item_id in a.item_ids}
    return tuple(item for item in items if item.id in chosen_ids)


def _check_counts(*, n_dates: int | None, resolution: float) -> None:
    """Raise an ArgumentError for a number of dates below 1 or a pixel size that is not positive."""
    if n_dates is not None and n_dates < 1:
        raise ArgumentError(f"n_dates must be >= 1, got {n_dates}")
    if resolution <= 0:
        raise ArgumentError(f"resolution must be > 0, got {resolution}")


def _selection(*, levels: Sequence[float] | None, n_dates: int | None, dates: Sequence[str | dt.date] | None) -> str:
    """Say how the dates were chosen (:attr:`StacPlan.selection`)."""
    if levels:
        return f"cloud levels {', '.join(f'{v:g}' for v in levels)}"
    if n_dates:
        return f"the {n_dates} clearest dates"
    if dates:
        return f"dates {', '.join(iso_day(d, 'dates') for d in dates)}"
    return "all dates"


def _grid_fields(geobox: Any) -> dict[str, Any]:
    """Return the plan's grid fields from an odc-geo GeoBox: ``crs``, ``transform``, ``shape`` and ``geobox``."""
    epsg = geobox.crs.epsg
    return {
        "crs": f"EPSG:{epsg}" if epsg else geobox.crs.to_wkt(),
        "transform": tuple(float(v) for v in tuple(geobox.affine)[:6]),
        "shape": (int(geobox.shape.y), int(geobox.shape.x)),
        "geobox": geobox,
    }
