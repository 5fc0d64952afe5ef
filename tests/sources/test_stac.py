"""The STAC source, fully offline: a real local STAC catalog of real COGs, loaded through odc-stac's own loader.

The catalog is built in ``tmp_path`` with pystac from the real Collection 2 Level-2 data in
``landsat8_c2l2_qa_pixel`` (SR_B2..SR_B5 and QA_PIXEL, uint16 DN as USGS distributes them). Those are five single
scenes of five places, so a 128 x 128 crop of each is *georeferenced anew* onto one common 30 m grid in EPSG:32619
(pixel edges at 15 m offsets, as Landsat's) to make a multi-date stack; one crop is placed 300 km east (outside the
bbox). Pixel values, QA words and acquisition dates are the scenes' own; the grid, the footprints and the items'
``eo:cloud_cover`` (the crop's cloud fraction) are made for the test. Assets carry the Planetary Computer's keys
(``blue``, ``green``, ``red``, ``nir08``, ``qa_pixel``) and ``raster:bands`` (nodata, scale, offset).
"""

from __future__ import annotations

import datetime as dt
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from stac_items import set_footprint

from cmsn_cube.cube import SENSOR_BANDS
from cmsn_cube.exceptions import ArgumentError, BandMismatchError, CubeValidationError, MissingDateError, NoDataError
from cmsn_cube.qa import cloud_mask_from_qa
from cmsn_cube.testing import shared_data_path

FOLDER = shared_data_path("landsat8_c2l2_qa_pixel")
pytestmark = pytest.mark.skipif(FOLDER is None, reason="shared data (../shared/data or $CMSN_SHARED_DATA) absent")
pystac = pytest.importorskip("pystac", reason='the stac extra is not installed (pip install "cmsn-cube[stac]")')
pytest.importorskip("odc.stac", reason='the stac extra is not installed (pip install "cmsn-cube[stac]")')
pytest.importorskip("pystac_client", reason='the stac extra is not installed (pip install "cmsn-cube[stac]")')

from cmsn_cube.sources import stac  # noqa: E402  (after the skips: it needs nothing optional, but reads better)

CRS = "EPSG:32619"
LEFT, TOP, SIZE = 600_015.0, 1_200_015.0, 128
#: scene -> (acquisition time, crop row/col in the 512 x 512 scene, platform as written, x shift in metres)
SCENES = {
    "LC08_L2SP_017036_20130419_20200913_02_T2": ("2013-04-19T15:52:11+00:00", (0, 64), "landsat-8", 0.0),
    "LC08_L2SP_005009_20150710_20200908_02_T2": ("2015-07-10T14:35:09+00:00", (96, 96), "LANDSAT_8", 0.0),
    "LC08_L2SP_008059_20191201_20200825_02_T1": ("2019-12-01T15:15:27+00:00", (32, 288), "landsat-8", 0.0),
    "LC08_L2SP_001070_20190114_20200830_02_T2": ("2019-01-14T14:31:40+00:00", (192, 352), "landsat-8", 0.0),
    "LC08_L2SR_099120_20191129_20201016_02_T2": ("2019-11-29T13:40:00+00:00", (32, 160), "landsat-8", 300_000.0),
}
OUTSIDE = "LC08_L2SR_099120_20191129_20201016_02_T2"
FILES = {"blue": "SR_B2", "green": "SR_B3", "red": "SR_B4", "nir08": "SR_B5", "qa_pixel": "QA_PIXEL"}
BBOX = (-68.08, 10.825, -68.055, 10.85)  # inside the common footprint, away from its edges
WINDOW = {"start": "2013-01-01", "end": "2019-12-31"}


def _crop(scene: str, band: str, row: int, col: int) -> np.ndarray:
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(FOLDER / f"{scene}_{band}.TIF") as src:
        return src.read(1, window=Window(col, row, SIZE, SIZE))


def _write_cog(array: np.ndarray, path: Path, left: float, top: float, nodata: int) -> None:
    import rioxarray  # noqa: F401

    x = left + 15 + 30 * np.arange(array.shape[1])
    y = top - 15 - 30 * np.arange(array.shape[0])
    da = xr.DataArray(array, dims=("y", "x"), coords={"y": y, "x": x}).rio.write_crs(CRS).rio.write_nodata(nodata)
    da.rio.to_raster(path, driver="COG")


