"""End-to-end time of one scene from a local STAC catalog: pull -> reconstruct -> export, as a user runs them.

First (not timed; its time is printed apart) a static STAC catalog is built with pystac: one ``landsat-c2-l2``
collection of 3 Landsat 8 Collection 2 Level-2 items with the Planetary Computer's asset keys (``blue``,
``green``, ``red``, ``nir08``, ``qa_pixel``), ``eo:cloud_cover``, ``platform`` and the projection extension, as
``tests/sources/test_stac.py`` builds its catalog. Their COGs (``--size``² px, 30 m, UTM 50N) hold the embedded
synthetic scene encoded as Collection 2 Level-2 digital numbers: DN = round((SR + 0.2) / 2.75e-5) (uint16, DN 0
is fill) and QA_PIXEL with the cloud bit and high cloud confidence where the scene is cloudy, the clear bit
elsewhere. The scene sits on the zone's central meridian just north of the equator, where the UTM grid runs
along meridians and parallels, so that its lon/lat bounds plan exactly the scene's own grid.

Then, in this one process, each stage timed with ``time.perf_counter``:

- ``plan``: ``open_stac`` (items found, 3 dates chosen by ``eo:cloud_cover``, grid, the lazy odc-stac load);
- ``pull``: ``write_cube`` of that cube to Zarr (local threaded scheduler, as ``cmsn-cube pull --stac``);
- ``reconstruct``: ``reconstruct(open_cube(store))`` and ``write_reconstruction`` on the LocalCluster of
  ``get_client`` (one worker process per core), as ``cmsn-cube reconstruct``: cluster start and close included;
- ``export``: ``to_cogs(open_reconstruction(...))``, as ``cmsn-cube export``;

and prints each in seconds and in megapixels of output per second (dates x H x W), then the total. A check
(not timed) compares the pulled cube with the scene it was encoded from.

Usage::

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:glibc.malloc.arena_max=1 \\
        python benchmarks/bench_stac.py [--size 2048] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cmsn_cube.testing import claim_workdir

#: Seed of the synthetic scene.
SEED = 7
#: UTM 50N: the synthetic scene's default CRS. Its central meridian (117 E) is at x = 500 km.
CRS = "EPSG:32650"
#: Collection 2 Level-2 surface reflectance: SR = DN x SCALE + OFFSET (USGS Science Product Guide).
SCALE, OFFSET = 2.75e-5, -0.2
#: Landsat 8 overpass time of day (UTC) near 117 E: about 10:20 local solar time.
OVERPASS = dt.timedelta(hours=2, minutes=30)
#: The outputs of a run under the work folder (replaced by the next run).
PARTS = ("data", "stac", "cube.zarr", "reconstruction.zarr", "cogs")


def _origin(size: int) -> tuple[float, float]:
    """Upper-left corner of the scene: centred on the central meridian, its bottom edge ~1 km north of the
    equator; pixel edges at 15 m offsets, as Landsat's."""
    return 30.0 * (500_000 // 30 - size // 2) + 15.0, 30.0 * (size + 32) + 15.0


def _write_cog(array: np.ndarray, path: Path, x: np.ndarray, y: np.ndarray, nodata: int) -> None:
    import rioxarray  # noqa: F401  (the .rio accessor)
    import xarray as xr

    da = xr.DataArray(array, dims=("y", "x"), coords={"y": y, "x": x}).rio.write_crs(CRS).rio.write_nodata(nodata)
    da.rio.to_raster(path, driver="COG")


def build_catalog(root: Path, size: int) -> tuple[Path, tuple[float, float, float, float], str, str, object]:
    """Write the catalog under ``root``; returns its ``catalog.json``, the scene's lon/lat bbox (inset by half a
    pixel, so that the planned grid snaps onto the scene's edges), the first and last day, and the scene."""
    import pystac
    import xarray as xr
    from pystac.extensions.eo import EOExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension
    from rasterio.warp import transform_bounds, transform_geom
    from tqdm import tqdm

    from cmsn_cube.cube import BANDS
    from cmsn_cube.qa import QA_BITS, QA_CONFIDENCE_BITS, cloud_mask_from_qa
    from cmsn_cube.sources.synthetic import synthetic_scene

    scene = synthetic_scene(height=size, width=size, seed=SEED, sensor="LANDSAT_8", origin=_origin(size))
    scene = scene.drop_vars(["truth", "land_cover"])
    x, y = scene["x"].values, scene["y"].values
    left, top = float(x[0]) - 15, float(y[0]) + 15
    right, bottom = left + 30 * size, top - 30 * size
    footprint = transform_geom(
        CRS,
        "EPSG:4326",
        {"type": "Polygon", "coordinates": [[(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]]},
    )
    lons, lats = zip(*footprint["coordinates"][0], strict=True)
    keys = {"blue": "blue", "green": "green", "red": "red", "nir": "nir08"}
    cloud_word = (1 << QA_BITS["cloud"]) | (3 << QA_CONFIDENCE_BITS["cloud_confidence"])
    clear_word = 1 << QA_BITS["clear"]

    collection = pystac.Collection(
        id="landsat-c2-l2",
        description="Landsat Collection 2 Level-2 (synthetic scene) for bench_stac.py",
        extent=pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]])),
    )
    bar = tqdm(total=scene.sizes["time"] * 5, desc="writing COGs", unit="COG")
    for t, when in enumerate(scene["time"].values.astype("datetime64[s]").astype(dt.datetime)):
        item_id = f"LC08_L2SP_118060_{when:%Y%m%d}_02_T1"
        folder = root / "data" / item_id
        folder.mkdir(parents=True, exist_ok=True)
        cloud = scene["cloud_mask"].values[t]
        qa = np.where(cloud, cloud_word, clear_word).astype("uint16")
        # the reader's decoder must give back the scene's own mask
        assert (cloud_mask_from_qa(xr.DataArray(qa)).values == cloud).all(), "QA encoding does not decode back"
        item = pystac.Item(
            id=item_id,
            geometry=footprint,
            bbox=[min(lons), min(lats), max(lons), max(lats)],
            datetime=(when + OVERPASS).replace(tzinfo=dt.UTC),
            properties={"platform": "landsat-8", "instruments": ["oli", "tirs"]},
        )
        for band, key in [*keys.items(), ("qa_pixel", "qa_pixel")]:
            path = folder / f"{key}.tif"
            if key == "qa_pixel":
                _write_cog(qa, path, x, y, nodata=1 << QA_BITS["fill"])
                raster = RasterBand.create(nodata=1 << QA_BITS["fill"], data_type=DataType.UINT16)
            else:
                sr = scene["reflectance"].values[t, BANDS.index(band)].astype("float64")
                dn = np.clip(np.round((sr - OFFSET) / SCALE), 1, np.iinfo("uint16").max).astype("uint16")
                _write_cog(dn, path, x, y, nodata=0)
                raster = RasterBand.create(nodata=0, data_type=DataType.UINT16, scale=SCALE, offset=OFFSET)
            asset = pystac.Asset(href=str(path), media_type=pystac.MediaType.COG, roles=["data"])
            item.add_asset(key, asset)
            RasterExtension.ext(asset, add_if_missing=True).bands = [raster]
            bar.update()
        EOExtension.ext(item, add_if_missing=True).cloud_cover = round(100 * float(cloud.mean()), 2)
        proj = ProjectionExtension.ext(item, add_if_missing=True)
        proj.code, proj.shape, proj.transform = CRS, [size, size], [30.0, 0.0, left, 0.0, -30.0, top]
        collection.add_item(item)
    bar.close()
    catalog = pystac.Catalog(id="bench-stac", description="local STAC catalog of benchmarks/bench_stac.py")
    catalog.add_child(collection)
    catalog.normalize_hrefs(str(root / "stac"))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    bbox = transform_bounds(CRS, "EPSG:4326", left + 15, bottom + 15, right - 15, top - 15, densify_pts=21)
    days = scene["time"].values.astype("datetime64[D]")
    return root / "stac" / "catalog.json", bbox, str(days[0]), str(days[-1]), scene


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run(workdir: Path, size: int) -> None:
    for part in PARTS:
        shutil.rmtree(workdir / part, ignore_errors=True)
    start = time.perf_counter()
    catalog, bbox, first, last, scene = build_catalog(workdir, size)
    build_s = time.perf_counter() - start
    print(
        f"catalog: 3 items x 5 COGs of {size}² px, 30 m, {CRS}, {_folder_mb(workdir / 'data'):.1f} MB, built in "
        f"{build_s:.2f} s (not timed)"
    )

    from cmsn_cube.cluster import get_client
    from cmsn_cube.export import to_cogs
    from cmsn_cube.inference import reconstruct, write_reconstruction
    from cmsn_cube.sources.stac import open_stac
    from cmsn_cube.store import open_cube, open_reconstruction, write_cube

    cube_store, result_store, cogs = (str(workdir / part) for part in PARTS[2:])
    times: dict[str, float] = {}

    start = time.perf_counter()
    cube = open_stac(str(catalog), bbox=bbox, start=first, end=last, n_dates=3)
    times["plan"] = time.perf_counter() - start
    start = time.perf_counter()
    write_cube(cube, cube_store, progress=True)
    times["pull"] = time.perf_counter() - start

    # as `cmsn-cube reconstruct STORE OUT`: the lazy reconstruction, then a LocalCluster to write it
    start = time.perf_counter()
    cube = open_cube(cube_store)
    result = reconstruct(cube)
    graph_s = time.perf_counter() - start
    with get_client() as client:
        cluster_s = time.perf_counter() - start - graph_s
        workers = len(client.scheduler_info()["workers"])
        write_reconstruction(result, result_store)
    times["reconstruct"] = time.perf_counter() - start

    start = time.perf_counter()
    paths = to_cogs(open_reconstruction(result_store), cogs)
    times["export"] = time.perf_counter() - start

    # not timed: the pulled cube is the scene it was encoded from
    pulled = open_cube(cube_store)
    shape = (pulled.sizes["time"], pulled.sizes["y"], pulled.sizes["x"])
    same_grid = (
        shape == (3, size, size)
        and np.allclose(pulled["x"].values, scene["x"].values, rtol=0, atol=1e-3)
        and np.allclose(pulled["y"].values, scene["y"].values, rtol=0, atol=1e-3)
    )
    mpx = float(np.prod(shape)) / 1e6
    print(f"output: {shape[0]} dates x {shape[1]} x {shape[2]} px = {mpx:.2f} Mpx")
    if same_grid:
        error = float(np.nanmax(np.abs(pulled["reflectance"].values - scene["reflectance"].values)))
        masks = bool((pulled["cloud_mask"].values == scene["cloud_mask"].values).all())
        print(f"pulled cube vs scene: max |reflectance error| {error:.1e}, cloud masks identical: {masks}")
    else:
        print(f"note: the planned grid is not the scene's {size} x {size} px grid (x from {pulled['x'].values[0]})")

    def line(name: str, seconds: float) -> str:
        return f"  {name:<40}{seconds:8.2f} s  {mpx / seconds:8.2f} Mpx/s"

    print(line("plan (open_stac)", times["plan"]))
    print(line("pull (write_cube)", times["pull"]))
    print(line(f"reconstruct (LocalCluster, {workers} workers)", times["reconstruct"]))
    print(f"    of which reconstruct() (lazy){'':<9}{graph_s:8.2f} s")
    print(f"    of which cluster start{'':<16}{cluster_s:8.2f} s")
    print(line(f"export ({len(paths)} COGs, {_folder_mb(Path(cogs)):.1f} MB)", times["export"]))
    print(line("total", sum(times.values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="scene side in pixels")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help=f"a new or empty folder (or one of an earlier run) for the catalog and outputs: its {', '.join(PARTS)} are "
        "replaced; default a temporary one",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (a --workdir is always kept)")
    args = parser.parse_args()
    if args.workdir is not None:
        run(claim_workdir(args.workdir, "bench_stac"), args.size)  # never replaces what it did not write
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench_stac-"))
    try:
        run(workdir, args.size)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
