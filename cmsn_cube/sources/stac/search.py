"""Finding the STAC items of a bbox and window: an API search, a walk of a static catalog, or items in hand.

Also what is read of each item: its time, its ``eo:cloud_cover`` and the sensor its ``platform`` names.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmsn_cube.exceptions import ArgumentError, CubeValidationError, NoDataError, check_positive
from cmsn_cube.sources._common import BBox, check_bbox, check_window
from cmsn_cube.sources.stac.products import DEFAULT_COLLECTION, import_stac_module

if TYPE_CHECKING:  # pragma: no cover
    import pystac

#: Seconds one HTTP request of the STAC path (catalog, search page, asset read) may wait for an answer: a server
#: that accepts the connection and never answers must not hold a pull forever.
DEFAULT_TIMEOUT_S = 30.0


def sensor_for_platform(platform: str | None, *, item_id: str = "") -> str:
    """Return the cube's sensor name for a STAC ``platform`` (``landsat-8``, ``LANDSAT_8`` -> ``LANDSAT_8``).

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


def item_time(item: pystac.Item) -> dt.datetime:
    """Return the item's acquisition time as a naive UTC datetime (odc-stac's time coordinate is naive UTC)."""
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        raise CubeValidationError(f"STAC item {item.id} has no datetime (nor start_datetime)")
    return when.astimezone(dt.UTC).replace(tzinfo=None) if when.tzinfo else when


def cloud_cover(item: pystac.Item) -> float:
    """Return ``eo:cloud_cover`` as a fraction (NaN when the item does not say)."""
    value = item.properties.get("eo:cloud_cover")
    return float(value) / 100.0 if value is not None else float("nan")


def describe_source(catalog: Any) -> str:
    """Return how plans and errors name a catalog: its path or URL, or what was given."""
    if isinstance(catalog, (str, os.PathLike)):
        return str(catalog)
    if isinstance(catalog, Sequence) or type(catalog).__name__ == "ItemCollection":
        return f"{len(list(catalog))} STAC items given"
    return f"{type(catalog).__name__} {getattr(catalog, 'id', '')}".strip()


def _item_day(item: pystac.Item) -> str:
    """Return the UTC day of the item's acquisition."""
    return item_time(item).date().isoformat()


def _intersects(item: pystac.Item, bbox: BBox) -> bool:
    """Tell whether the item's footprint (its bbox, else its geometry's bounds) meets ``bbox``."""
    box = item.bbox
    if not box and item.geometry:
        import shapely.geometry

        box = list(shapely.geometry.shape(item.geometry).bounds)
    if not box:
        return True  # no footprint to test: odc-stac's load leaves it out if it does not cover the grid
    west, south, east, north = box[0], box[1], box[-2], box[-1]
    return not (east < bbox[0] or west > bbox[2] or north < bbox[1] or south > bbox[3])


def _is_url(value: str) -> bool:
    """Tell whether ``value`` starts with a URL scheme."""
    return re.match(r"^[a-z][a-z0-9+.-]*://", value, flags=re.IGNORECASE) is not None


def _open_client(where: str, *, timeout: float) -> Any:
    """Open a STAC API or a static catalog at a URL or path with pystac-client, ``timeout`` s per request."""
    if not _is_url(where) and not Path(where).exists():
        raise ArgumentError(f"no STAC catalog at {where}: give an API URL, a catalog.json path or pystac items")
    pystac_client = import_stac_module("pystac_client", "pystac-client")
    with warnings.catch_warnings():
        # a static catalog advertises no conformance classes: that is expected, it is walked below
        warnings.simplefilter("ignore", getattr(pystac_client.warnings, "NoConformsTo", UserWarning))
        from pystac_client.stac_api_io import StacApiIO
        from urllib3 import Retry

        # no request is sent again after a timeout or a failed connection: pystac-client's own 5 retries made
        # a silent server hold the search six times the timeout
        stac_io = StacApiIO(max_retries=Retry(total=5, connect=0, read=0))
        try:
            return pystac_client.Client.open(where, stac_io=stac_io, timeout=timeout)
        except Exception as error:  # requests, JSON and STAC errors alike: one line with the address
            raise _catalog_error(where, error, timeout=timeout) from None


def _catalog_error(where: str, error: BaseException, *, timeout: float) -> ArgumentError:
    """Return the one-line error for a failed request to the catalog at ``where`` (a timeout said as such)."""
    if _timed_out(error):
        return ArgumentError(
            f"the STAC catalog {where} did not answer within {timeout:g} s: check the address and the network, "
            "or allow more time (timeout=, cmsn-cube pull --timeout)"
        )
    return ArgumentError(
        f"cannot open the STAC catalog {where}: {type(error).__name__}: {' '.join(str(error).split())}"
    )