def _make_item(
    scene: str,
    root: Path,
    *,
    keys: dict[str, str] | None = None,
    when: str | None = None,
    rows: tuple[int, int] = (0, SIZE),
    item_id: str | None = None,
) -> pystac.Item:
    """One item with real COGs of rows ``rows`` of one scene's crop (placed at those rows of the common grid),
    with Planetary-Computer style metadata; ``keys`` renames the assets."""
    from pystac.extensions.eo import EOExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension

    acquired, (row, col), platform, shift = SCENES[scene]
    first, last = rows
    left, top, height = LEFT + shift, TOP - 30 * first, last - first
    item_id = item_id or scene
    folder = root / "data" / item_id
    folder.mkdir(parents=True, exist_ok=True)
    item = pystac.Item(
        id=item_id,
        geometry=None,
        bbox=None,
        datetime=dt.datetime.fromisoformat(when or acquired),
        properties={"platform": platform, "instruments": ["oli", "tirs"]},
    )
    qa = _crop(scene, "QA_PIXEL", row, col)[first:last]
    for key, band in FILES.items():
        is_qa = band == "QA_PIXEL"
        path = folder / f"{band}.tif"
        if not path.exists():
            data = qa if is_qa else _crop(scene, band, row, col)[first:last]
            _write_cog(data, path, left, top, 1 if is_qa else 0)
        asset = pystac.Asset(href=str(path), media_type=pystac.MediaType.COG, roles=["data"])
        item.add_asset((keys or {}).get(key, key), asset)
        raster = RasterExtension.ext(asset, add_if_missing=True)
        if is_qa:
            raster.bands = [RasterBand.create(nodata=1, data_type=DataType.UINT16)]
        else:
            raster.bands = [RasterBand.create(nodata=0, data_type=DataType.UINT16, scale=2.75e-5, offset=-0.2)]
    valid = (qa & 1) == 0
    EOExtension.ext(item, add_if_missing=True).cloud_cover = round(100 * float(((qa & 0b11110) > 0)[valid].mean()), 2)
    set_footprint(item, crs=CRS, left=left, top=top, height=height, width=SIZE)
    return item


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """A self-contained static catalog on disk: catalog.json -> collection landsat-c2-l2 -> 5 items."""
    root = tmp_path_factory.mktemp("stac")
    collection = pystac.Collection(
        id="landsat-c2-l2",
        description="Landsat Collection 2 Level-2 crops for tests",
        extent=pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]])),
    )
    for scene in SCENES:  # not in time order: the cube must sort
        collection.add_item(_make_item(scene, root))
    top = pystac.Catalog(id="test", description="local STAC catalog for cmsn-cube tests")
    top.add_child(collection)
    top.normalize_hrefs(str(root / "stac"))
    top.make_all_asset_hrefs_relative()
    top.save(pystac.CatalogType.SELF_CONTAINED)
    return root / "stac" / "catalog.json"


@pytest.fixture(scope="module")
def items(catalog) -> list[pystac.Item]:
    return list(pystac.Catalog.from_file(str(catalog)).get_items(recursive=True))


def _cover(items, scene: str) -> float:
    return next(i for i in items if i.id == scene).properties["eo:cloud_cover"] / 100


def _read(items, scene: str, key: str) -> tuple[np.ndarray, object]:
    import rasterio

    item = next(i for i in items if i.id == scene)
    with rasterio.open(item.assets[key].get_absolute_href()) as src:
        return src.read(1), src.transform


# ----------------------------------------------------------------------------------------------- the load


