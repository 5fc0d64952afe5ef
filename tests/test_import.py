"""``cmsn-cube import`` on real files of ../shared/data (skipped where absent): Landsat Collection 2 band files
and one multi-band file per date, checked pixel by pixel against the files; bad folders refused in one line."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cmsn_cube.cli import main
from cmsn_cube.exceptions import CubeValidationError
from cmsn_cube.qa import cloud_mask_from_qa
from cmsn_cube.sources.files import date_from_name, open_files
from cmsn_cube.store import open_cube
from cmsn_cube.testing import shared_data_path

C2L2 = shared_data_path("landsat8_c2l2_qa_pixel")
KRANJ = shared_data_path("landsat8_kranj_sr_gaps")
pytestmark = pytest.mark.skipif(None in (C2L2, KRANJ), reason="shared data (../shared/data) absent")

#: A real Landsat 8 Collection 2 Level-2 scene (EPSG:32619, 512 x 512 px of 448.3 x 455.9 m).
SCENE = "LC08_L2SP_001070_20190114_20200830_02_T2"
FILES = ["SR_B2", "SR_B3", "SR_B4", "SR_B5", "QA_PIXEL"]
#: The same scene under a second, earlier date, as Landsat 9 (sorted after LC08 by name, before it by date),
#: its pixels flipped left-right so that the dates differ.
EARLIER = "LC09_L2SP_001070_20181229_20200830_02_T2"
#: A real scene of another path/row, on another grid.
OTHER = "LC08_L2SP_017036_20130419_20200913_02_T2"


def _read(path):
    import rasterio

    with rasterio.open(path) as raster:
        return raster.read(1), raster.profile


def _landsat_folder(tmp_path):
    """A folder as USGS ships it: per band per date files (links to the real ones, and a flipped copy), an MTL."""
    import rasterio

    folder = tmp_path / "scenes"
    folder.mkdir()
    for band in FILES:
        os.symlink(C2L2 / f"{SCENE}_{band}.TIF", folder / f"{SCENE}_{band}.TIF")
        values, profile = _read(C2L2 / f"{SCENE}_{band}.TIF")
        with rasterio.open(folder / f"{EARLIER}_{band}.TIF", "w", **profile) as out:
            out.write(values[:, ::-1], 1)
    (folder / f"{SCENE}_MTL.txt").write_text("GROUP = LANDSAT_METADATA_FILE\n")  # left alone: no raster
    for other in ("ST_B10", "QA_RADSAT", "SR_B7"):  # the scene's other bands: left alone
        shutil.copy(C2L2 / f"{SCENE}_QA_PIXEL.TIF", folder / f"{SCENE}_{other}.TIF")
    return folder


def _import(*arguments):
    result = CliRunner().invoke(main, ["import", *map(str, arguments)])
    return result, result.output.strip()


def test_landsat_band_files_become_a_cube_equal_to_the_files(tmp_path):
    folder = _landsat_folder(tmp_path)
    out = tmp_path / "cube.zarr"
    result, output = _import(folder, out)
    assert result.exit_code == 0, output
    assert "2 dates 2018-12-29 .. 2019-01-14" in output
    cube = open_cube(out)
    assert [str(t)[:10] for t in cube.time.values] == ["2018-12-29", "2019-01-14"]
    assert list(cube.sensor.values) == ["LANDSAT_9", "LANDSAT_8"]
    assert cube.rio.crs.to_epsg() == 32619
    _, profile = _read(C2L2 / f"{SCENE}_SR_B2.TIF")
    transform = profile["transform"]
    assert cube.attrs["scale_m"] == pytest.approx(np.sqrt(abs(transform.a * transform.e)))  # not the default 30
    assert cube.attrs["scale_m"] == pytest.approx(452.09, abs=0.01)
    assert float(cube.x[0]) == pytest.approx(transform.c + transform.a / 2)
    assert float(cube.y[0]) == pytest.approx(transform.f + transform.e / 2)
    for band, name in zip(["blue", "green", "red", "nir"], FILES, strict=False):
        dn, _ = _read(C2L2 / f"{SCENE}_{name}.TIF")
        expected = np.where(dn == 0, np.nan, dn * 2.75e-5 - 0.2).astype("float32")  # 0 is the files' nodata
        np.testing.assert_allclose(cube.reflectance.sel(band=band).values[1], expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(cube.reflectance.sel(band=band).values[0], expected[:, ::-1], rtol=0, atol=1e-6)
    qa, _ = _read(C2L2 / f"{SCENE}_QA_PIXEL.TIF")
    np.testing.assert_array_equal(cube.qa_pixel.values[1], qa)
    mask = cloud_mask_from_qa(cube.qa_pixel.isel(time=1)).values
    np.testing.assert_array_equal(cube.cloud_mask.values[1], mask)
    np.testing.assert_array_equal(cube.cloud_mask.values[0], mask[:, ::-1])
    assert 0.05 < mask.mean() < 0.95  # a real scene with real clouds: the mask is not trivially all or nothing


def test_scenes_in_subfolders_as_usgs_archives_unpack(tmp_path):
    folder = _landsat_folder(tmp_path)
    for scene in (SCENE, EARLIER):
        (folder / scene).mkdir()
        for path in folder.glob(f"{scene}_*"):
            path.rename(folder / scene / path.name)
    (folder / "old.zarr").mkdir()
    (folder / "old.zarr" / "junk.tif").write_text("not searched")  # a store's inside is never read
    cube = open_files([folder], chunks=256)
    assert [str(t)[:10] for t in cube.time.values] == ["2018-12-29", "2019-01-14"]
    assert cube.reflectance.data.chunksize[-2:] == (256, 256)
    dn, _ = _read(folder / SCENE / f"{SCENE}_SR_B5.TIF")
    expected = np.where(dn == 0, np.nan, dn * 2.75e-5 - 0.2).astype("float32")
    np.testing.assert_allclose(cube.reflectance.sel(band="nir").values[1], expected, rtol=0, atol=1e-6)


def test_files_cropped_to_their_common_extent(tmp_path):
    import rasterio
    from rasterio.windows import Window

    source = KRANJ / "kranj_landsat_unfilled" / "2020068_191-28_kranj.tif"
    folder = tmp_path / "files"
    folder.mkdir()
    shutil.copy(source, folder / "2020068.tif")
    values, profile = _read_all(source)
    with rasterio.open(source) as raster:
        transform = raster.window_transform(Window(0, 0, 40, 30))  # same upper-left corner, 40 x 30 px
    profile.update(width=40, height=30, transform=transform)
    with rasterio.open(folder / "2020077.tif", "w", **profile) as out:
        out.write(values[:, :30, :40])
    bands = ["--bands", "blue=1,green=2,red=3,nir=4", "--scale", "1e-4"]
    result, output = _import(folder, tmp_path / "a.zarr", *bands)
    assert result.exit_code == 1 and output.startswith("error: 2020077.tif is on another grid than 2020068.tif: size")
    result, output = _import(folder, tmp_path / "a.zarr", *bands, "--crop-to-common")
    assert result.exit_code == 0, output
    cube = open_cube(tmp_path / "a.zarr")
    assert (cube.sizes["y"], cube.sizes["x"]) == (30, 40)
    np.testing.assert_array_equal(cube.reflectance.values[0], cube.reflectance.values[1])


def test_one_multiband_file_per_date_dated_by_name_or_csv(tmp_path):
    folder = KRANJ / "kranj_landsat_unfilled"
    files = sorted(folder.glob("*.tif"))
    out = tmp_path / "kranj.zarr"
    result, output = _import(folder, out, "--bands", "blue=1,green=2,red=3,nir=4", "--scale", "1e-4", "--sensor", "L8")
    assert result.exit_code == 0, output
    cube = open_cube(out)
    # YYYYDOY in the names: 2020068 is 8 March 2020
    assert [str(t)[:10] for t in cube.time.values] == ["2020-03-08", "2020-03-17", "2020-04-02", "2020-04-09"]
    assert cube.attrs["scale_m"] == pytest.approx(np.sqrt(29.9 * 30.0))
    assert set(cube.sensor.values) == {"L8"}
    dn, profile = _read(files[0])
    expected = np.where(dn == profile["nodata"], np.nan, dn * 1e-4).astype("float32")
    np.testing.assert_allclose(cube.reflectance.sel(band="blue").values[0], expected, rtol=0, atol=1e-6)
    assert np.isnan(expected).any(), "the real gaps of this date are no data"
    assert not cube.cloud_mask.values.any()
    # dates from a table instead: the third file given another date comes last
    table = tmp_path / "dates.csv"
    rows = ["file,date"] + [f"{f.name},2020-05-0{i + 1}" if i == 2 else f"{f.name},2020-04-0{i + 1}" for i, f in
                            enumerate(files)]  # fmt: skip
    table.write_text("\n".join(rows) + "\n")
    result, output = _import(folder, tmp_path / "csv.zarr", "--bands", "blue=1,green=2,red=3,nir=4", "--scale",
                             "1e-4", "--dates-from", f"csv:{table}")  # fmt: skip
    assert result.exit_code == 0, output
    by_csv = open_cube(tmp_path / "csv.zarr")
    assert [str(t)[:10] for t in by_csv.time.values] == ["2020-04-01", "2020-04-02", "2020-04-04", "2020-05-03"]
    np.testing.assert_array_equal(by_csv.reflectance.values[3], cube.reflectance.values[2])


def test_the_import_reads_lazily_and_names_a_file_whose_pixels_fail(tmp_path):
    folder = _landsat_folder(tmp_path)
    cube = open_files([folder])
    assert cube.reflectance.chunks is not None and cube.cloud_mask.chunks is not None  # nothing loaded yet
    # a file whose header reads but whose pixels are cut off: found while the store is written, named, no store
    import rasterio

    values, profile = _read(C2L2 / f"{SCENE}_SR_B4.TIF")
    whole = tmp_path / "whole.tif"
    profile.update(compress=None, tiled=True, blockxsize=128, blockysize=128)
    with rasterio.open(whole, "w", **profile) as raster:
        raster.write(values, 1)
    cut = folder / f"{EARLIER}_SR_B4.TIF"
    cut.unlink()
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 4])
    out = tmp_path / "cube.zarr"
    result, output = _import(folder, out)
    assert result.exit_code == 1
    assert output.startswith(f"error: {cut.name} cannot be read, truncated or corrupt") and "\n" not in output
    assert not out.exists()
    with pytest.raises(CubeValidationError, match=f"^{cut.name} cannot be read"):
        open_files([folder]).reflectance.compute()


@pytest.mark.parametrize(
    "fault, message",
    [
        ("missing band", f"error: {EARLIER} (2018-12-29) has no SR_B5 file (found QA_PIXEL, SR_B2, SR_B3, SR_B4)"),
        ("not a raster", f"error: {EARLIER}_SR_B3.TIF is not a raster GDAL can read"),
        ("no date", "error: LC09_L2SP_001070_T2_QA_PIXEL.TIF has no date in its name"),
        ("other file", "error: notes.tif is no Landsat Collection 2 band file"),
        ("other grid", f"error: {SCENE}_SR_B2.TIF is on another grid than {OTHER}_SR_B2.TIF: CRS EPSG:32619 vs"),
    ],
)
def test_a_bad_folder_is_one_line_naming_the_file_and_nothing_is_written(tmp_path, fault, message):
    folder = _landsat_folder(tmp_path)
    if fault == "missing band":
        (folder / f"{EARLIER}_SR_B5.TIF").unlink()
    elif fault == "not a raster":
        (folder / f"{EARLIER}_SR_B3.TIF").write_text("this is no image\n")
    elif fault == "no date":
        for band in FILES:
            (folder / f"{EARLIER}_{band}.TIF").rename(folder / f"LC09_L2SP_001070_T2_{band}.TIF")
    elif fault == "other file":
        shutil.copy(C2L2 / f"{SCENE}_SR_B2.TIF", folder / "notes.tif")
    else:  # a real scene of another path/row (another UTM zone) in place of the earlier date
        for band in FILES:
            (folder / f"{EARLIER}_{band}.TIF").unlink()
            os.symlink(C2L2 / f"{OTHER}_{band}.TIF", folder / f"{OTHER}_{band}.TIF")
    out = tmp_path / "cube.zarr"
    result, output = _import(folder, out)
    assert result.exit_code == 1
    assert output.startswith(message) and "\n" not in output and "Traceback" not in output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]


def test_a_generic_file_without_a_date_an_existing_store_and_bad_options(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    shutil.copy(KRANJ / "kranj_landsat_unfilled" / "2020068_191-28_kranj.tif", folder / "2020068_kranj.tif")
    shutil.copy(KRANJ / "kranj_landsat_unfilled" / "2020077_190-28_kranj.tif", folder / "kranj_march.tif")
    bands = ["--bands", "blue=1,green=2,red=3,nir=4", "--scale", "1e-4"]
    result, output = _import(folder, tmp_path / "a.zarr", *bands)
    assert (result.exit_code, output) == (1, "error: kranj_march.tif has no date in its name (YYYYMMDD, YYYY-MM-DD "
                                              "or YYYYDOY): rename it or give --dates-from csv:PATH")  # fmt: skip
    assert not (tmp_path / "a.zarr").exists()
    (folder / "kranj_march.tif").unlink()
    assert _import(folder, tmp_path / "a.zarr", *bands)[0].exit_code == 0
    result, output = _import(folder, tmp_path / "a.zarr", *bands)
    assert result.exit_code == 1 and "exists; pass --overwrite" in output
    assert _import(folder, tmp_path / "a.zarr", *bands, "--overwrite")[0].exit_code == 0
    result, output = _import(folder, tmp_path / "b.zarr", "--bands", "blue=1,green=2,red=3", "--scale", "1e-4")
    assert result.exit_code == 2 and "lacks nir" in output
    result, output = _import(folder, tmp_path / "b.zarr", "--bands", "blue=1,green=2,red=3,nir=4")
    assert result.exit_code == 1 and "declares no scale" in output and "2020068_kranj.tif" in output
    assert not (tmp_path / "b.zarr").exists()


def test_dates_in_names():
    assert str(date_from_name("LC08_L2SP_001070_20190114_20200830_02_T2_SR_B2.TIF")) == "2019-01-14"
    assert str(date_from_name("CBERS-4_AWFI_B13_2017-08-29.tif")) == "2017-08-29"
    assert str(date_from_name("2020068_191-28_kranj.tif")) == "2020-03-08"
    assert str(date_from_name("LC80200392015216LGN00_B2.TIF")) == "2015-08-04"
    assert str(date_from_name("tile_001070_s2_20181301_20180102.tif")) == "2018-01-02"  # 20181301 is no date


def test_a_mask_band_or_a_qa_band_of_each_kind_becomes_the_cloud_mask(tmp_path):
    import rasterio

    folder = tmp_path / "files"
    folder.mkdir()
    # the real Kranj reflectance x 10^4 as int16, and a fifth band of codes, each meaning something else per kind:
    # 3 SCL shadow, 8 SCL cloud, 16 C1 cloud bit, 384 C1 high-confidence shadow, 17 C1 fill + cloud, 128 C1 low
    # shadow confidence; as Collection 2 QA_PIXEL: 8 cloud bit, 16 shadow bit, 17 fill + shadow, 384 = bits 7, 8
    codes = np.array([0, 3, 8, 16, 384, 17, 128], dtype="int16")
    written = []
    for index, source in enumerate(sorted((KRANJ / "kranj_landsat_unfilled").glob("*.tif"))[:2]):
        values, profile = _read_all(source)
        dn = np.where(values[:4] < -1e30, -9999, np.round(values[:4])).astype("int16")
        band5 = codes[(np.arange(values.shape[1] * values.shape[2]) + index) % codes.size].reshape(values.shape[1:])
        profile.update(count=5, dtype="int16", nodata=-9999)
        with rasterio.open(folder / f"kranj_2020-03-0{index + 1}.tif", "w", **profile) as out:
            out.write(np.concatenate([dn, band5[None]]))
        written.append((dn, band5))
    bands = ["--bands", "blue=1,green=2,red=3,nir=4", "--scale", "1e-4"]

    def imported(name, *options):
        result, output = _import(folder, tmp_path / name, *bands, *options)
        assert result.exit_code == 0, output
        return open_cube(tmp_path / name)

    expected_blue = np.where(written[1][0][0] == -9999, np.nan, written[1][0][0] * 1e-4).astype("float32")
    masked = imported("mask.zarr", "--mask-band", "5", "--cloud-values", "8,16")
    np.testing.assert_allclose(masked.reflectance.sel(band="blue").values[1], expected_blue, rtol=0, atol=1e-6)
    for t, (_, band5) in enumerate(written):
        np.testing.assert_array_equal(masked.cloud_mask.values[t], np.isin(band5, [8, 16]))
    scl = imported("scl.zarr", "--qa-band", "5", "--qa", "scl")
    np.testing.assert_array_equal(scl.cloud_mask.values[0], np.isin(written[0][1], [3, 8]))
    assert "qa_pixel" not in scl
    c1 = imported("c1.zarr", "--qa-band", "5", "--qa", "landsat-c1")
    np.testing.assert_array_equal(c1.cloud_mask.values[1], np.isin(written[1][1], [16, 384]))
    c2 = imported("c2.zarr", "--qa-band", "5")  # --qa landsat-c2 by default
    np.testing.assert_array_equal(c2.qa_pixel.values[0], written[0][1].astype("uint16"))
    np.testing.assert_array_equal(c2.cloud_mask.values[0], cloud_mask_from_qa(c2.qa_pixel.isel(time=0)).values)
    assert c2.cloud_mask.values[0].any() and not c2.cloud_mask.values[0].all()
    for options, message in [
        (["--mask-band", "5", "--qa-band", "5"], "give --mask-band or --qa-band, not both"),
        (["--mask-band", "5"], "give --cloud-values"),
    ]:
        result, output = _import(folder, tmp_path / "bad.zarr", *bands, *options)
        assert result.exit_code == 2 and message in output and "\n" not in output
    assert not (tmp_path / "bad.zarr").exists()


def _read_all(path):
    import rasterio

    with rasterio.open(path) as raster:
        return raster.read(), raster.profile