def _timed_out(error: BaseException | None) -> bool:
    """Tell whether ``error`` or one it was raised from is a timeout (pystac-client wraps requests' in APIError)."""
    import requests

    while error is not None:
        if isinstance(error, TimeoutError | requests.exceptions.Timeout):
            return True
        error = error.__cause__ or error.__context__
    return False


def _items_in_hand(catalog: Any) -> list[pystac.Item] | None:
    """Return the items of a pystac Item, ItemCollection, list of items or plain Catalog; None for a client."""
    pystac = import_stac_module("pystac", "pystac")
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
    return None


def _search_or_walk(
    catalog: Any, *, collection: str, bbox: BBox, start: str, end: str, timeout: float
) -> list[pystac.Item]:
    """Return the items of ``catalog``: an API search where the catalog offers one, else every item (filtered later).

    A catalog opened here from a URL or path waits at most ``timeout`` s for each request.
    """
    items = _items_in_hand(catalog)
    if items is not None:
        return items
    if not isinstance(catalog, (str, os.PathLike)) and type(catalog).__module__.startswith("pystac_client"):
        client = catalog
    elif isinstance(catalog, (str, os.PathLike)):
        client = _open_client(str(catalog), timeout=timeout)
    else:
        raise ArgumentError(
            f"catalog must be a STAC API URL, a catalog.json path, a pystac Catalog/ItemCollection or a list of "
            f"pystac.Item, got {type(catalog).__name__}"
        )
    from pystac_client import ConformanceClasses

    try:
        if client.conforms_to(ConformanceClasses.ITEM_SEARCH):
            # the window's end day is included: pystac-client expands a bare end date to its last second
            search = client.search(collections=[collection], bbox=list(bbox), datetime=f"{start}/{end}")
            return list(search.items())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FallbackToPystac: a static catalog has no /search, walking it is the way
            return list(client.get_items(recursive=True))
    except Exception as error:  # a page or a child catalog that fails: one line with the address, as opening
        raise _catalog_error(describe_source(catalog), error, timeout=timeout) from None


def find_items(
    catalog: Any,
    *,
    collection: str = DEFAULT_COLLECTION,
    bbox: Sequence[float],
    start: str | dt.date,
    end: str | dt.date,
    max_cloud: float | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[pystac.Item]:
    """Find the STAC items of ``collection`` over ``bbox`` in the window, at most ``max_cloud`` cloudy.

    Parameters
    ----------
    catalog : str, path, pystac.Catalog, pystac.ItemCollection or list of pystac.Item
        A STAC API URL (searched), a static catalog path or URL (walked), or items already in hand.
    collection : str
        Collection id; items that name another collection are left out.
    bbox : sequence of float
        ``(west, south, east, north)`` in degrees; items whose ``bbox`` does not intersect it are left out.
    start, end : str or datetime.date
        First and last day (UTC), both included.
    max_cloud : float, optional
        Leave out items whose ``eo:cloud_cover`` is above this fraction (0-1); items without one, too.
    timeout : float
        Seconds each request to a catalog given as a URL may wait for an answer (opening, search pages, child
        catalogs); then the search fails with an ArgumentError that names the URL.

    Returns
    -------
    list of pystac.Item
        Sorted by time.

    Raises
    ------
    NoDataError
        No item fits; the message says which filter left none.
    RegionError, ArgumentError
        A bad bbox, window, ``max_cloud`` or ``timeout``; a catalog that cannot be opened or searched, or does
        not answer within ``timeout``.
    """
    box = check_bbox(bbox)
    start_day, end_day = check_window(start, end)
    if max_cloud is not None and not 0.0 <= max_cloud <= 1.0:
        hint = f" (did you mean {max_cloud / 100:g}?)" if 1 < max_cloud <= 100 else ""
        raise ArgumentError(f"max_cloud is a fraction in [0, 1] (eo:cloud_cover / 100), got {max_cloud:g}{hint}")
    check_positive(timeout=timeout)
    items = _search_or_walk(catalog, collection=collection, bbox=box, start=start_day, end=end_day, timeout=timeout)
    where = describe_source(catalog)
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
        kept = [item for item in in_bbox if cloud_cover(item) <= max_cloud]
        if not kept:
            covers = sorted(round(100 * cloud_cover(item), 1) for item in in_bbox)
            raise NoDataError(
                f"all {len(in_bbox)} STAC items over the bbox in the window are cloudier than max_cloud "
                f"{100 * max_cloud:g} % (eo:cloud_cover {covers} %); raise max_cloud or widen the window"
            )
    return sorted(kept, key=lambda item: (item_time(item), item.id))