def test_local_catalog_loads_through_odc_stac_into_a_valid_cube(catalog, items):
    cube = stac.open_stac(str(catalog), bbox=BBOX, **WINDOW, chunks={"time": 1, "y": 64, "x": 64})

    # lazy Dask arrays, one date per chunk
    for name in ("reflectance", "qa_pixel", "cloud_mask"):
        assert cube[name].chunks is not None, name
    assert cube.reflectance.data.chunksize[:2] == (1, 4) and cube.reflectance.data.chunksize[2] <= 64

    # dates sorted, the 300 km-away scene left out, sensor per date from the platform (both spellings)
    days = [str(t)[:10] for t in cube.time.values.astype("datetime64[D]")]
    assert days == ["2013-04-19", "2015-07-10", "2019-01-14", "2019-12-01"]
    assert list(cube.sensor.values) == ["LANDSAT_8"] * 4
    assert not cube.slc_off.values.any()
    np.testing.assert_allclose(
        cube.cloud_cover.values,
        [_cover(items, s) for s in sorted(set(SCENES) - {OUTSIDE}, key=lambda s: SCENES[s][0])],
    )

    # CRS and the 30 m grid on the scenes' own pixel edges (no half-pixel resampling)
    assert cube.rio.crs.to_epsg() == 32619
    assert np.allclose(np.diff(cube.x.values), 30) and np.allclose(np.diff(cube.y.values), -30)
    # the files' pixel edges sit at 15 m offsets, so their centres, and the cube's, at multiples of 30 m
    assert cube.x.values[0] % 30 == 0 and cube.y.values[0] % 30 == 0
    assert cube.attrs["scale_m"] == 30 and cube.attrs["reflectance"] == "SR"

    loaded = cube.compute()
    for position, scene in enumerate(sorted(set(SCENES) - {OUTSIDE}, key=lambda s: SCENES[s][0])):
        qa, transform = _read(items, scene, "qa_pixel")
        # where the cube's first pixel centre falls in the file
        col = int(round((cube.x.values[0] - transform.c) / 30 - 0.5))
        row = int(round((transform.f - cube.y.values[0]) / 30 - 0.5))
        window = np.s_[row : row + cube.sizes["y"], col : col + cube.sizes["x"]]
        assert cube.sizes["y"] + row <= SIZE and cube.sizes["x"] + col <= SIZE
        np.testing.assert_array_equal(loaded.qa_pixel.values[position], qa[window])  # QA words preserved
        fill = (qa[window] & 1) == 1
        for b, key in enumerate(("blue", "green", "red", "nir08")):
            dn = _read(items, scene, key)[0][window]
            expected = np.clip(dn.astype("float64") * 2.75e-5 - 0.2, 0.0, 1.0).astype("float32")
            expected[(dn == 0) | fill] = np.nan
            np.testing.assert_array_equal(loaded.reflectance.values[position, b], expected)
        # the mask is the decoder's, fill never cloud
        decoded = cloud_mask_from_qa(xr.DataArray(qa[window])).values & ~fill
        np.testing.assert_array_equal(loaded.cloud_mask.values[position], decoded)


def test_a_few_pixels_by_hand(catalog, items):
    """Scaling, clipping and fill at single pixels, against rasterio reads of the COGs at the same coordinates."""
    import rasterio

    cube = stac.open_stac(str(catalog), bbox=BBOX, **WINDOW, dates=["2019-01-14"]).compute()
    scene = "LC08_L2SP_001070_20190114_20200830_02_T2"
    item = next(i for i in items if i.id == scene)
    checked = {"in range": 0, "clipped high": 0, "clipped low": 0, "fill": 0}
    with (
        rasterio.open(item.assets["red"].get_absolute_href()) as red,
        rasterio.open(item.assets["qa_pixel"].get_absolute_href()) as qa,
    ):
        dn_all, qa_all = red.read(1), qa.read(1)
        for iy in range(0, cube.sizes["y"], 3):
            for ix in range(0, cube.sizes["x"], 3):
                x, y = float(cube.x[ix]), float(cube.y[iy])
                r, c = red.index(x, y)
                dn, word = int(dn_all[r, c]), int(qa_all[r, c])
                value = float(cube.reflectance.sel(band="red").isel(time=0, y=iy, x=ix))
                assert int(cube.qa_pixel.isel(time=0, y=iy, x=ix)) == word
                if dn == 0 or word & 1:
                    assert np.isnan(value)
                    checked["fill"] += 1
                elif dn * 2.75e-5 - 0.2 > 1:
                    assert value == 1.0
                    checked["clipped high"] += 1
                elif dn * 2.75e-5 - 0.2 < 0:  # DN < 7273: dark water, shade
                    assert value == 0.0
                    checked["clipped low"] += 1
                else:
                    assert value == pytest.approx(dn * 2.75e-5 - 0.2, abs=1e-7)
                    checked["in range"] += 1
    assert all(count > 0 for count in checked.values()), checked  # the crop holds every case


def test_open_reads_no_pixels(catalog, no_compute):
    cube = stac.open_stac(str(catalog), bbox=BBOX, **WINDOW, chunks={"y": 32, "x": 32})
    assert cube.reflectance.dtype == np.float32 and cube.qa_pixel.dtype == np.uint16 and cube.cloud_mask.dtype == bool


