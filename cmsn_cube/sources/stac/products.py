"""What a STAC product is made of: its asset keys, its scaling, and how odc-stac reads its assets.

Also the import of the ``stac`` extra's packages (odc-stac, pystac, pystac-client), done inside the functions
that need them so that importing :mod:`cmsn_cube.sources.stac` stays cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cmsn_cube.cube import BANDS
from cmsn_cube.exceptions import ArgumentError, BandMismatchError
from cmsn_cube.extras import missing_message, require
from cmsn_cube.qa import QA_BITS
from cmsn_cube.sources._common import SR_FILL_DN, SR_OFFSET, SR_SCALE

if TYPE_CHECKING:  # pragma: no cover
    import pystac

#: Default collection: Landsat Collection 2 Level-2 on the Planetary Computer (same id and asset keys at USGS).
DEFAULT_COLLECTION = "landsat-c2-l2"


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
        scale=SR_SCALE,
        offset=SR_OFFSET,
        nodata=SR_FILL_DN,
        qa_nodata=1 << QA_BITS["fill"],
        description="Collection 2 Level-2 surface reflectance",
    )
}


def missing_package_message(package: str) -> str:
    """Return the message of the ImportError raised when a package of the ``stac`` extra is missing."""
    return missing_message(package, "stac")


def import_stac_module(module: str, package: str) -> Any:
    """Import ``module`` of the ``stac`` extra, or raise an ImportError that names the extra."""
    return require(module, "stac", package=package)


def product_spec(product: str, assets: Mapping[str, str] | Sequence[str] | None = None) -> StacProduct:
    """Return the product's spec, its asset keys replaced by ``assets`` (a mapping, or keys in plan order)."""
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
    return dataclasses.replace(spec, assets={band: assets[band] for band in BANDS}, qa_asset=assets["qa_pixel"])


def stac_cfg(product: StacProduct) -> dict[str, Any]:
    """Return odc-stac's per-asset defaults where items carry no ``raster:bands`` (item metadata wins there)."""
    assets = product.asset_keys
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


def declared_scaling(asset: pystac.Asset) -> tuple[float, float] | None:
    """Return the ``(scale, offset)`` a one-band asset declares (reflectance = DN x scale + offset), or None.

    Read from ``raster:bands`` (raster extension 1.x) or from ``raster:scale``/``raster:offset`` on the asset or
    its ``bands`` (STAC 1.1); a missing scale is 1 and a missing offset 0, as the extension says.
    """
    fields = asset.extra_fields
    declarations = [
        {"scale": fields.get("raster:scale"), "offset": fields.get("raster:offset")},
        *(
            {"scale": band.get("raster:scale"), "offset": band.get("raster:offset")}
            for band in fields.get("bands") or []
        ),
        *(fields.get("raster:bands") or []),
    ]
    for band in declarations:
        scale, offset = band.get("scale"), band.get("offset")
        if scale is not None or offset is not None:
            return float(1.0 if scale is None else scale), float(0.0 if offset is None else offset)
    return None


def check_assets(items: Sequence[pystac.Item], product: StacProduct, collection: str) -> None:
    """Raise a BandMismatchError naming the first item that lacks one of the product's asset keys."""
    assets = product.asset_keys
    for item in items:
        missing = [key for key in assets if key not in item.assets]
        if missing:
            raise BandMismatchError(
                f"STAC item {item.id} of {collection} has no asset(s) {missing}; it has {sorted(item.assets)}. "
                f"This reader expects the landsat-c2-l2 keys {list(assets)} (Planetary Computer, USGS): "
                "for a collection named otherwise pass assets={'blue': ..., 'green': ..., 'red': ..., 'nir': ..., "
                "'qa_pixel': ...}"
            )
