"""cmsn-cube: cloud removal for multi-temporal Landsat cubes (xarray + Dask + PyTorch CMSN).

``import cmsn_cube`` is cheap: torch and Earth Engine load only where they are used.
"""

from __future__ import annotations

from cmsn_cube import accessor as _accessor  # noqa: F401  (registers ds.cmsn)
from cmsn_cube.cube import BANDS, SENSOR_BANDS, make_cube, validate_cube
from cmsn_cube.exceptions import CMSNCubeError, CMSNCubeWarning
from cmsn_cube.qa import add_cloud_mask, cloud_fraction, cloud_mask_from_qa, decode_qa, select_dates
from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import append_cube, open_cube, open_reconstruction, write_cube

__version__ = "0.1.0"

__all__ = [
    "BANDS",
    "SENSOR_BANDS",
    "CMSNCubeError",
    "CMSNCubeWarning",
    "add_cloud_mask",
    "append_cube",
    "cloud_fraction",
    "cloud_mask_from_qa",
    "decode_qa",
    "make_cube",
    "open_cube",
    "open_reconstruction",
    "select_dates",
    "synthetic_scene",
    "validate_cube",
    "write_cube",
]
