"""The output grid of a STAC load: the bbox at the chosen resolution, on the scenes' own pixel edges."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cmsn_cube.sources._common import BBox, utm_crs
from cmsn_cube.sources.stac.products import StacProduct, import_stac_module, stac_cfg

if TYPE_CHECKING:  # pragma: no cover
    import pystac


@contextlib.contextmanager
def quiet_odc() -> Iterator[None]:
    """Silence the deprecations odc-geo triggers in shapely (``shapely.ops.transform``): not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"odc\.")
        yield


def output_grid(
    items: Sequence[pystac.Item],
    product: StacProduct,
    *,
    bbox: BBox,
    crs: str | None,
    resolution: float,
) -> Any:
    """Return the output GeoBox: ``bbox`` at ``resolution`` in ``crs``, by default the items' CRS and pixel edges."""
    odc_stac = import_stac_module("odc.stac", "odc-stac")
    assets = list(product.asset_keys)
    with quiet_odc():
        parsed = list(odc_stac.parse_items(items, cfg=stac_cfg(product)))
        native = odc_stac.output_geobox(parsed, bands=assets)  # the items' most common grid, or None
        if crs is None:
            crs = str(native.crs) if native is not None else utm_crs((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
        grid = odc_stac.output_geobox(parsed, bands=assets, crs=crs, resolution=resolution, bbox=tuple(bbox))
        if native is not None and native.crs == crs and np.isclose(abs(native.resolution.x), resolution):
            # keep the scenes' pixel edges (Landsat's sit at 15 m offsets): no sub-pixel resampling
            grid = snap_to_grid(grid, native)
        return grid


def snap_to_grid(grid: Any, reference: Any) -> Any:
    """Move ``grid`` (an odc-geo GeoBox) by less than half a pixel so its pixel edges fall on ``reference``'s.

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
