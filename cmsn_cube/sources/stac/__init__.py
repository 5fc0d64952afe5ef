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
Every HTTP request (catalog, search page, asset read) gives up after ``timeout`` s (:data:`DEFAULT_TIMEOUT_S`).

What is read, from the Planetary Computer / USGS ``landsat-c2-l2`` collection: the assets ``blue``, ``green``,
``red``, ``nir08`` (surface reflectance, uint16, DN 0 = fill; reflectance = DN x 2.75e-5 - 0.2, USGS Collection 2
Level-2 Science Product Guide, unless the items' ``raster:bands`` declare another scale and offset) and ``qa_pixel``
(the Collection 2 QA bits of :mod:`cmsn_cube.qa`); the item properties ``datetime``, ``platform`` (``landsat-8`` or
``LANDSAT_8`` -> sensor ``LANDSAT_8``), ``eo:cloud_cover`` (percent of the scene) and the projection extension
(native grid).

One module per step: ``products`` (asset keys, scaling, odc-stac's asset defaults), ``search`` (finding items and
reading their metadata), ``plan`` (acquisitions, the dates kept, :class:`StacPlan`), ``grid`` (the output grid on
the scenes' pixel edges) and ``load`` (:func:`load_stac`, :func:`open_stac`); every public name is importable
from here.

odc-stac, pystac and pystac-client are the ``stac`` extra (``pip install "cmsn-cube[stac]"``) and are imported
inside the functions that use them, so importing this package stays cheap.
"""

from __future__ import annotations

from cmsn_cube.sources.stac.grid import snap_to_grid
from cmsn_cube.sources.stac.load import DEFAULT_STAC_CHUNKS, load_stac, open_stac
from cmsn_cube.sources.stac.plan import StacAcquisition, StacPlan, plan_stac
from cmsn_cube.sources.stac.products import DEFAULT_COLLECTION, PRODUCTS, StacProduct, missing_package_message
from cmsn_cube.sources.stac.search import DEFAULT_TIMEOUT_S, find_items, sensor_for_platform

__all__ = [
    "DEFAULT_COLLECTION",
    "DEFAULT_STAC_CHUNKS",
    "DEFAULT_TIMEOUT_S",
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
    "snap_to_grid",
]