def test_items_and_item_collections_need_no_catalog(items, catalog):
    from_list = stac.plan_stac(items, bbox=BBOX, **WINDOW)
    from_collection = stac.plan_stac(pystac.ItemCollection(items), bbox=BBOX, **WINDOW)
    from_catalog = stac.plan_stac(pystac.Catalog.from_file(str(catalog)), bbox=BBOX, **WINDOW)
    assert from_list.chosen == from_collection.chosen == from_catalog.chosen
    assert from_list.geobox == from_catalog.geobox
    assert from_list.source == "5 STAC items given"


def test_pystac_client_opens_a_local_catalog_and_it_is_walked_not_searched(catalog):
    import pystac_client
    from pystac_client import ConformanceClasses
    from pystac_client.warnings import DoesNotConformTo

    with pytest.warns(UserWarning):  # NoConformsTo: a static catalog is no API
        client = pystac_client.Client.open(str(catalog))
    assert not client.conforms_to(ConformanceClasses.ITEM_SEARCH)
    with pytest.raises(DoesNotConformTo, match="ITEM_SEARCH"):
        client.search(bbox=list(BBOX))
    found = stac.find_items(str(catalog), bbox=BBOX, **WINDOW)
    assert [i.id for i in found] == sorted((s for s in SCENES if s != OUTSIDE), key=lambda s: SCENES[s][0])


def test_two_scenes_of_one_day_become_one_mosaicked_date(tmp_path):
    """Consecutive scenes of one path (25 s apart) are one acquisition: odc-stac mosaics them into one date.

    The two items hold the upper and lower halves of one crop as separate COGs; their mosaic is the whole crop.
    """
    scene = "LC08_L2SP_005009_20150710_20200908_02_T2"
    half = SIZE // 2
    north = _make_item(scene, tmp_path, rows=(0, half), item_id="north")
    south = _make_item(scene, tmp_path, rows=(half, SIZE), item_id="south", when="2015-07-10T14:35:34+00:00")
    plan = stac.plan_stac([south, north], bbox=BBOX, **WINDOW)
    assert len(plan.chosen) == 1 and plan.chosen[0].item_ids == ("north", "south")
    expected_cover = (north.properties["eo:cloud_cover"] + south.properties["eo:cloud_cover"]) / 200
    assert plan.chosen[0].cloud_cover == pytest.approx(expected_cover)
    mosaic = stac.load_stac(plan).compute()
    assert mosaic.sizes["time"] == 1 and str(mosaic.time.values[0])[:19] == "2015-07-10T14:35:09"
    whole = stac.open_stac([_make_item(scene, tmp_path)], bbox=BBOX, **WINDOW).compute()
    np.testing.assert_array_equal(mosaic.qa_pixel.values, whole.qa_pixel.values)
    np.testing.assert_array_equal(mosaic.reflectance.values, whole.reflectance.values)


def test_sensor_per_date_from_platform(tmp_path):
    """One item relabelled (metadata only) as a Landsat 9 acquisition in 2022: the cube records each date's sensor."""
    first = _make_item("LC08_L2SP_005009_20150710_20200908_02_T2", tmp_path)
    second = _make_item("LC08_L2SP_001070_20190114_20200830_02_T2", tmp_path, when="2022-01-09T14:31:40+00:00")
    second.properties["platform"] = "landsat-9"
    cube = stac.open_stac([second, first], bbox=BBOX, start="2015-01-01", end="2022-12-31")
    assert list(cube.sensor.values) == ["LANDSAT_8", "LANDSAT_9"]
    assert [stac.sensor_for_platform(p) for p in ("landsat-5", "LANDSAT_7", "landsat-8", "Landsat-9")] == [
        "LANDSAT_5",
        "LANDSAT_7",
        "LANDSAT_8",
        "LANDSAT_9",
    ]
    assert (
        SENSOR_BANDS["LANDSAT_7"] == SENSOR_BANDS["LANDSAT_5"]
        and SENSOR_BANDS["LANDSAT_9"] == SENSOR_BANDS["LANDSAT_8"]
    )
    with pytest.raises(CubeValidationError, match="sentinel-2a"):
        stac.sensor_for_platform("sentinel-2a", item_id="S2A_x")


# ------------------------------------------------------------------------------------- choosing the dates


