"""The CBERS-4 AWFI series as a cube (real data; skipped when the shared data folder is absent)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cmsn_cube.exceptions import MissingDateError, NoDataError
from cmsn_cube.sources.cbers import open_cbers_series
from cmsn_cube.store import open_cube, write_cube
from cmsn_cube.testing import shared_data_path

FOLDER = shared_data_path("cbers_timeseries")
pytestmark = pytest.mark.skipif(FOLDER is None, reason="shared data (../shared/data or $CMSN_SHARED_DATA) absent")


def test_series_becomes_a_valid_cube(tmp_path):
    import rasterio

    cube = open_cbers_series(FOLDER)
    assert cube.sizes == {"time": 24, "band": 4, "y": 50, "x": 50}
    assert str(cube.time.values[0])[:10] == "2017-08-29" and set(cube.sensor.values) == {"CBERS_4"}
    assert cube.rio.crs is not None and cube.attrs["scale_m"] == 64.0
    with rasterio.open(FOLDER / "CBERS-4_AWFI_B15_2018-01-01.tif") as src:
        red = src.read(1)
    np.testing.assert_allclose(cube.reflectance.sel(band="red").isel(time=8).values, red * 1e-4, rtol=1e-6)
    assert 0 <= float(cube.reflectance.min()) and float(cube.reflectance.max()) <= 1
    with rasterio.open(FOLDER / "CBERS-4_AWFI_CMASK_2017-12-19.tif") as src:
        cmask = src.read(1)
    assert (cube.cloud_mask.isel(time=7).values == (cmask == 4)).all()
    reopened = open_cube(write_cube(cube, tmp_path / "cbers.zarr"))
    assert reopened.rio.crs == cube.rio.crs


def test_nodata_and_missing_files(tmp_path):
    import rasterio

    for path in FOLDER.glob("*2017-08-29.tif"):
        shutil.copy(path, tmp_path / path.name)
    blue = tmp_path / "CBERS-4_AWFI_B13_2017-08-29.tif"
    with rasterio.open(blue, "r+") as dst:
        data = dst.read(1)
        data[0, :5] = -9999
        dst.write(data, 1)
    cube = open_cbers_series(tmp_path)
    assert np.isnan(cube.reflectance.isel(time=0)[:, 0, :5]).all()  # every band: a pixel is data or not
    assert not cube.cloud_mask.isel(time=0)[0, :5].any()
    (tmp_path / "CBERS-4_AWFI_CMASK_2017-08-29.tif").unlink()
    with pytest.raises(MissingDateError):
        open_cbers_series(tmp_path)
    with pytest.raises(NoDataError):
        open_cbers_series(tmp_path / "nothing")
