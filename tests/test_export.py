"""GeoTIFF/COG export: one file per date and layer that rasterio (and so QGIS, GDAL) reads back exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from cmsn_cube.cli import main
from cmsn_cube.exceptions import CubeValidationError, OutputExistsError
from cmsn_cube.export import to_cogs
from cmsn_cube.inference import reconstruct, write_reconstruction
from cmsn_cube.sources.synthetic import synthetic_scene
from cmsn_cube.store import open_reconstruction


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> str:
    scene = synthetic_scene(height=300, width=280, seed=3)
    path = str(tmp_path_factory.mktemp("out") / "out.zarr")
    write_reconstruction(reconstruct(scene, method="regression"), path, progress=False)
    return path


def test_cogs_read_back_with_values_grid_names_and_overviews(written, tmp_path):
    result = open_reconstruction(written).load()
    paths = to_cogs(result, tmp_path / "cogs", progress=False)
    assert len(paths) == 3 * 4  # dates x (reflectance, ndvi, filled, uncertainty)
    day = str(result.time.values[1])[:10]
    with rasterio.open(tmp_path / "cogs" / f"{day}_reflectance.tif") as cog:
        assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and cog.overviews(1)
        assert cog.descriptions == ("blue", "green", "red", "nir") and np.isnan(cog.nodata)
        assert cog.crs == result.rio.crs
        np.testing.assert_array_equal(cog.read(), result.reconstructed.values[1])
        # pixel centres of the cube are the centres of the GeoTIFF's pixels
        assert cog.xy(0, 0) == (pytest.approx(float(result.x[0])), pytest.approx(float(result.y[0])))
        assert cog.tags()["model"] == result.attrs["model"]
    with rasterio.open(tmp_path / "cogs" / f"{day}_filled.tif") as cog:
        np.testing.assert_array_equal(cog.read(1), result.filled.values[1])
        assert "unobserved_left_nan" in cog.tags()["flag_meanings"]
        # 0 is a flag ("observed"), not no data: GIS tools must not hide the observed pixels
        assert cog.nodata is None and (result.filled.values[1] == 0).any()
        assert not cog.read(1, masked=True).mask.any()
    with rasterio.open(tmp_path / "cogs" / f"{day}_ndvi.tif") as cog:
        np.testing.assert_array_equal(cog.read(1), result.ndvi.values[1])


def test_a_reconstruction_written_before_the_uncertainty_exports_without_it(written, tmp_path):
    older = open_reconstruction(written).drop_vars("uncertainty")
    paths = to_cogs(older, tmp_path / "cogs", progress=False)
    assert len(paths) == 3 * 3 and not any(p.endswith("_uncertainty.tif") for p in paths)


def test_cog_tags_name_the_input_store_without_its_path(tmp_path):
    # issue 29 item 5: the tags carried the absolute path of the input (a user's folders, handed on with the file)
    from cmsn_cube.store import open_cube, write_cube

    store = write_cube(synthetic_scene(height=64, width=64, seed=3), tmp_path / "private" / "scene.zarr")
    result = reconstruct(open_cube(store), method="regression", tile=64, overlap=8, chunk=128)
    assert result.attrs["input_store"] == store
    paths = to_cogs(result, tmp_path / "cogs", progress=False)
    for path in paths:
        with rasterio.open(path) as cog:
            tags = cog.tags()
        assert tags["input_store"] == "scene.zarr", path
        assert not [value for value in tags.values() if "private" in value], tags
    with rasterio.open(next(p for p in paths if p.endswith("_filled.tif"))) as cog:
        tags = cog.tags()
    values, meanings = tags["flag_values"].strip("[]").split(", "), tags["flag_meanings"].split()
    assert values[:5] == ["0", "1", "2", "3", "4"] and len(values) == len(meanings)
    assert meanings[4] == "no_data_filled_from_other_dates" and tags["long_name"].startswith("origin of each pixel")


def test_existing_files_are_kept_unless_overwrite(written, tmp_path):
    result = open_reconstruction(written)
    to_cogs(result, tmp_path, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tif")}
    with pytest.raises(OutputExistsError, match=r"already holds \d{4}-\d\d-\d\d_\w+\.tif"):
        to_cogs(result, tmp_path, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tif")} == before
    to_cogs(result, tmp_path, overwrite=True, progress=False)
    assert not list(tmp_path.glob(".*")), "no temporary file is left"
    with pytest.raises(CubeValidationError, match="not a reconstruction"):
        to_cogs(synthetic_scene(height=32, width=32), tmp_path / "x", progress=False)


def test_cli_export(written, tmp_path):
    run = CliRunner().invoke(main, ["export", written, str(tmp_path / "cogs")])
    assert run.exit_code == 0 and "wrote 12 GeoTIFFs" in run.output, run.output
    run = CliRunner().invoke(main, ["export", str(tmp_path / "missing.zarr"), str(tmp_path / "cogs")])
    assert run.exit_code == 1 and run.stderr.startswith("error: no store at")


def test_export_never_writes_into_a_zarr_store(written, tmp_path):
    from cmsn_cube.store import write_cube

    cube = write_cube(synthetic_scene(height=32, width=32, seed=1), tmp_path / "cube.zarr")
    for store, folder in ((written, written), (written, cube), (written, f"{cube}/cogs")):
        before = sorted(p.relative_to(cube) for p in Path(cube).rglob("*"))
        run = CliRunner().invoke(main, ["export", store, folder])
        assert run.exit_code == 1 and "Zarr store" in run.stderr and len(run.stderr.splitlines()) == 1, run.output
        assert sorted(p.relative_to(cube) for p in Path(cube).rglob("*")) == before
    assert not list(Path(written).rglob("*.tif")) and open_reconstruction(written) is not None
