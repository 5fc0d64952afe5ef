"""Seed-style GeoTIFF import: Region_T{t}_Patch{i}.tif files written with rasterio."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from cmsn_cube.exceptions import CubeValidationError, GridError, MissingDateError
from cmsn_cube.sources.geotiff import open_seed_patches

DATES = ["2013-05-12", "2013-06-13", "2013-07-31"]


def write_patch(
    path, values, *, origin=(500_000.0, 3_400_000.0), crs="EPSG:32650", names=("B2", "B3", "B4", "B5", "QA_PIXEL")
):
    count, height, width = values.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=height,
        width=width,
        count=count,
        dtype="float32",
        crs=crs,
        transform=from_origin(*origin, 30, 30),
        nodata=np.nan,
    ) as dst:
        dst.write(values.astype("float32"))
        dst.descriptions = names[:count]


def patch_values(seed):
    rng = np.random.default_rng(seed)
    values = np.empty((5, 12, 10), dtype="float32")
    values[:4] = rng.uniform(0.02, 0.4, (4, 12, 10))
    values[4] = 21824  # clear
    values[4, :3, :3] = 55052  # cloud
    return values


@pytest.fixture()
def seed_folder(tmp_path):
    for t in (1, 2, 3):
        values = patch_values(t)
        if t == 2:
            values[:4, 5, 5] = np.nan  # a no-data pixel
            values[4, 5, 5] = np.nan
        write_patch(tmp_path / f"Wuhan_T{t}_Patch7.tif", values)
    return tmp_path


def test_reads_bands_qa_and_keeps_nan(seed_folder):
    cube = open_seed_patches(seed_folder, region="Wuhan", patch=7, dates=DATES)
    assert cube.reflectance.shape == (3, 4, 12, 10)
    np.testing.assert_allclose(cube.reflectance.values[0], patch_values(1)[:4])
    assert np.isnan(cube.reflectance.values[1, :, 5, 5]).all(), "no-data must stay NaN, not become 0"
    assert cube.cloud_mask.values[:, :3, :3].all() and not cube.cloud_mask.values[:, 6:, 6:].any()
    assert cube.qa_pixel.dtype == np.uint16
    assert str(cube.time.values[2])[:10] == "2013-07-31"
    assert cube.rio.crs.to_epsg() == 32650
    assert float(cube.x[0]) == 500_015.0 and float(cube.y[0]) == 3_399_985.0


def test_band_names_follow_the_sensor(tmp_path):
    # Landsat 5 files name blue..NIR B1..B4; write them in a shuffled order to prove names are used
    for t in (1, 2, 3):
        values = patch_values(t)
        write_patch(
            tmp_path / f"NSW_T{t}_Patch1.tif", values[[2, 0, 3, 1, 4]], names=("B3", "B1", "B4", "B2", "QA_PIXEL")
        )
    cube = open_seed_patches(tmp_path, region="NSW", patch=1, dates=DATES, sensor="LANDSAT_5")
    np.testing.assert_allclose(cube.reflectance.values[0], patch_values(1)[:4])


def test_missing_date_is_named(seed_folder):
    (seed_folder / "Wuhan_T2_Patch7.tif").unlink()
    with pytest.raises(MissingDateError, match="Wuhan_T2_Patch7.tif"):
        open_seed_patches(seed_folder, region="Wuhan", patch=7, dates=DATES)


def test_mismatched_grids(seed_folder):
    write_patch(seed_folder / "Wuhan_T3_Patch7.tif", patch_values(3), origin=(500_300.0, 3_400_000.0))
    with pytest.raises(GridError, match="another grid"):
        open_seed_patches(seed_folder, region="Wuhan", patch=7, dates=DATES)


def test_a_date_one_pixel_north_is_refused(seed_folder):
    # at y = 3.4e6 m a tolerance relative to the coordinates let a 30 m shift north through
    write_patch(seed_folder / "Wuhan_T2_Patch7.tif", patch_values(2), origin=(500_000.0, 3_400_030.0))
    with pytest.raises(
        GridError, match=r"Wuhan_T2_Patch7.tif is on another grid than Wuhan_T1_Patch7.tif: .* 1 px off"
    ):
        open_seed_patches(seed_folder, region="Wuhan", patch=7, dates=DATES)
    # a transform that differs by float noise is the same grid
    write_patch(seed_folder / "Wuhan_T2_Patch7.tif", patch_values(2), origin=(500_000.0 + 1e-7, 3_400_000.0))
    cube = open_seed_patches(seed_folder, region="Wuhan", patch=7, dates=DATES)
    np.testing.assert_allclose(cube.reflectance.values[1], patch_values(2)[:4])


def test_a_truncated_patch_is_named_in_one_line(seed_folder):
    path = seed_folder / "Wuhan_T3_Patch7.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # GDAL writes this small file's directory last: it is cut off
    with pytest.raises(CubeValidationError, match=r"^Wuhan_T3_Patch7.tif is not a raster GDAL can read: .*") as error:
        open_seed_patches(seed_folder, region="Wuhan", patch=7, dates=DATES)
    assert "\n" not in str(error.value)


def test_dates_are_required_or_warned(seed_folder):
    with pytest.warns(UserWarning, match="placeholder dates"):
        open_seed_patches(seed_folder, region="Wuhan", patch=7)
