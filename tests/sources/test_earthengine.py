"""Earth Engine ingestion, offline: plan, collection, the real xee backend on a fake server, cube, store, CLI."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from click.testing import CliRunner

from cmsn_cube.cli import main
from cmsn_cube.cube import BANDS, validate_cube
from cmsn_cube.exceptions import BandMismatchError, EarthEngineError, MissingDateError, RegionError
from cmsn_cube.qa import QA_BITS, encode_qa, slc_off_gaps
from cmsn_cube.sources import earthengine as eee
from cmsn_cube.store import open_cube, write_cube

REGIONS = Path(__file__).resolve().parents[2] / "cmsn_cube" / "data" / "regions.yaml"
L8 = ("B2", "B3", "B4", "B5")
L5 = ("B1", "B2", "B3", "B4")
SR_L8 = tuple(f"SR_{b}" for b in L8)
SR_L5 = tuple(f"SR_{b}" for b in L5)
DAYS = ["2013-05-12", "2013-05-28", "2013-06-13", "2013-06-29"]
#: Landsat 7 around the scan line corrector failure (2003-05-31): whole, then three striped dates.
L7_DAYS = ["2003-05-15", "2003-06-16", "2003-07-02", "2003-07-18"]
#: Cloud fraction per date (as cloudy rows; fill pixels and a shadow change it a little).
CLOUD_FRACTIONS = [0.30, 0.13, 0.03, 0.23]

_CLEAR = int(encode_qa({"clear": np.array(True)}, {"cloud_confidence": np.array(1)}))
_CLOUD = int(encode_qa({"cloud": np.array(True)}, {"cloud_confidence": np.array(3)}))
_SHADOW = int(encode_qa({"cloud_shadow": np.array(True)}, {"cloud_confidence": np.array(1)}))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch):
    """Any connection attempt fails the test: everything here is offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _raise_on_compute(*args, **kwargs):
    raise AssertionError("computed: this step must stay lazy")


def scene(height: int, width: int, *, n_dates: int = 4, bands=L8) -> dict[str, np.ndarray]:
    """Reflectance that encodes band, date and pixel; QA with cloud rows, a shadow and a masked corner."""
    rows, cols = np.mgrid[0:height, 0:width]
    out = {}
    for b, name in enumerate(bands):
        out[name] = np.stack([0.1 * (b + 1) + 0.01 * t + 1e-5 * (rows * width + cols) for t in range(n_dates)]).astype(
            "float32"
        )
    qa = np.full((n_dates, height, width), _CLEAR, dtype="float64")
    for t in range(n_dates):
        qa[t, : cloud_rows(t, height)] = _CLOUD
        qa[t, -1, :3] = _SHADOW
    # outside the footprint on the first date: masked in every band (xee gives NaN)
    qa[0, -3:, -4:] = np.nan
    for name in bands:
        out[name][0, -3:, -4:] = np.nan
    out["QA_PIXEL"] = qa
    return out


def cloud_rows(t: int, height: int) -> int:
    return max(1, round(CLOUD_FRACTIONS[t] * height))


def expected_fractions(bands: dict[str, np.ndarray]) -> np.ndarray:
    qa = bands["QA_PIXEL"]
    valid = ~np.isnan(qa)
    cloudy = valid & np.isin(qa, [_CLOUD, _SHADOW])
    return cloudy.sum((1, 2)) / valid.sum((1, 2))


def sr_scene(height: int, width: int, *, bands=SR_L8) -> dict[str, np.ndarray]:
    """:func:`scene` as Level-2 digital numbers: DN 10000 + 1000 per band + 100 per date + the pixel index."""
    out = scene(height, width, bands=bands)
    rows, cols = np.mgrid[0:height, 0:width]
    for b, name in enumerate(bands):
        masked = np.isnan(out[name])
        out[name] = np.stack([10000.0 + 1000 * b + 100 * t + rows * width + cols for t in range(4)])
        out[name][masked] = np.nan
    return out


def expected_sr(dn: np.ndarray) -> np.ndarray:
    """Collection 2 Level-2 scaling, written out independently of the code under test."""
    return np.clip(dn * 0.0000275 - 0.2, 0.0, 1.0)


