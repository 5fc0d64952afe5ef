"""The STAC source never guesses silently: the scaling the items declare wins, and no request waits forever.

Scaling: one item of a real local catalog (a crop of a real Collection 2 Level-2 scene from ../shared/data, as in
test_stac.py) whose COGs hold the same reflectance stored as DN x 1e-4 - 0.1, and say so in ``raster:bands``.
Timeouts: a server on 127.0.0.1 that accepts connections and never answers (nothing else is contacted).
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from stac_items import set_footprint

from cmsn_cube.exceptions import ArgumentError, CubeValidationError
from cmsn_cube.testing import shared_data_path

FOLDER = shared_data_path("landsat8_c2l2_qa_pixel")
pystac = pytest.importorskip("pystac", reason='the stac extra is not installed (pip install "cmsn-cube[stac]")')
pytest.importorskip("odc.stac", reason='the stac extra is not installed (pip install "cmsn-cube[stac]")')
pytest.importorskip("pystac_client", reason='the stac extra is not installed (pip install "cmsn-cube[stac]")')

from cmsn_cube.sources import stac  # noqa: E402  (after the skips)

needs_data = pytest.mark.skipif(FOLDER is None, reason="shared data (../shared/data or $CMSN_SHARED_DATA) absent")

CRS = "EPSG:32619"
LEFT, TOP, SIZE = 600_015.0, 1_200_015.0, 64
SCENE = "LC08_L2SP_001070_20190114_20200830_02_T2"
BBOX = (-68.081, 10.841, -68.072, 10.85)  # inside the crop's footprint
WINDOW = {"start": "2019-01-01", "end": "2019-01-31"}
ASSETS = {"blue": "SR_B2", "green": "SR_B3", "red": "SR_B4", "nir08": "SR_B5", "qa_pixel": "QA_PIXEL"}
#: How the test's COGs store reflectance (the product table's is DN x 2.75e-5 - 0.2)
SCALE, OFFSET = 1e-4, -0.1


def _write_cog(array: np.ndarray, path: Path, nodata: int) -> None:
    import rioxarray  # noqa: F401
    import xarray as xr

    x = LEFT + 15 + 30 * np.arange(array.shape[1])
    y = TOP - 15 - 30 * np.arange(array.shape[0])
    da = xr.DataArray(array, dims=("y", "x"), coords={"y": y, "x": x}).rio.write_crs(CRS).rio.write_nodata(nodata)
    da.rio.to_raster(path, driver="COG")


def _item(folder: Path, *, hrefs: dict[str, str] | None = None) -> pystac.Item:
    """One item, raster:bands declaring DN x 1e-4 - 0.1; ``hrefs`` replaces the asset files (no pixels written)."""
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension

    item = pystac.Item(
        id=SCENE,
        geometry=None,
        bbox=None,
        datetime=dt.datetime(2019, 1, 14, 14, 31, 40, tzinfo=dt.UTC),
        properties={"platform": "landsat-8", "eo:cloud_cover": 10.0},
    )
    for key, band in ASSETS.items():
        is_qa = band == "QA_PIXEL"
        href = (hrefs or {}).get(key, str(folder / f"{band}.tif"))
        asset = pystac.Asset(href=href, media_type=pystac.MediaType.COG, roles=["data"])
        item.add_asset(key, asset)
        declared = {} if is_qa else {"scale": SCALE, "offset": OFFSET}
        RasterExtension.ext(asset, add_if_missing=True).bands = [
            RasterBand.create(nodata=1 if is_qa else 0, data_type=DataType.UINT16, **declared)
        ]
    set_footprint(item, crs=CRS, left=LEFT, top=TOP, height=SIZE, width=SIZE)
    return item


@needs_data
def test_the_scale_and_offset_the_items_declare_are_applied(tmp_path):
    import rasterio
    from rasterio.windows import Window

    stored = {}
    for key, band in ASSETS.items():
        with rasterio.open(FOLDER / f"{SCENE}_{band}.TIF") as src:
            dn = src.read(1, window=Window(352, 192, SIZE, SIZE))
        if band != "QA_PIXEL":
            # the scene's own reflectance, stored as this catalog's DN: (DN x 2.75e-5 - 0.2 - OFFSET) / SCALE
            reflectance = dn.astype("float64") * 2.75e-5 - 0.2
            dn = np.where(dn == 0, 0, np.clip(np.round((reflectance - OFFSET) / SCALE), 1, 65535)).astype("uint16")
        stored[key] = dn
        _write_cog(dn, tmp_path / f"{band}.tif", 1 if band == "QA_PIXEL" else 0)

    cube = stac.open_stac([_item(tmp_path)], bbox=BBOX, **WINDOW).compute()

    assert cube.sizes["time"] == 1
    col = np.rint((cube.x.values - LEFT - 15) / 30).astype(int)
    row = np.rint((TOP - 15 - cube.y.values) / 30).astype(int)
    window = np.ix_(row, col)
    fill = (stored["qa_pixel"][window] & 1) == 1
    for b, key in enumerate(("blue", "green", "red", "nir08")):
        dn = stored[key][window]
        expected = np.clip(dn.astype("float64") * SCALE + OFFSET, 0.0, 1.0).astype("float32")
        expected[(dn == 0) | fill] = np.nan
        np.testing.assert_array_equal(cube.reflectance.values[0, b], expected)
    # the real scene is bright enough for the difference to show: the product table's scale would give ~0
    assert float(cube.reflectance.sel(band="nir").mean()) > 0.1


def test_product_scaling_where_items_declare_none():
    asset = pystac.Asset(href="x.tif", extra_fields={"raster:bands": [{"nodata": 0, "data_type": "uint16"}]})
    assert stac.products.declared_scaling(asset) is None
    asset.extra_fields["raster:bands"][0].update(scale=2.75e-5, offset=-0.2)
    assert stac.products.declared_scaling(asset) == (2.75e-5, -0.2)
    # STAC 1.1 writes them on the asset (or its bands) as raster:scale / raster:offset; a missing offset is 0
    assert stac.products.declared_scaling(pystac.Asset(href="x.tif", extra_fields={"raster:scale": 1e-4})) == (1e-4, 0)


# ------------------------------------------------------------------------------------------------ timeouts


@pytest.fixture
def silent_server():
    """A server on 127.0.0.1 (a free port) that accepts every connection and never answers; yields its URL."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop, accepted = threading.Event(), []

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])  # kept open, never read from nor written to
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