def test_dates_are_chosen_by_scene_cloud_cover(catalog, items):
    inside = [s for s in SCENES if s != OUTSIDE]
    covers = {SCENES[s][0][:10]: _cover(items, s) for s in inside}

    def nearest(level: float) -> str:
        return min(covers, key=lambda day: abs(covers[day] - level))

    for level in (0.2, 0.7, 0.75, 1.0):
        plan = stac.plan_stac(str(catalog), bbox=BBOX, **WINDOW, levels=[level])
        assert [a.day for a in plan.chosen] == [nearest(level)], level

    # one distinct date per level, returned in time order
    plan = stac.plan_stac(str(catalog), bbox=BBOX, **WINDOW, levels=(0.25, 0.15, 0.10))
    assert [a.day for a in plan.chosen] == sorted(a.day for a in plan.chosen) and len(plan.chosen) == 3
    assert nearest(0.25) in [a.day for a in plan.chosen]

    clearest = sorted(covers, key=covers.get)[:2]
    assert [a.day for a in stac.plan_stac(items, bbox=BBOX, **WINDOW, n_dates=2).chosen] == sorted(clearest)

    limited = stac.plan_stac(items, bbox=BBOX, **WINDOW, max_cloud=0.9)
    assert {a.day for a in limited.acquisitions} == {day for day, cover in covers.items() if cover <= 0.9}

    assert [a.day for a in stac.plan_stac(items, bbox=BBOX, **WINDOW, dates=["2019-01-14"]).chosen] == ["2019-01-14"]
    with pytest.raises(MissingDateError, match="2018-06-01"):
        stac.plan_stac(items, bbox=BBOX, **WINDOW, dates=["2018-06-01"])
    with pytest.raises(NoDataError, match="5 dates requested"):
        stac.plan_stac(items, bbox=BBOX, **WINDOW, levels=(0.1, 0.2, 0.3, 0.4, 0.5))
    with pytest.raises(ArgumentError, match="at most one"):
        stac.plan_stac(items, bbox=BBOX, **WINDOW, levels=(0.1,), n_dates=2)


