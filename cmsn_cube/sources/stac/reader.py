"""How the lazy asset reads behave: GDAL's HTTP timeouts, and errors that name the asset that failed.

odc-stac re-raises GDAL's error as it is (``CURL error: Operation timed out after 30001 milliseconds``) from a
Dask task, far from the item it read; :class:`NamingRioDriver` adds the asset's URL and makes it one line.
Imported only when a load runs (it needs odc-stac, the ``stac`` extra).
"""

from __future__ import annotations

from typing import Any

import rasterio.errors
from odc.loader import RioDriver, RioReader

from cmsn_cube.exceptions import CubeValidationError

try:
    from odc.loader._rio import GDAL_CLOUD_DEFAULTS
except ImportError:  # a later odc-loader may move them: the timeouts matter more
    GDAL_CLOUD_DEFAULTS = {}

#: Times GDAL tries a failed HTTP request again (odc-stac's default is 10, each after a doubled delay: a server
#: that never answers held a read for minutes). Throttled (429) and busy (5xx) servers still get two more tries.
HTTP_RETRIES = 2


def http_options(timeout: float) -> dict[str, str]:
    """Return the GDAL options of the asset reads: odc-stac's cloud defaults, ``timeout`` s per request.

    odc-stac uses its cloud defaults (no directory listing on open, retries) only where no GDAL option is set,
    so they are repeated here beside the timeouts. With :data:`HTTP_RETRIES`, a server that accepts and never
    answers fails a read after about three times ``timeout``.

    Examples
    --------
    >>> options = http_options(30)
    >>> options["GDAL_HTTP_TIMEOUT"], options["GDAL_HTTP_CONNECTTIMEOUT"], options["GDAL_HTTP_MAX_RETRY"]
    ('30', '30', '2')
    """
    seconds = f"{timeout:g}"
    return {
        **GDAL_CLOUD_DEFAULTS,
        "GDAL_HTTP_TIMEOUT": seconds,
        "GDAL_HTTP_CONNECTTIMEOUT": seconds,
        "GDAL_HTTP_MAX_RETRY": str(HTTP_RETRIES),
    }


class NamingRioReader(RioReader):
    """odc-stac's rasterio reader; a GDAL error becomes a CubeValidationError that names the asset."""

    def read(self, cfg: Any, dst_geobox: Any, *, dst: Any = None, selection: Any = None) -> Any:
        """Read as :class:`odc.loader.RioReader` does."""
        try:
            return super().read(cfg, dst_geobox, dst=dst, selection=selection)
        except rasterio.errors.RasterioError as error:
            message = " ".join(str(error).split())
            raise CubeValidationError(f"cannot read the STAC asset {self._src.uri}: {message}") from None


class NamingRioDriver(RioDriver):
    """odc-stac's rasterio driver, opening :class:`NamingRioReader` s (pass as ``odc.stac.load(driver=...)``)."""

    def open(self, src: Any, ctx: Any) -> NamingRioReader:
        """Open one asset for reading."""
        return NamingRioReader(src, ctx)