def stripes(height: int, width: int) -> np.ndarray:
    """SLC-off gaps per date: none on the first (before the failure), slanted 2-px stripes on the others."""
    rows, cols = np.mgrid[0:height, 0:width]
    out = np.zeros((4, height, width), dtype=bool)
    for t in range(1, 4):
        out[t] = (cols + rows // 3 + t) % 7 < 2
    return out


def int_types(names) -> dict[str, dict]:
    return {name: {"type": "PixelType", "precision": "int", "min": 0, "max": 65535} for name in names}


def xee_like(
    bands: dict[str, np.ndarray],
    *,
    crs="EPSG:32650",
    transform=(30.0, 0, 228300.0, 0, -30.0, 3390930.0),
    days=DAYS,
):
    """A Dataset laid out exactly as xee 0.1.2 returns it (see cmsn_cube.sources.earthengine's docstring)."""
    n, height, width = next(iter(bands.values())).shape
    times = pd.to_datetime([pd.Timestamp(d) + pd.Timedelta(hours=2, minutes=55) for d in days[:n]]).as_unit("us")
    x = transform[2] + transform[0] / 2 + np.arange(width) * transform[0]
    y = transform[5] + transform[4] / 2 + np.arange(height) * transform[4]
    data_vars = {}
    for name, values in bands.items():
        precision = "int" if name == "QA_PIXEL" or name.startswith("SR_") else "float"
        attrs = {
            "id": name,
            "data_type": str({"type": "PixelType", "precision": precision}),
            "dimensions": [width, height],
            "crs": crs,
            "crs_transform": [1, 0, 0, 0, 1, 0],
        }
        variable = xr.Variable(("time", "y", "x"), values.astype("float32"), attrs)
        variable.encoding = {"source": name, "scale_factor": np.float64(30.0), "dtype": np.dtype("float32")}
        data_vars[name] = variable
    return xr.Dataset(data_vars, coords={"time": times, "y": y, "x": x}, attrs={})


# ------------------------------------------------------------------------------------------- band maps


def test_band_maps_and_collections_for_every_sensor_and_product():
    assert eee.sensor_band_names("LANDSAT_5") == eee.sensor_band_names("LANDSAT_7") == L5
    assert eee.sensor_band_names("LANDSAT_8") == eee.sensor_band_names("LANDSAT_9") == L8
    assert eee.sensor_band_names("LANDSAT_7", "sr") == SR_L5
    assert eee.sensor_band_names("LANDSAT_9", "sr") == SR_L8
    assert eee.COLLECTIONS == {
        "LANDSAT_5": "LANDSAT/LT05/C02/T1_TOA",
        "LANDSAT_7": "LANDSAT/LE07/C02/T1_TOA",
        "LANDSAT_8": "LANDSAT/LC08/C02/T1_TOA",
        "LANDSAT_9": "LANDSAT/LC09/C02/T1_TOA",
    }
    assert eee.SR_COLLECTIONS == {
        "LANDSAT_5": "LANDSAT/LT05/C02/T1_L2",
        "LANDSAT_7": "LANDSAT/LE07/C02/T1_L2",
        "LANDSAT_8": "LANDSAT/LC08/C02/T1_L2",
        "LANDSAT_9": "LANDSAT/LC09/C02/T1_L2",
    }
    with pytest.raises(RegionError, match="product must be one of.*'boa'"):
        eee.collection_id("LANDSAT_8", "boa")
    with pytest.raises(RegionError, match="sensor must be one of.*LANDSAT_4"):
        eee.plan_pull(sensor="LANDSAT_4", start="2013-05-01", end="2013-05-31", bbox=(114.2, 30.5, 114.3, 30.6))


@pytest.mark.parametrize(
    "sensor, product, bands",
    [
        ("LANDSAT_5", "toa", L5),
        ("LANDSAT_7", "toa", L5),
        ("LANDSAT_8", "toa", L8),
        ("LANDSAT_9", "toa", L8),
        ("LANDSAT_5", "sr", SR_L5),
        ("LANDSAT_7", "sr", SR_L5),
        ("LANDSAT_8", "sr", SR_L8),
        ("LANDSAT_9", "sr", SR_L8),
    ],
)
def test_collection_is_built_and_serialized_for_each_sensor(ee_offline, ee_fake, sensor, product, bands):
    from ee import serializer

    resolve, invocations, constant = ee_fake.resolve, ee_fake.invocations, ee_fake.constant
    collection = eee.build_collection(
        sensor,
        product=product,
        start="2013-05-01",
        end="2013-05-31",
        bbox=(114.2, 30.5, 114.3, 30.6),
        wrs_path=123,
        wrs_row=39,
    )
    tree = resolve(serializer.encode(collection, for_cloud_api=True))
    expected_id = (eee.SR_COLLECTIONS if product == "sr" else eee.COLLECTIONS)[sensor]
    assert {constant(load["id"]) for load in invocations(tree, "ImageCollection.load")} == {expected_id}
    selections = [constant(args["bandSelectors"]) for args in invocations(tree, "Image.select")]
    assert [*bands, "QA_PIXEL"] in selections
    filters = {(constant(a["leftField"]), constant(a["rightValue"])) for a in invocations(tree, "Filter.equals")}
    assert filters == {("WRS_PATH", 123), ("WRS_ROW", 39)}
    # the window's end is included: filterDate gets the next day
    ranges = [(a["start"].get("constantValue"), a["end"].get("constantValue")) for a in invocations(tree, "DateRange")]
    assert ("2013-05-01", "2013-06-01") in ranges
    assert invocations(tree, "ImageCollection.mosaic") and invocations(tree, "ImageCollection.fromImages")
    assert invocations(tree, "Collection.filterBounds") or invocations(tree, "Filter.intersects")


def test_xee_to_cube_from_xee_layout_l8():
    bands = scene(30, 40)
    ds = xee_like(bands)
    with dask.config.set(scheduler=_raise_on_compute):
        cube = eee.xee_to_cube(ds.chunk({"time": 1, "y": 16, "x": 16}), sensor="LANDSAT_8")
    assert cube["reflectance"].chunks is not None
    validate_cube(cube, require=("reflectance", "qa_pixel", "cloud_mask"))
    assert cube["reflectance"].dims == ("time", "band", "y", "x")
    assert list(cube["band"].values) == list(BANDS)
    assert cube["reflectance"].dtype == np.float32 and cube["qa_pixel"].dtype == np.uint16
    assert cube.rio.crs.to_epsg() == 32650
    assert list(cube["sensor"].values) == ["LANDSAT_8"] * 4
    assert cube["time"].dtype == np.dtype("datetime64[ns]")
    cube = cube.compute()
    for common, name in zip(BANDS, L8, strict=True):
        np.testing.assert_array_equal(cube["reflectance"].sel(band=common).values, bands[name])
    qa = cube["qa_pixel"].values
    assert (qa[0, -3:, -4:] & (1 << QA_BITS["fill"])).all()  # masked -> fill bit
    assert not cube["cloud_mask"].values[0, -3:, -4:].any()  # fill is not cloud
    assert cube["cloud_mask"].values[1, :4].all() and not cube["cloud_mask"].values[1, 4:-1].any()
    assert cube["cloud_mask"].values[:, -1, :3].all()  # shadow counts as cloud
    np.testing.assert_allclose(eee.cloud_fraction(cube).values, expected_fractions(bands))


def test_xee_to_cube_l5_band_map_and_wrong_sensor():
    bands = scene(8, 10, bands=L5)
    cube = eee.xee_to_cube(xee_like(bands), sensor="LANDSAT_5")
    np.testing.assert_array_equal(cube["reflectance"].sel(band="blue").values, bands["B1"])
    np.testing.assert_array_equal(cube["reflectance"].sel(band="nir").values, bands["B4"])
    with pytest.raises(BandMismatchError, match="B5"):
        eee.xee_to_cube(xee_like(bands), sensor="LANDSAT_8")


def test_xee_to_cube_l9_band_map():
    days = ["2022-05-04", "2022-05-20", "2022-06-05", "2022-06-21"]
    bands = scene(8, 10)
    bands["B1"] = np.full_like(bands["B2"], 0.9)  # OLI-2 coastal aerosol: not blue
    cube = eee.xee_to_cube(xee_like(bands, days=days), sensor="LANDSAT_9")
    for common, name in zip(BANDS, L8, strict=True):
        np.testing.assert_array_equal(cube["reflectance"].sel(band=common).values, bands[name])
    assert list(cube["sensor"].values) == ["LANDSAT_9"] * 4 and not cube["slc_off"].values.any()
    assert (cube.attrs["collection_id"], cube.attrs["product"]) == ("LANDSAT/LC09/C02/T1_TOA", "toa")
    assert "slc_off_gap" not in cube["cloud_mask"].attrs["flags"]


def test_sr_scaling_stays_lazy_and_needs_sr_bands():
    bands = sr_scene(8, 10)
    ds = xee_like(bands).chunk({"time": 1, "y": 4, "x": 4})
    with dask.config.set(scheduler=_raise_on_compute):
        cube = eee.xee_to_cube(ds, sensor="LANDSAT_8", product="sr")
    assert cube["reflectance"].chunks is not None
    cube = cube.compute()
    np.testing.assert_allclose(cube["reflectance"].sel(band="nir").values, expected_sr(bands["SR_B5"]), atol=1e-6)
    with pytest.raises(BandMismatchError, match="SR_B"):
        eee.xee_to_cube(xee_like(scene(8, 10)), sensor="LANDSAT_8", product="sr")


def test_landsat7_toa_stripes_become_gaps_only_after_the_slc_failure():
    days = ["2003-05-15", "2003-05-31", "2003-06-01", "2003-07-18"]
    bands = scene(9, 14, bands=L5)
    gaps = stripes(9, 14)  # on dates 1-3; date 1 is the failure day itself, its scene still whole
    for name in L5:
        bands[name][gaps] = np.nan  # the TOA collection masks the stripes; QA_PIXEL flags them fill
    bands["QA_PIXEL"][gaps] = 1.0
    cube = eee.xee_to_cube(xee_like(bands, days=days), sensor="LANDSAT_7").compute()
    assert list(cube["slc_off"].values) == [False, False, True, True]
    mask = cube["cloud_mask"].values
    assert mask[2:][gaps[2:]].all() and not mask[1][gaps[1]].any()
    np.testing.assert_array_equal(slc_off_gaps(cube).values, gaps & np.array([0, 0, 1, 1], bool)[:, None, None])
    assert cube["cloud_mask"].attrs["flags"].endswith(",slc_off_gap")
    # the same pixels from Landsat 5 are plain no data, not gaps in the mask
    l5 = eee.xee_to_cube(xee_like(bands, days=days), sensor="LANDSAT_5")
    assert not l5["slc_off"].values.any() and not l5["cloud_mask"].values[gaps].any()


def test_xee_encoding_does_not_scale_the_store(tmp_path):
    """xee puts scale_factor=30 (the pixel size) in each variable's encoding: it must not reach Zarr."""
    bands = scene(8, 10)
    cube = eee.xee_to_cube(xee_like(bands), sensor="LANDSAT_8")
    back = open_cube(write_cube(cube, tmp_path / "c.zarr")).compute()
    np.testing.assert_array_equal(back["reflectance"].sel(band="red").values, bands["B4"])


def test_xee_to_cube_sorts_time_and_accepts_old_dim_names():
    bands = scene(6, 5)
    ds = xee_like(bands).isel(time=[2, 0, 3, 1]).rename({"x": "X", "y": "Y"}).transpose("time", "X", "Y")
    cube = eee.xee_to_cube(ds, sensor="LANDSAT_8")
    assert [str(t)[:10] for t in cube["time"].values] == DAYS
    np.testing.assert_array_equal(cube["reflectance"].sel(band="green").values, bands["B3"])


# ---------------------------------------------------------------------------------------- date choice


def test_choose_dates_by_cloud_level():
    bands = scene(30, 40)
    cube = eee.xee_to_cube(xee_like(bands), sensor="LANDSAT_8").chunk({"time": 1})
    chosen = eee.choose_dates(cube, levels=(0.25, 0.15, 0.10))
    fractions = expected_fractions(bands)  # [~0.30, ~0.13, ~0.03, ~0.23]
    assert [str(t)[:10] for t in chosen["time"].values] == [DAYS[1], DAYS[2], DAYS[3]]
    np.testing.assert_allclose(chosen["cloud_fraction"].values, fractions[[1, 2, 3]])
    assert chosen["reflectance"].chunks is not None  # still lazy


def test_choose_dates_explicit_and_missing():
    cube = eee.xee_to_cube(xee_like(scene(6, 5)), sensor="LANDSAT_8")
    chosen = eee.choose_dates(cube, dates=["2013-06-29", "2013-05-12"])
    assert [str(t)[:10] for t in chosen["time"].values] == ["2013-05-12", "2013-06-29"]
    with pytest.raises(MissingDateError, match="2013-06-01"):
        eee.choose_dates(cube, dates=["2013-06-01"])


# ------------------------------------------------------------------------------------------- the plan


def test_plan_of_the_seed_regions_offline():
    wuhan = eee.plan_region("wuhan", config=REGIONS)
    assert (wuhan.sensor, wuhan.collection_id, wuhan.crs) == ("LANDSAT_8", "LANDSAT/LC08/C02/T1_TOA", "EPSG:32650")
    assert (wuhan.wrs_path, wuhan.wrs_row, wuhan.levels) == (123, 39, (0.25, 0.15, 0.10))
    nsw = eee.plan_region("new_south_wales", config=REGIONS, use_dates=True)
    assert (nsw.sensor, nsw.crs, nsw.bands) == ("LANDSAT_5", "EPSG:32755", (*L5, "QA_PIXEL"))
    assert nsw.dates == ("2004-11-24", "2004-12-26", "2005-01-11")
    for plan in (wuhan, nsw):
        width, height = plan.shape_2d
        assert 450 <= width <= 600 and 450 <= height <= 600  # ~15 km at 30 m
        a, _, c, _, e, f = plan.crs_transform
        assert (a, e) == (30.0, -30.0) and c % 30 == 0 and f % 30 == 0
        assert plan.pixel_count == width * height
        assert plan.expected_store_mb == pytest.approx(3 * width * height * 19 / 2**20)


def test_plan_grid_covers_the_bbox():
    from pyproj import Transformer

    plan = eee.plan_pull(sensor="LANDSAT_8", start="2013-05-01", end="2013-05-31", bbox=(114.2, 30.5, 114.3, 30.6))
    to_utm = Transformer.from_crs("EPSG:4326", plan.crs, always_xy=True)
    a, _, c, _, e, f = plan.crs_transform
    width, height = plan.shape_2d
    for lon in np.linspace(114.2, 114.3, 11):
        for lat in (30.5, 30.6):
            x, y = to_utm.transform(lon, lat)
            assert c <= x <= c + width * a and f + height * e <= y <= f


def test_dry_run_through_the_cli():
    result = CliRunner().invoke(main, ["pull", "--region", "wuhan", "--config", str(REGIONS), "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = eee.plan_region("wuhan", config=REGIONS)
    for text in ("LANDSAT/LC08/C02/T1_TOA", "B2, B3, B4, B5, QA_PIXEL", "EPSG:32650", f"{plan.pixel_count:,}", "MB"):
        assert text in result.output
    result = CliRunner().invoke(
        main,
        [
            "pull",
            "--bbox",
            "145.2,-34.5,145.3,-34.4",
            "--start",
            "2004-11-01",
            "--end",
            "2005-01-31",
            "--sensor",
            "LANDSAT_5",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "EPSG:32755" in result.output and "LANDSAT/LT05/C02/T1_TOA" in result.output
    result = CliRunner().invoke(main, ["pull", "--bbox", "1,2,3", "--start", "2004-11-01", "--end", "2005-01-31"])
    assert result.exit_code != 0 and "W,S,E,N" in result.output


@pytest.mark.parametrize(
    "sensor, product, collection, bands",
    [
        ("LANDSAT_9", "sr", "LANDSAT/LC09/C02/T1_L2", "SR_B2, SR_B3, SR_B4, SR_B5, QA_PIXEL"),
        ("LANDSAT_9", "toa", "LANDSAT/LC09/C02/T1_TOA", "B2, B3, B4, B5, QA_PIXEL"),
        ("LANDSAT_7", "sr", "LANDSAT/LE07/C02/T1_L2", "SR_B1, SR_B2, SR_B3, SR_B4, QA_PIXEL"),
        ("LANDSAT_7", "toa", "LANDSAT/LE07/C02/T1_TOA", "B1, B2, B3, B4, QA_PIXEL"),
    ],
)
def test_dry_run_prints_the_collection_of_sensor_and_product(sensor, product, collection, bands):
    args = ["pull", "--bbox", "114.2,30.5,114.3,30.6", "--start", "2022-05-01", "--end", "2022-05-31"]
    result = CliRunner().invoke(main, [*args, "--sensor", sensor, "--product", product, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert collection in result.output and bands in result.output
    assert ("DN * 2.75e-05 - 0.2, clipped to [0, 1]" in result.output) == (product == "sr")
    assert ("slc-off" in result.output) == (sensor == "LANDSAT_7")


def test_dry_run_product_for_a_region_and_a_bad_product():
    result = CliRunner().invoke(
        main, ["pull", "--region", "wuhan", "--config", str(REGIONS), "--product", "sr", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "LANDSAT/LC08/C02/T1_L2 (LANDSAT_8, surface reflectance)" in result.output and "SR_B2" in result.output
    assert eee.plan_region("wuhan", config=REGIONS, product="sr").product == "sr"
    result = CliRunner().invoke(main, ["pull", "--region", "wuhan", "--config", str(REGIONS), "--product", "boa"])
    assert result.exit_code == 2 and "'boa' is not one of 'toa', 'sr'" in result.output


# -------------------------------------------------------------------------------------- credentials


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    import ee

    ee.Reset()
    monkeypatch.setenv("HOME", str(tmp_path))
    for variable in (*eee.CREDENTIAL_ENV_VARS, *eee.PROJECT_ENV_VARS, "CLOUDSDK_CONFIG"):
        monkeypatch.delenv(variable, raising=False)
    yield
    ee.Reset()


def test_no_credentials_fail_fast(no_credentials):
    began = time.monotonic()
    with pytest.raises(EarthEngineError) as error:
        eee.initialize_earthengine()
    assert time.monotonic() - began < 5
    message = str(error.value)
    assert (
        "earthengine authenticate" in message and "EE_SERVICE_ACCOUNT_KEY" in message and "cmsn-cube synth" in message
    )


def test_no_credentials_through_the_cli(no_credentials, tmp_path):
    began = time.monotonic()
    result = CliRunner().invoke(
        main, ["pull", "--region", "wuhan", "--config", str(REGIONS), "--out", str(tmp_path / "w.zarr")]
    )
    assert time.monotonic() - began < 5
    assert result.exit_code == 1 and "earthengine authenticate" in result.output
    assert not (tmp_path / "w.zarr").exists()


def test_key_variable_naming_no_file(no_credentials, monkeypatch, tmp_path):
    monkeypatch.setenv("EE_SERVICE_ACCOUNT_KEY", str(tmp_path / "missing.json"))
    with pytest.raises(EarthEngineError, match="EE_SERVICE_ACCOUNT_KEY=.*names no file"):
        eee.initialize_earthengine()


# ------------------------------------------------------------------- the real xee backend, end to end


def test_pull_region_through_the_real_xee_backend(ee_offline, ee_fake, monkeypatch, tmp_path):
    invocations, constant = ee_fake.invocations, ee_fake.constant
    plan = eee.plan_pull(
        sensor="LANDSAT_8",
        start="2013-05-01",
        end="2013-07-15",
        bbox=(114.25, 30.55, 114.26, 30.56),
        wrs_path=123,
        wrs_row=39,
        name="tiny",
    )
    width, height = plan.shape_2d
    bands = scene(height, width)
    times_ms = [int(pd.Timestamp(d + "T02:55:00").value // 10**6) for d in DAYS]
    server = ee_fake.Server(
        crs=plan.crs,
        crs_transform=plan.crs_transform,
        times_ms=times_ms,
        bands=bands,
        band_types={
            **{b: {"type": "PixelType", "precision": "float"} for b in L8},
            "QA_PIXEL": {"type": "PixelType", "precision": "int", "min": 0, "max": 65535},
        },
    ).install(monkeypatch)

    # what xee returns, opened for real on the fake server
    ds = eee.open_xee(plan, chunks={"time": 1, "y": 16, "x": 16})
    assert list(ds.data_vars) == [*L8, "QA_PIXEL"]
    assert all(ds[v].dims == ("time", "y", "x") and ds[v].dtype == np.float32 for v in ds.data_vars)
    assert ds.sizes == {"time": 4, "y": height, "x": width}
    assert ds["B2"].attrs["crs"] == plan.crs and ds["B2"].encoding["scale_factor"] == 30.0
    assert ds["y"].values[0] > ds["y"].values[-1]  # north up
    assert len(server.value_requests) == 1 and not server.pixel_requests  # metadata once, pixels lazily

    # the metadata request carries the collection built for real
    tree = server.value_requests[0]
    assert constant(invocations(tree, "ImageCollection.load")[0]["id"]) == "LANDSAT/LC08/C02/T1_TOA"
    assert invocations(tree, "ImageCollection.mosaic")

    path = eee.pull_region(
        plan, tmp_path / "tiny.zarr", chunks={"time": 1, "y": 16, "x": 16}, progress=False, collection=None
    )
    cube = open_cube(path).compute()
    fractions = expected_fractions(bands)
    assert [str(t)[:10] for t in cube["time"].values] == [DAYS[1], DAYS[2], DAYS[3]]
    np.testing.assert_allclose(cube["cloud_fraction"].values, fractions[[1, 2, 3]])
    for common, name in zip(BANDS, L8, strict=True):
        np.testing.assert_array_equal(cube["reflectance"].sel(band=common).values, bands[name][[1, 2, 3]])
    np.testing.assert_array_equal(cube["qa_pixel"].values, bands["QA_PIXEL"][[1, 2, 3]].astype("uint16"))
    rows = cloud_rows(1, height)
    assert cube["cloud_mask"].values[0, :rows].all() and not cube["cloud_mask"].values[0, rows:-1].any()
    assert cube.rio.crs.to_string() == plan.crs and list(cube["sensor"].values) == ["LANDSAT_8"] * 3
    assert cube.attrs["region"] == "tiny" and cube.attrs["wrs_path_row"] == "123/039"
    np.testing.assert_allclose(cube["x"].values[[0, -1]], plan.crs_transform[2] + 15 + 30 * np.array([0, width - 1]))
    # every pixel request asked for one band over a 16 x 16 (or edge) tile, as NumPy, on the plan's grid
    assert server.pixel_requests
    for request in server.pixel_requests:
        assert request["fileFormat"] == "NUMPY_NDARRAY" and request["grid"]["crsCode"] == plan.crs
        assert request["grid"]["dimensions"]["width"] <= 16 and request["grid"]["dimensions"]["height"] <= 16
    requested = {constant(invocations(r["tree"], "Image.addBands")[0]["names"])[0] for r in server.pixel_requests}
    assert requested == {*L8, "QA_PIXEL"}


def test_sr_pull_scales_digital_numbers(ee_offline, ee_fake, monkeypatch, tmp_path):
    invocations, constant = ee_fake.invocations, ee_fake.constant
    plan = eee.plan_pull(
        sensor="LANDSAT_8",
        product="sr",
        start="2013-05-01",
        end="2013-07-15",
        bbox=(114.25, 30.55, 114.26, 30.56),
        name="tiny_sr",
        dates=DAYS[1:],
    )
    assert plan.collection_id == "LANDSAT/LC08/C02/T1_L2" and plan.bands == (*SR_L8, "QA_PIXEL")
    width, height = plan.shape_2d
    bands = sr_scene(height, width)
    bands["SR_B2"][:, 5, 0] = 5000.0  # 5000 * 2.75e-5 - 0.2 = -0.0625: clipped to 0
    bands["SR_B5"][:, 5, 1] = 45000.0  # 1.0375: clipped to 1
    bands["SR_B4"][:, 6, 2] = 0.0  # Level-2 fill in one band, left unmasked by the server
    server = ee_fake.Server(
        crs=plan.crs,
        crs_transform=plan.crs_transform,
        times_ms=[int(pd.Timestamp(d + "T02:55:00").value // 10**6) for d in DAYS],
        bands=bands,
        band_types=int_types([*SR_L8, "QA_PIXEL"]),
    ).install(monkeypatch)

    path = eee.pull_region(plan, tmp_path / "sr.zarr", chunks={"time": 1, "y": 16, "x": 16}, progress=False)
    assert constant(invocations(server.value_requests[0], "ImageCollection.load")[0]["id"]) == plan.collection_id
    requested = {constant(invocations(r["tree"], "Image.addBands")[0]["names"])[0] for r in server.pixel_requests}
    assert requested == {*SR_L8, "QA_PIXEL"}  # digital numbers on the wire, scaled here
    cube = open_cube(path).compute()
    assert [str(t)[:10] for t in cube["time"].values] == DAYS[1:]
    assert (cube.attrs["product"], cube.attrs["reflectance"]) == ("sr", "SR")
    assert cube.attrs["collection_id"] == "LANDSAT/LC08/C02/T1_L2" and "T1_L2" in cube.attrs["source"]
    assert cube["reflectance"].attrs["long_name"] == "surface reflectance"
    # the numbers: blue of pixel (0, 0) on 2013-05-28 is DN 10100, green 11100, nir on 2013-06-29 13300
    blue, green, nir = (cube["reflectance"].sel(band=b).values for b in ("blue", "green", "nir"))
    assert blue[0, 0, 0] == pytest.approx(10100 * 2.75e-5 - 0.2, abs=1e-6) == pytest.approx(0.07775, abs=1e-6)
    assert green[0, 0, 0] == pytest.approx(0.10525, abs=1e-6) and nir[2, 0, 0] == pytest.approx(0.16575, abs=1e-6)
    assert (blue[:, 5, 0] == 0).all() and (nir[:, 5, 1] == 1).all()
    fill = np.zeros((3, height, width), dtype=bool)
    fill[:, 6, 2] = True
    for common, name in zip(BANDS, SR_L8, strict=True):
        expected = np.where(fill, np.nan, expected_sr(bands[name][1:]))
        np.testing.assert_allclose(cube["reflectance"].sel(band=common).values, expected, rtol=0, atol=1e-6)
    assert (cube["qa_pixel"].values[fill] & 1).all() and not cube["cloud_mask"].values[fill].any()
    assert float(cube["reflectance"].min()) == 0 and float(cube["reflectance"].max()) == 1


def test_landsat7_sr_slc_off_stripes_are_masked_gaps(ee_offline, ee_fake, monkeypatch, tmp_path):
    from cmsn_cube.inference import model_channels
    from cmsn_cube.qa import cloud_fraction

    plan = eee.plan_pull(
        sensor="LANDSAT_7",
        product="sr",
        start="2003-05-01",
        end="2003-07-31",
        bbox=(145.25, -34.45, 145.26, -34.44),
        dates=L7_DAYS,
    )
    assert plan.collection_id == "LANDSAT/LE07/C02/T1_L2" and plan.bands == (*SR_L5, "QA_PIXEL")
    assert plan.slc_off and "slc-off" in plan.describe()
    width, height = plan.shape_2d
    bands = sr_scene(height, width, bands=SR_L5)
    gaps = stripes(height, width)
    # as Collection 2 Level-2 has them: DN 0 and QA_PIXEL fill (1); on the last date masked by the server instead
    for name in SR_L5:
        bands[name][1:3][gaps[1:3]] = 0.0
        bands[name][3][gaps[3]] = np.nan
    bands["QA_PIXEL"][1:3][gaps[1:3]] = 1.0
    bands["QA_PIXEL"][3][gaps[3]] = np.nan
    ee_fake.Server(
        crs=plan.crs,
        crs_transform=plan.crs_transform,
        times_ms=[int(pd.Timestamp(d + "T23:40:00").value // 10**6) for d in L7_DAYS],
        bands=bands,
        band_types=int_types([*SR_L5, "QA_PIXEL"]),
    ).install(monkeypatch)

    cube = eee.xee_to_cube(eee.open_xee(plan, chunks={"time": 1, "y": 16, "x": 16}), sensor="LANDSAT_7", product="sr")
    cube = cube.compute()
    assert list(cube["slc_off"].values) == [False, True, True, True]
    assert list(cube["sensor"].values) == ["LANDSAT_7"] * 4 and cube.attrs["product"] == "sr"
    corner = np.zeros_like(gaps)
    corner[0, -3:, -4:] = True  # outside the footprint before the failure: no data, not a gap of the mask
    no_data = gaps | corner
    reflectance = cube["reflectance"].values
    np.testing.assert_array_equal(np.isnan(reflectance).all(axis=1), no_data)
    assert np.isfinite(reflectance[~np.broadcast_to(no_data[:, None], reflectance.shape)]).all()
    np.testing.assert_array_equal((cube["qa_pixel"].values & 1) != 0, no_data)
    cloudy = np.isin(bands["QA_PIXEL"], [_CLOUD, _SHADOW]) & ~no_data
    np.testing.assert_array_equal(cube["cloud_mask"].values, cloudy | gaps)
    np.testing.assert_array_equal(slc_off_gaps(cube).values, gaps)
    # the stripes do not count as cloud: fractions are of the pixels with data
    valid = ~no_data
    np.testing.assert_allclose(cloud_fraction(cube).values, (cloudy & valid).sum((1, 2)) / valid.sum((1, 2)))
    # and the reconstruction fills them: its input zeroes them and flags them in the mask channel
    channels, to_fill = model_channels(reflectance, cube["cloud_mask"].values)
    assert to_fill[gaps].all() and (channels[:, -1][gaps] == 1).all()
    assert (channels[:, :-1].transpose(1, 0, 2, 3)[:, gaps] == 0).all()
    back = open_cube(write_cube(cube, tmp_path / "l7.zarr"))
    assert list(back["slc_off"].values) == [False, True, True, True] and back.attrs["product"] == "sr"
    np.testing.assert_array_equal(back["cloud_mask"].values, cloudy | gaps)


def test_masked_pixels_from_the_server_become_fill(ee_offline, ee_fake, monkeypatch):
    plan = eee.plan_pull(
        sensor="LANDSAT_8", start="2013-05-01", end="2013-07-15", bbox=(114.25, 30.55, 114.255, 30.555)
    )
    width, height = plan.shape_2d
    bands = scene(height, width)
    ee_fake.Server(
        crs=plan.crs,
        crs_transform=plan.crs_transform,
        times_ms=[int(pd.Timestamp(d).value // 10**6) for d in DAYS],
        bands=bands,
        band_types={
            **{b: {"type": "PixelType", "precision": "float"} for b in L8},
            "QA_PIXEL": {"type": "PixelType", "precision": "int"},
        },
    ).install(monkeypatch)
    cube = eee.xee_to_cube(eee.open_xee(plan), sensor="LANDSAT_8").isel(time=0).compute()
    assert np.isnan(cube["reflectance"].values[:, -3:, -4:]).all()
    assert (cube["qa_pixel"].values[-3:, -4:] == 1).all() and not cube["cloud_mask"].values[-3:, -4:].any()
    assert np.isfinite(cube["reflectance"].values[:, :-3]).all()