def test_grid_options(items):
    plan = stac.plan_stac(items, bbox=BBOX, **WINDOW, crs="EPSG:32620", resolution=60)
    assert plan.crs == "EPSG:32620" and plan.resolution == 60 and plan.transform[0] == 60
    native = stac.plan_stac(items, bbox=BBOX, **WINDOW)
    assert native.crs == CRS and native.to_dict()["shape"] == list(native.shape)
    # the grid covers the bbox
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", CRS, always_xy=True).transform([BBOX[0], BBOX[2]], [BBOX[1], BBOX[3]])
    a, _, c, _, e, f = native.transform
    assert c <= min(x) and c + a * native.shape[1] >= max(x) and f >= max(y) and f + e * native.shape[0] <= min(y)


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_cli_dry_run_prints_the_plan_offline(catalog, items, offline):
    from click.testing import CliRunner

    from cmsn_cube.cli import main

    bbox = ",".join(str(v) for v in BBOX)
    args = ["pull", "--stac", str(catalog), "--bbox", bbox, "--start", WINDOW["start"], "--end", WINDOW["end"]]
    result = CliRunner().invoke(main, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "landsat-c2-l2" in out and "EPSG:32619, 30 m" in out and "4 items, 4 acquisitions" in out
    plan = stac.plan_stac(str(catalog), bbox=BBOX, **WINDOW, levels=(0.25, 0.15, 0.10))
    for acquisition in plan.chosen:
        line = next(line for line in out.splitlines() if acquisition.day in line)
        assert f"{100 * acquisition.cloud_cover:5.1f} %" in line and acquisition.item_ids[0] in line
    assert f"grid        {plan.shape[1]} x {plan.shape[0]} px" in out

    result = CliRunner().invoke(main, [*args, "--n-dates", "1", "--max-cloud", "0.5", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "2015-07-10" in result.output and "2019-01-14" not in result.output


def test_cli_writes_a_store(catalog, tmp_path, offline):
    from click.testing import CliRunner

    from cmsn_cube.cli import main
    from cmsn_cube.store import open_cube

    bbox = ",".join(str(v) for v in BBOX)
    out = tmp_path / "stac.zarr"
    args = ["pull", "--stac", str(catalog), "--bbox", bbox, "--start", "2015-01-01", "--end", "2019-12-31"]
    result = CliRunner().invoke(main, [*args, "--n-dates", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    cube = open_cube(out)
    assert cube.sizes["time"] == 2 and cube.rio.crs.to_epsg() == 32619 and "cloud_mask" in cube


def test_cli_errors_are_one_line(catalog):
    from click.testing import CliRunner

    from cmsn_cube.cli import main

    base = ["pull", "--stac", str(catalog), "--start", WINDOW["start"], "--end", WINDOW["end"], "--dry-run"]
    far = CliRunner().invoke(main, [*base, "--bbox", "10,10,10.1,10.1"])
    assert far.exit_code == 1 and far.output.startswith("error: no STAC item") and far.output.count("\n") == 1
    usage = CliRunner().invoke(main, [*base, "--bbox", "10,10,10.1,10.1", "--wrs-path", "20"])
    assert usage.exit_code == 2 and "--wrs-path" in usage.output and usage.output.count("\n") == 1
    both = CliRunner().invoke(main, [*base, "--bbox", "10,10,10.1,10.1", "--n-dates", "2", "--levels", "0.1"])
    assert both.exit_code == 2 and "--n-dates" in both.output
    no_stac = CliRunner().invoke(main, ["pull", "--bbox", "10,10,10.1,10.1", "--max-cloud", "0.5", "--dry-run"])
    assert no_stac.exit_code == 2 and "--stac" in no_stac.output


# ------------------------------------------------------------------------------------------------- errors


def test_no_items_in_bbox_window_or_collection(catalog):
    with pytest.raises(NoDataError, match="intersects bbox"):
        stac.find_items(str(catalog), bbox=(10, 10, 10.1, 10.1), **WINDOW)
    with pytest.raises(NoDataError, match="2020-01-01 and 2020-12-31"):
        stac.find_items(str(catalog), bbox=BBOX, start="2020-01-01", end="2020-12-31")
    with pytest.raises(NoDataError, match="'sentinel-2-l2a'"):
        stac.find_items(str(catalog), bbox=BBOX, **WINDOW, collection="sentinel-2-l2a")
    with pytest.raises(NoDataError, match="cloudier than max_cloud 10 %"):
        stac.find_items(str(catalog), bbox=BBOX, **WINDOW, max_cloud=0.1)
    with pytest.raises(NoDataError, match="no STAC items"):
        stac.find_items([], bbox=BBOX, **WINDOW)
    with pytest.raises(ArgumentError, match="did you mean 0.6"):
        stac.find_items(str(catalog), bbox=BBOX, **WINDOW, max_cloud=60)
    with pytest.raises(ArgumentError, match="no STAC catalog at"):
        stac.find_items(str(catalog.parent / "nothing.json"), bbox=BBOX, **WINDOW)


def test_unknown_asset_keys_are_named(tmp_path):
    usgs_style = {key: band for key, band in FILES.items()}  # SR_B2 ... QA_PIXEL as asset keys
    item = _make_item("LC08_L2SP_005009_20150710_20200908_02_T2", tmp_path, keys=usgs_style)
    with pytest.raises(BandMismatchError, match=r"no asset\(s\) \['blue', 'green', 'red', 'nir08', 'qa_pixel'\]"):
        stac.plan_stac([item], bbox=BBOX, **WINDOW)
    assets = {"blue": "SR_B2", "green": "SR_B3", "red": "SR_B4", "nir": "SR_B5", "qa_pixel": "QA_PIXEL"}
    cube = stac.open_stac([item], bbox=BBOX, **WINDOW, assets=assets)
    assert cube.sizes["time"] == 1 and float(cube.reflectance.max()) <= 1
    with pytest.raises(ArgumentError, match="unknown STAC product 'toa'"):
        stac.plan_stac([item], bbox=BBOX, **WINDOW, product="toa")


def test_a_missing_package_names_the_extra(monkeypatch, catalog):
    message = stac.missing_package_message("odc-stac")
    assert 'pip install "cmsn-cube[stac]"' in message and "odc-stac" in message
    monkeypatch.setitem(sys.modules, "pystac_client", None)  # what an absent package looks like to import
    with pytest.raises(ImportError, match=r"pystac-client is not installed.*cmsn-cube\[stac\]"):
        stac.find_items(str(catalog), bbox=BBOX, **WINDOW)

    from click.testing import CliRunner

    from cmsn_cube.cli import main

    bbox = ",".join(str(v) for v in BBOX)
    args = ["pull", "--stac", str(catalog), "--bbox", bbox, "--start", "2015-01-01", "--end", "2019-12-31"]
    result = CliRunner().invoke(main, [*args, "--dry-run"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("error: pystac-client is not installed") and "cmsn-cube[stac]" in result.output


def test_importing_the_module_imports_no_stac_package():
    import subprocess

    code = (
        "import sys, cmsn_cube.sources.stac, cmsn_cube.cli; "
        "print(sorted(m for m in ('odc', 'odc.stac', 'pystac', 'pystac_client') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
