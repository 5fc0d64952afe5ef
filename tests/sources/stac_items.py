"""What the STAC tests' local catalogs share: an item's footprint on a 30 m grid."""

from __future__ import annotations

from typing import Any


def set_footprint(item: Any, *, crs: str, left: float, top: float, height: int, width: int) -> None:
    """Give a STAC ``item`` the geometry, bbox and projection of a ``height`` x ``width`` 30 m grid at (left, top)."""
    from pyproj import Transformer
    from pystac.extensions.projection import ProjectionExtension

    right, bottom = left + 30 * width, top - 30 * height
    lons, lats = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(
        [left, right, right, left], [top, top, bottom, bottom]
    )
    ring = [[float(lon), float(lat)] for lon, lat in zip(lons, lats, strict=True)]
    item.geometry = {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}
    item.bbox = [float(min(lons)), float(min(lats)), float(max(lons)), float(max(lats))]
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code, proj.shape, proj.transform = crs, [height, width], [30.0, 0.0, left, 0.0, -30.0, top]