@pytest.mark.timeout(60)
def test_a_search_gives_up_on_a_server_that_never_answers(silent_server):
    started = time.monotonic()
    with pytest.raises(ArgumentError, match=rf"^the STAC catalog {silent_server} did not answer within 1 s"):
        stac.find_items(silent_server, bbox=BBOX, **WINDOW, timeout=1)
    assert time.monotonic() - started < 3  # one try: a timed-out request is not sent again
    with pytest.raises(ArgumentError, match="timeout must be > 0"):
        stac.find_items(silent_server, bbox=BBOX, **WINDOW, timeout=0)


@pytest.mark.timeout(60)
def test_cli_pull_dry_run_gives_up_in_one_line(silent_server):
    from click.testing import CliRunner

    from cmsn_cube.cli import main

    bbox = ",".join(str(v) for v in BBOX)
    args = ["pull", "--stac", silent_server, "--bbox", bbox, "--start", WINDOW["start"], "--end", WINDOW["end"]]
    started = time.monotonic()
    result = CliRunner().invoke(main, [*args, "--dry-run", "--timeout", "1"])
    assert time.monotonic() - started < 3
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: the STAC catalog {silent_server} did not answer within 1 s")
    # --timeout is a STAC option
    result = CliRunner().invoke(main, ["pull", "--bbox", bbox, "--timeout", "1", "--dry-run"])
    assert result.exit_code == 2 and "--timeout" in result.output


@pytest.mark.timeout(120)
def test_an_asset_read_gives_up_on_a_server_that_never_answers(silent_server, tmp_path):
    """Planning reads metadata only; the lazy read of an asset on the silent server fails after the timeout."""
    hrefs = {key: f"{silent_server}{band}.tif" for key, band in ASSETS.items()}
    plan = stac.plan_stac([_item(tmp_path, hrefs=hrefs)], bbox=BBOX, **WINDOW)
    cube = stac.load_stac(plan, timeout=1)
    started = time.monotonic()
    message = rf"^cannot read the STAC asset {silent_server}(SR_B[2-5]|QA_PIXEL).tif: .*timed out"
    with pytest.raises(CubeValidationError, match=message) as error:
        cube.reflectance.isel(band=0).compute()
    assert time.monotonic() - started < 15, "1 s per request, two more tries"
    assert "\n" not in str(error.value)
