"""Optional dependencies: imported where used, with an error that names the pip extra that installs them.

``pip install cmsn-cube`` installs what reconstruction needs (xarray, Dask, Zarr, torch...); the rest comes with
extras: ``ee`` (Earth Engine via xee), ``stac`` (odc-stac, pystac, pystac-client) and ``train`` (xbatcher
windows for training and fine-tuning). The repository's ``make install`` installs them all.
"""

from __future__ import annotations

import importlib
from typing import Any

#: extra -> (what it is for, the packages it installs)
EXTRAS: dict[str, tuple[str, str]] = {
    "ee": ("pulling from Earth Engine", "earthengine-api, xee, shapely"),
    "stac": ("reading STAC catalogs", "odc-stac, pystac, pystac-client, shapely"),
    "train": ("cutting training windows", "xbatcher"),
}


def missing_message(package: str, extra: str) -> str:
    """Return the message of the ImportError raised when ``package`` of ``extra`` is missing."""
    purpose, packages = EXTRAS[extra]
    return (
        f'{package} is not installed; {purpose} needs the {extra} extra: pip install "cmsn-cube[{extra}]" ({packages})'
    )


def require(module: str, extra: str, *, package: str | None = None) -> Any:
    """Import ``module``, or raise an ImportError that says which extra installs it.

    Examples
    --------
    >>> require("math", "ee").sqrt(4.0)
    2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(missing_message(package or module.split(".")[0], extra)) from error
