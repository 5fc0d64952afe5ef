"""open_stack never guesses silently: grids compared in pixels, a NetCDF's own coordinates, scales checked and read
from the files, unreadable files named. Real values from ../shared/data (skipped where absent)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from cmsn_cube.exceptions import CubeValidationError, GridError, ReflectanceRangeError
from cmsn_cube.sources.stack import open_stack
from cmsn_cube.testing import shared_data_path

CBERS = shared_data_path("cbers_timeseries")
NAIP = shared_data_path("naip_10dates")
LANDSAT = shared_data_path("landsat8_c2l2_qa_pixel")
ROMANIA = shared_data_path("s2_nrt_romania")
pytestmark = pytest.mark.skipif(
    None in (CBERS, NAIP, LANDSAT, ROMANIA), reason="shared data (../shared/data or $CMSN_SHARED_DATA) absent"
)

BANDS = {"blue": 1, "green": 2, "red": 3, "nir": 4}
CBERS_DATES = ["2017-08-29", "2017-09-14"]
LANDSAT_SCENE = "LC08_L2SP_001070_20190114_20200830_02_T2"


def cbers_date(date: str) -> np.ndarray:
    """The four real CBERS-4 AWFI bands of one date: int16 reflectance x 10^4, nodata -9999, (4, 50, 50)."""
    layers = []
    for band in ("B13", "B14", "B15", "B16"):
        with rasterio.open(CBERS / f"CBERS-4_AWFI_{band}_{date}.tif") as raster:
            layers.append(raster.read(1))
    return np.stack(layers)


def write_tif(path, values, *, transform, crs="EPSG:32650", nodata=-9999, scales=None, offsets=None):
    count, height, width = values.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": values.dtype.name}
    with rasterio.open(path, "w", **profile, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(values)
        if scales is not None:
            dst.scales, dst.offsets = scales, offsets
    return path


# ------------------------------------------------------------------------------------ grids compared in pixels


def test_a_date_shifted_by_one_pixel_is_refused_in_y_as_in_x(tmp_path):
    """At y = 3.4e6 m a relative tolerance let a 30 m shift north through (and refused the same shift east)."""
    first = write_tif(tmp_path / "t1.tif", cbers_date(CBERS_DATES[0]), transform=from_origin(5e5, 3.4e6, 30, 30))
    second = cbers_date(CBERS_DATES[1])
    for name, transform in {
        "north": from_origin(5e5, 3.4e6 + 30, 30, 30),
        "east": from_origin(5e5 + 30, 3.4e6, 30, 30),
        "pixel size": from_origin(5e5, 3.4e6, 30.05, 30.05),  # same origin: 2.5 m off, 0.08 px, at the far corner
    }.items():
        shifted = write_tif(tmp_path / f"{name}.tif", second, transform=transform)
        with pytest.raises(GridError, match=rf"{name}.tif is on another grid than t1.tif: its pixels lie up to"):
            open_stack([first, shifted], dates=CBERS_DATES, bands=BANDS, scale=1e-4)
    # float noise in the transform (1 micrometre) is the same grid: the second date's values on the first's pixels
    noisy = write_tif(tmp_path / "noise.tif", second, transform=from_origin(5e5 + 1e-6, 3.4e6 - 1e-6, 30, 30))
    cube = open_stack([first, noisy], dates=CBERS_DATES, bands=BANDS, scale=1e-4)
    assert cube.x.values[0] == 5e5 + 15 and cube.y.values[0] == 3.4e6 - 15
    expected = np.where(second == -9999, np.nan, second * 1e-4).astype("float32")
    np.testing.assert_array_equal(cube.reflectance.values[1], expected)


# ---------------------------------------------------------------------------------- a NetCDF's own coordinates


def _netcdf(tmp_path, name, *, keep_xy=True, **encoding):
    """One CBERS date as a NetCDF variable ``dn`` (band, y, x) whose x/y have no CF attributes and whose grid
    mapping holds the CRS but no GeoTransform (as the real s2_nrt_romania files): GDAL finds no grid in it."""
    import rioxarray

    tif = write_tif(tmp_path / f"{name}.tif", cbers_date(CBERS_DATES[0]), transform=from_origin(5e5, 3.4e6, 30, 30))
    dataset = rioxarray.open_rasterio(tif).rename("dn").to_dataset()
    for axis in ("x", "y"):
        dataset[axis].attrs = {}
    dataset["spatial_ref"].attrs.pop("GeoTransform")
    if not keep_xy:
        dataset = dataset.drop_vars(["x", "y"])
    if encoding:  # the reflectance written back as int16 DN with the variable's scale_factor and add_offset
        dn = dataset["dn"]
        scaled = dn.where(dn != -9999) * encoding["scale_factor"] + encoding["add_offset"]
        scaled.attrs = {
            key: value for key, value in dn.attrs.items() if key not in ("scale_factor", "add_offset", "_FillValue")
        }
        scaled.encoding.update(dn.encoding, dtype="int16", _FillValue=-9999, **encoding)  # grid_mapping kept
        dataset["dn"] = scaled
    dataset.to_netcdf(tmp_path / f"{name}.nc")
    return tmp_path / f"{name}.nc", tif


def test_netcdf_without_cf_coordinates_is_read_on_its_own_x_and_y(tmp_path):
    netcdf, tif = _netcdf(tmp_path, "bare")
    options = {"dates": CBERS_DATES[:1], "bands": BANDS, "bands_per_date": 4, "scale": 1e-4}
    from_netcdf = open_stack(netcdf, variable="dn", **options)
    from_tif = open_stack(tif, **options)
    # not x = y = 0.5 ... 49.5 with the rows upside down
    np.testing.assert_array_equal(from_netcdf.x.values, 5e5 + 15 + 30 * np.arange(50))
    np.testing.assert_array_equal(from_netcdf.y.values, 3.4e6 - 15 - 30 * np.arange(50))
    np.testing.assert_array_equal(from_netcdf.reflectance.values, from_tif.reflectance.values)
    assert from_netcdf.rio.crs == from_tif.rio.crs


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # reading x and y by hand below
def test_real_netcdf_with_bare_x_and_y_gets_the_file_coordinates():
    """s2_nrt_romania: x/y hold only _FillValue, the CRS sits in spatial_ref; GDAL alone numbers pixels 0.5, 1.5..."""
    path = ROMANIA / "sentinel2_cube_subset_romania_10m.nc"
    with rasterio.open(f'NETCDF:"{path}":x') as x, rasterio.open(f'NETCDF:"{path}":y') as y:
        file_x, file_y = x.read(1).ravel(), y.read(1).ravel()
    with rasterio.open(f'NETCDF:"{path}":B2') as b2:
        days = [int(v) for v in b2.tags()["NETCDF_DIM_time_VALUES"].strip("{}").split(",")]
    dates = np.datetime64("2015-08-01") + np.array(days, dtype="timedelta64[D]")
    cube = open_stack(
        path, variable="B2", dates=dates, bands=dict.fromkeys(BANDS, 1), bands_per_date=1, scale=1e-4, nodata=0
    )
    np.testing.assert_array_equal(cube.x.values, file_x)
    np.testing.assert_array_equal(cube.y.values, file_y)
    assert cube.x.values[0] == pytest.approx(5271987.5766) and cube.y.values[0] == pytest.approx(2532999.2149)
    assert 'AUTHORITY["EPSG","3035"]]' in cube.rio.crs.to_wkt() and cube.sizes["time"] == 140
    assert 0.01 < float(cube.reflectance.sel(band="blue").median()) < 0.2  # Sentinel-2 blue over forest


def test_a_file_without_georeferencing_is_refused(tmp_path):
    netcdf, _ = _netcdf(tmp_path, "nocoords", keep_xy=False)
    with pytest.raises(GridError, match="nocoords.nc has no georeferencing: GDAL finds no geotransform and no 1-D"):
        open_stack(netcdf, variable="dn", dates=CBERS_DATES[:1], bands=BANDS, bands_per_date=4, scale=1e-4)
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        tif = write_tif(tmp_path / "crs_only.tif", cbers_date(CBERS_DATES[0]), transform=rasterio.Affine.identity())
    with pytest.raises(GridError, match="crs_only.tif has no georeferencing: GDAL finds no geotransform; georef"):
        open_stack(tif, dates=CBERS_DATES[:1], bands=BANDS, bands_per_date=4, scale=1e-4)


# ------------------------------------------------------------------------------------------- scales checked


def test_an_impossible_scale_is_refused_with_the_reason(tmp_path):
    naip = sorted(NAIP.glob("*_2010*.tif"))
    bands = {"red": 1, "green": 2, "blue": 3, "nir": 4}
    with rasterio.open(naip[0]) as raster:
        brightest = int(raster.read().max())  # 245 of 255
    message = rf"_20100629.tif \(uint8\) scaled as DN x 0.0001 reach at most {brightest * 1e-4:g}: this is not surface"
    with pytest.raises(ReflectanceRangeError, match=message):
        open_stack(naip, dates=["2010-06-29"], bands=bands, bands_per_date=4, scale=1e-4)
    with pytest.raises(ReflectanceRangeError, match="uint8 data need scale=1/255"):
        open_stack(naip, dates=["2010-06-29"], bands=bands, bands_per_date=4, scale=1e-4)
    cube = open_stack(naip, dates=["2010-06-29"], bands=bands, bands_per_date=4, scale=1 / 255)
    assert float(cube.reflectance.max()) == pytest.approx(brightest / 255)

    # float reflectance scaled once more: all black
    dn = cbers_date(CBERS_DATES[0])
    reflectance = np.where(dn == -9999, np.nan, dn * 1e-4).astype("float32")
    floats = write_tif(tmp_path / "float.tif", reflectance, transform=from_origin(5e5, 3.4e6, 30, 30), nodata=None)
    message = rf"float.tif \(float32\) scaled as DN x 0.0001 reach at most {np.nanmax(reflectance) * 1e-4:.4g}: .*"
    with pytest.raises(ReflectanceRangeError, match=message + "leave scale out"):
        open_stack(floats, dates=CBERS_DATES[:1], bands=BANDS, bands_per_date=4, scale=1e-4)
    cube = open_stack(floats, dates=CBERS_DATES[:1], bands=BANDS, bands_per_date=4)
    np.testing.assert_array_equal(cube.reflectance.values[0], reflectance)
    # digital numbers not scaled enough
    ints = write_tif(tmp_path / "ints.tif", dn, transform=from_origin(5e5, 3.4e6, 30, 30))
    with pytest.raises(
        ReflectanceRangeError, match=r"ints.tif \(int16\) scaled as DN x 0.001 range .* not reflectance"
    ):
        open_stack(ints, dates=CBERS_DATES[:1], bands=BANDS, bands_per_date=4, scale=1e-3)


def _landsat_sr(tmp_path, **metadata):
    """A 4-band GeoTIFF of real Landsat 8 Collection 2 Level-2 SR_B2..B5 digital numbers (a 64 x 64 crop)."""
    layers = []
    for band in ("SR_B2", "SR_B3", "SR_B4", "SR_B5"):
        with rasterio.open(LANDSAT / f"{LANDSAT_SCENE}_{band}.TIF") as raster:
            layers.append(raster.read(1, window=rasterio.windows.Window(300, 200, 64, 64)))
            transform, crs = raster.transform, raster.crs
    dn = np.stack(layers)
    name = "declared.tif" if metadata else "sr.tif"
    return write_tif(tmp_path / name, dn, transform=transform, crs=crs, nodata=0, **metadata), dn


def test_scale_then_offset_on_real_collection_2_values(tmp_path):
    path, dn = _landsat_sr(tmp_path)
    cube = open_stack(path, dates=["2019-01-14"], bands=BANDS, bands_per_date=4, scale=2.75e-5, offset=-0.2)
    expected = np.where(dn == 0, np.nan, dn.astype("float64") * 2.75e-5 - 0.2).astype("float32")
    np.testing.assert_array_equal(cube.reflectance.values[0], expected)
    assert np.nanmin(expected) < 0.05 and np.nanmax(expected) > 0.3  # dark and bright pixels alike
    # one pixel by hand: DN 9123 of the blue band is 9123 x 2.75e-5 - 0.2 = 0.0508825, not (9123 - 0.2) x 2.75e-5
    row, col = np.argwhere(dn[0] > 0)[0]
    assert cube.reflectance.values[0, 0, row, col] == pytest.approx(int(dn[0, row, col]) * 2.75e-5 - 0.2, abs=1e-7)


def test_the_files_own_scale_and_offset_are_read(tmp_path):
    path, dn = _landsat_sr(tmp_path, scales=[2.75e-5] * 4, offsets=[-0.2] * 4)
    expected = np.where(dn == 0, np.nan, dn.astype("float64") * 2.75e-5 - 0.2).astype("float32")
    cube = open_stack(path, dates=["2019-01-14"], bands=BANDS, bands_per_date=4)  # no scale given
    np.testing.assert_array_equal(cube.reflectance.values[0], expected)
    same = open_stack(path, dates=["2019-01-14"], bands=BANDS, bands_per_date=4, scale=2.75e-5, offset=-0.2)
    np.testing.assert_array_equal(same.reflectance.values, cube.reflectance.values)
    with pytest.raises(
        CubeValidationError, match=r"declared.tif declares reflectance = DN x 2.75e-05 - 0.2 .* scale=0.0001"
    ):
        open_stack(path, dates=["2019-01-14"], bands=BANDS, bands_per_date=4, scale=1e-4)

    # NetCDF: scale_factor and add_offset of the variable
    netcdf, tif = _netcdf(tmp_path, "scaled", scale_factor=1e-4, add_offset=0.01)
    from_netcdf = open_stack(netcdf, variable="dn", dates=CBERS_DATES[:1], bands=BANDS, bands_per_date=4)
    dn = cbers_date(CBERS_DATES[0])
    expected = np.where(dn == -9999, np.nan, dn * 1e-4 + 0.01).astype("float32")
    np.testing.assert_allclose(from_netcdf.reflectance.values[0], expected, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------- unreadable files named


def test_a_truncated_geotiff_is_named_in_one_line(tmp_path):
    whole = write_tif(tmp_path / "whole.tif", cbers_date(CBERS_DATES[0]), transform=from_origin(5e5, 3.4e6, 30, 30))
    data = whole.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(CubeValidationError, match=r"^cut.tif cannot be read, truncated or corrupt: ") as error:
        open_stack(tmp_path / "cut.tif", dates=CBERS_DATES[:1], bands=BANDS, bands_per_date=4, scale=1e-4)
    assert "\n" not in str(error.value)
