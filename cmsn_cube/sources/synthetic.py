"""The embedded default scene: a deterministic, Landsat-like landscape with clouds, shadows and QA bits.

The toolkit runs offline on it with no account, and because the cloud-free ground is generated first, every
reconstruction of it can be scored against the truth (``truth`` variable).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage

from cmsn_cube.cube import BANDS, LANDSAT_SCALE_M, make_cube
from cmsn_cube.exceptions import CubeValidationError
from cmsn_cube.qa import DEFAULT_CLOUD_FLAGS, DEFAULT_CLOUD_LEVELS, cloud_mask_from_qa, encode_qa

LAND_COVER_CLASSES: tuple[str, ...] = ("water", "forest", "cropland", "bare_soil", "urban", "road")

#: Default share of the scene per land-cover class (roads and field boundaries come on top).
DEFAULT_LAND_COVER: dict[str, float] = {
    "water": 0.08,
    "forest": 0.27,
    "cropland": 0.45,
    "bare_soil": 0.08,
    "urban": 0.08,
}

#: Surface reflectance per class, bands blue, green, red, NIR (typical values of USGS/ASTER spectral libraries).
_SURFACE = {
    "water": (0.035, 0.045, 0.03, 0.015),
    "forest": (0.03, 0.06, 0.035, 0.32),
    "crop_green": (0.03, 0.08, 0.04, 0.42),
    "crop_senescent": (0.07, 0.10, 0.14, 0.22),
    "bare_soil": (0.09, 0.13, 0.18, 0.25),
    "urban": (0.11, 0.12, 0.14, 0.19),
    "road": (0.13, 0.14, 0.16, 0.20),
    "boundary": (0.05, 0.08, 0.08, 0.26),
}

#: Atmospheric path reflectance added at the top of the atmosphere (blue scatters most).
_PATH_REFLECTANCE = np.array([0.06, 0.035, 0.02, 0.008], dtype=np.float32)
#: Cloud top reflectance, bands blue..NIR (bright and nearly flat).
_CLOUD_REFLECTANCE = np.array([0.62, 0.60, 0.59, 0.58], dtype=np.float32)

#: The seed's Wuhan dates (Landsat 8, path/row 123/039) start the default time axis.
_DEFAULT_START = np.datetime64("2013-05-12")
_REVISIT_DAYS = 16


def fractal_noise(shape: tuple[int, int], rng: np.random.Generator, *, beta: float = 3.0) -> np.ndarray:
    """Zero-mean, unit-variance noise with a 1/f^beta power spectrum (clouds, terrain, texture)."""
    height, width = shape
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    radius[0, 0] = 1.0
    spectrum = (rng.standard_normal((height, fx.size)) + 1j * rng.standard_normal((height, fx.size))) * radius ** (
        -beta / 2
    )
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=shape)
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _split_parcels(
    shape: tuple[int, int], rng: np.random.Generator, *, min_size: int = 14, max_size: int = 60
) -> np.ndarray:
    """Agricultural parcels: recursive axis-aligned splits, as on a cadastral map. Returns a parcel id map."""
    parcels = np.zeros(shape, dtype=np.int32)
    stack = [(0, 0, shape[0], shape[1])]
    next_id = 0
    while stack:
        y0, x0, y1, x1 = stack.pop()
        h, w = y1 - y0, x1 - x0
        if max(h, w) <= max_size and (rng.random() < 0.5 or max(h, w) < 2 * min_size):
            parcels[y0:y1, x0:x1] = next_id
            next_id += 1
            continue
        if h >= w:
            cut = y0 + int(rng.integers(min_size, max(min_size + 1, h - min_size + 1)))
            stack += [(y0, x0, cut, x1), (cut, x0, y1, x1)]
        else:
            cut = x0 + int(rng.integers(min_size, max(min_size + 1, w - min_size + 1)))
            stack += [(y0, x0, y1, cut), (y0, cut, y1, x1)]
    return parcels


def _land_cover(
    shape: tuple[int, int], rng: np.random.Generator, shares: Mapping[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Class map (indices into :data:`LAND_COVER_CLASSES`) and parcel ids."""
    total = sum(shares.values())
    share = {name: shares.get(name, 0.0) / total for name in DEFAULT_LAND_COVER}
    height, width = shape
    terrain = fractal_noise(shape, rng, beta=4.0)
    settlement = fractal_noise(shape, rng, beta=3.5)
    cls = np.full(shape, LAND_COVER_CLASSES.index("cropland"), dtype=np.uint8)
    # forest on the high ground, water in the lowest ground plus a meandering river
    cls[terrain >= np.quantile(terrain, 1 - share["forest"])] = LAND_COVER_CLASSES.index("forest")
    water = terrain <= np.quantile(terrain, share["water"] * 0.6)
    rows = np.arange(height)
    centre = width * (0.3 + 0.4 * rng.random()) + width * 0.12 * np.sin(
        rows / (height / (2 + 2 * rng.random())) * np.pi
    )
    half_width = 2 + 3 * rng.random()
    water |= np.abs(np.arange(width)[None, :] - centre[:, None]) < half_width * (share["water"] > 0)
    rest = ~water & (cls != LAND_COVER_CLASSES.index("forest"))
    urban_cut = (
        np.quantile(settlement[rest], 1 - min(1.0, share["urban"] / max(rest.mean(), 1e-6))) if rest.any() else np.inf
    )
    cls[rest & (settlement >= urban_cut)] = LAND_COVER_CLASSES.index("urban")
    parcels = _split_parcels(shape, rng)
    n_parcels = int(parcels.max()) + 1
    crop_or_bare = share["cropland"] + share["bare_soil"]
    bare_parcel = rng.random(n_parcels) < (share["bare_soil"] / crop_or_bare if crop_or_bare else 0)
    is_field = cls == LAND_COVER_CLASSES.index("cropland")
    cls[is_field & bare_parcel[parcels]] = LAND_COVER_CLASSES.index("bare_soil")
    cls[water] = LAND_COVER_CLASSES.index("water")
    # straight roads across the scene and a street grid in town
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(max(1, (height + width) // 400)):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(0.2, 0.8) * (height * abs(np.cos(angle)) + width * abs(np.sin(angle)))
        distance = np.abs(yy * np.cos(angle) + xx * np.sin(angle) - offset)
        cls[(distance < 1.0) & ~water] = LAND_COVER_CLASSES.index("road")
    streets = ((yy % 12 == 0) | (xx % 15 == 0)) & (cls == LAND_COVER_CLASSES.index("urban"))
    cls[streets] = LAND_COVER_CLASSES.index("road")
    return cls, parcels


def _greenness(day_of_year: float, phase: np.ndarray) -> np.ndarray:
    """Crop canopy greenness 0..1: a growing season of about 110 days centred on ``phase`` (day of year)."""
    return np.exp(-(((day_of_year - phase) / 45.0) ** 2))


def _ground_reflectance(cls: np.ndarray, parcels: np.ndarray, days: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cloud-free surface reflectance (time, band, y, x) with texture and crop phenology."""
    shape = cls.shape
    n_parcels = int(parcels.max()) + 1
    phase = rng.uniform(90, 260, n_parcels)[parcels]  # each field has its own sowing date
    parcel_gain = rng.uniform(0.85, 1.15, n_parcels)[parcels]
    boundary = (np.diff(parcels, axis=0, prepend=parcels[:1]) != 0) | (
        np.diff(parcels, axis=1, prepend=parcels[:, :1]) != 0
    )
    texture = 1 + 0.06 * fractal_noise(shape, rng, beta=1.5) + 0.04 * fractal_noise(shape, rng, beta=2.5)
    urban_texture = 1 + 0.18 * rng.standard_normal(shape).astype(np.float32)
    names = LAND_COVER_CLASSES
    ground = np.empty((days.size, len(BANDS), *shape), dtype=np.float32)
    for t, day in enumerate(days):
        green = _greenness(float(day), phase)
        forest_green = 0.85 + 0.15 * np.sin((day - 100) / 365 * 2 * np.pi)
        for b in range(len(BANDS)):
            crop = green * _SURFACE["crop_green"][b] + (1 - green) * _SURFACE["crop_senescent"][b]
            layer = np.select(
                [cls == names.index(n) for n in ("water", "forest", "cropland", "bare_soil", "urban", "road")],
                [
                    _SURFACE["water"][b],
                    _SURFACE["forest"][b] * (forest_green if b == 3 else 1.0),
                    crop * parcel_gain,
                    _SURFACE["bare_soil"][b] * parcel_gain,
                    _SURFACE["urban"][b] * urban_texture,
                    _SURFACE["road"][b],
                ],
            )
            field_edge = boundary & (cls == names.index("cropland"))
            layer = np.where(field_edge, _SURFACE["boundary"][b], layer)
            ground[t, b] = layer * texture
    return ground


def _cloud_layers(
    shape: tuple[int, int], fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cloud opacity, shadow strength and the QA flags (cloud, dilated, shadow) for one date.

    The threshold of the fractal field is found by bisection so the flagged area (cloud | dilated | shadow)
    covers ``fraction`` of the scene.
    """
    zeros = np.zeros(shape, dtype=np.float32)
    if fraction <= 0:
        none = np.zeros(shape, dtype=bool)
        return zeros, zeros, none, none, none
    field = fractal_noise(shape, rng, beta=3.2) + 0.35 * fractal_noise(shape, rng, beta=1.8)
    # shadows fall away from the sun: a shift of 20-45 pixels (600-1350 m) in one direction per date
    angle = rng.uniform(0, 2 * np.pi)
    distance = rng.uniform(20, 45)
    shift = (int(round(distance * np.sin(angle))), int(round(distance * np.cos(angle))))
    softness = 0.35

    def layers(threshold: float) -> tuple[np.ndarray, ...]:
        opacity = np.clip((field - threshold) / softness, 0, 1).astype(np.float32)
        cloud = opacity > 0.4
        dilated = ndimage.binary_dilation(cloud, iterations=3) & ~cloud | (opacity > 0.03) & ~cloud
        shadow_strength = ndimage.shift(opacity, shift, order=0, mode="constant", cval=0)
        shadow = (shadow_strength > 0.3) & ~cloud & ~dilated
        return opacity, shadow_strength, cloud, dilated, shadow

    low, high = float(field.min()) - 1, float(field.max()) + 1
    for _ in range(30):
        middle = (low + high) / 2
        _, _, cloud, dilated, shadow = layers(middle)
        if (cloud | dilated | shadow).mean() > fraction:
            low = middle
        else:
            high = middle
    return layers(high)  # type: ignore[return-value]


def synthetic_scene(
    *,
    height: int = 512,
    width: int = 512,
    n_dates: int = 3,
    cloud_fractions: Sequence[float] | None = None,
    sensor: str = "LANDSAT_8",
    seed: int = 0,
    start: str | np.datetime64 = _DEFAULT_START,
    revisit_days: int = _REVISIT_DAYS,
    land_cover: Mapping[str, float] | None = None,
    crs: str = "EPSG:32650",
    origin: tuple[float, float] = (230_000.0, 3_400_000.0),
    noise: float = 0.004,
) -> xr.Dataset:
    """Generate the embedded Landsat-like scene as a cube, with its cloud-free ``truth``.

    Parameters
    ----------
    height, width : int
        Size in pixels (30 m each).
    n_dates : int
        Number of acquisitions, ``revisit_days`` apart from ``start``.
    cloud_fractions : sequence of float, optional
        Flagged (cloud + dilated + shadow) fraction per date; default the seed's 25 %, 15 %, 10 % repeated.
    sensor : str
        ``LANDSAT_5`` or ``LANDSAT_8`` (recorded per date; bands are the common names).
    seed : int
        Everything is drawn from this seed: the same seed gives the same scene.
    land_cover : mapping, optional
        Share per class (``water, forest, cropland, bare_soil, urban``); default :data:`DEFAULT_LAND_COVER`.
    crs : str
        A UTM CRS; default EPSG:32650 (UTM 50N, Wuhan).
    origin : tuple of float
        Upper-left corner (x, y) in CRS metres.
    noise : float
        Standard deviation of sensor noise, in reflectance units.

    Returns
    -------
    xarray.Dataset
        A cube with ``reflectance``, ``qa_pixel``, ``cloud_mask``, ``truth(time, band, y, x)`` (cloud-free TOA
        reflectance) and ``land_cover(y, x)``.

    Examples
    --------
    >>> from cmsn_cube.sources.synthetic import synthetic_scene
    >>> cube = synthetic_scene(height=64, width=64, seed=1)
    >>> cube.reflectance.dims, cube.sizes["time"]
    (('time', 'band', 'y', 'x'), 3)
    """
    if height < 16 or width < 16:
        raise CubeValidationError(f"scene must be at least 16 x 16 pixels, got {height} x {width}")
    if sensor not in ("LANDSAT_5", "LANDSAT_8"):
        raise CubeValidationError(f"sensor must be 'LANDSAT_5' or 'LANDSAT_8', got {sensor!r}")
    levels = _cloud_levels(cloud_fractions, n_dates)
    landscape_rng = np.random.default_rng([seed, 0])
    times = np.datetime64(str(start), "D") + np.arange(n_dates) * np.timedelta64(revisit_days, "D")
    days = (times - times.astype("datetime64[Y]")).astype(int) + 1
    cls, parcels = _land_cover((height, width), landscape_rng, land_cover or DEFAULT_LAND_COVER)
    ground = _ground_reflectance(cls, parcels, days, landscape_rng)
    water = cls == LAND_COVER_CLASSES.index("water")
    observed, truth, qa = _observe(ground, levels, water=water, seed=seed, noise=noise)
    x = origin[0] + (np.arange(width) + 0.5) * LANDSAT_SCALE_M
    y = origin[1] - (np.arange(height) + 0.5) * LANDSAT_SCALE_M
    cube = make_cube(
        observed,
        time=times,
        y=y,
        x=x,
        crs=crs,
        sensor=sensor,
        qa_pixel=qa,
        cloud_mask=cloud_mask_from_qa(xr.DataArray(qa, dims=("time", "y", "x")), flags=DEFAULT_CLOUD_FLAGS).values,
        source=f"cmsn_cube.sources.synthetic (seed={seed})",
        attrs={"seed": seed, "requested_cloud_fractions": [float(v) for v in levels]},
    )
    return _with_truth_and_land_cover(cube, truth, cls)


def _cloud_levels(cloud_fractions: Sequence[float] | None, n_dates: int) -> list[float]:
    """Return the flagged fraction of each date: ``cloud_fractions``, or the seed's levels repeated."""
    levels = (
        list(cloud_fractions)
        if cloud_fractions is not None
        else [DEFAULT_CLOUD_LEVELS[i % len(DEFAULT_CLOUD_LEVELS)] for i in range(n_dates)]
    )
    if len(levels) != n_dates:
        raise CubeValidationError(f"cloud_fractions has {len(levels)} values for {n_dates} dates")
    if any(not 0 <= level < 1 for level in levels):
        raise CubeValidationError(f"cloud_fractions must lie in [0, 1), got {levels}")
    return levels


def _observe(
    ground: np.ndarray, levels: Sequence[float], *, water: np.ndarray, seed: int, noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return what the sensor sees per date (atmosphere, clouds, shadows, noise), the cloud-free truth and QA."""
    n_dates, shape = ground.shape[0], ground.shape[2:]
    observed = np.empty_like(ground)
    truth = np.empty_like(ground)
    qa = np.empty((n_dates, *shape), dtype=np.uint16)
    for t in range(n_dates):
        date_rng = np.random.default_rng([seed, 1, t])
        # the atmosphere differs a little per date: haze offset and gain per band
        gain = 1 + date_rng.normal(0, 0.03, len(BANDS)).astype(np.float32)
        haze = _PATH_REFLECTANCE * (1 + date_rng.normal(0, 0.15))
        surface = ground[t] * gain[:, None, None]
        truth[t] = surface + haze[:, None, None]
        opacity, shadow_strength, cloud, dilated, shadow = _cloud_layers(shape, levels[t], date_rng)
        # a shadow blocks direct sunlight on the ground; the haze above it still scatters light to the sensor
        shade = 1 - 0.6 * np.clip(shadow_strength, 0, 1) * (opacity < 0.4)
        shaded = surface * shade[None] + haze[:, None, None]
        cloud_texture = 1 + 0.08 * fractal_noise(shape, date_rng, beta=2.0)
        cloudy = _CLOUD_REFLECTANCE[:, None, None] * cloud_texture[None]
        observed[t] = shaded * (1 - opacity[None]) + cloudy * opacity[None]
        observed[t] += date_rng.normal(0, noise, observed[t].shape).astype(np.float32)
        qa[t] = _encode_scene_qa(cloud, dilated, shadow, water)
    truth += np.random.default_rng([seed, 2]).normal(0, noise, truth.shape).astype(np.float32)
    np.clip(observed, 0, 1, out=observed)
    np.clip(truth, 0, 1, out=truth)
    return observed, truth, qa


def _with_truth_and_land_cover(cube: xr.Dataset, truth: np.ndarray, cls: np.ndarray) -> xr.Dataset:
    """Add the cloud-free ``truth(time, band, y, x)`` and the ``land_cover(y, x)`` class map to the cube."""
    cube["truth"] = (("time", "band", "y", "x"), truth)
    cube["truth"].attrs.update(long_name="cloud-free TOA reflectance", units="1")
    cube["land_cover"] = (("y", "x"), cls)
    cube["land_cover"].attrs.update(
        flag_values=list(range(len(LAND_COVER_CLASSES))), flag_meanings=" ".join(LAND_COVER_CLASSES)
    )
    for name in ("truth", "land_cover"):
        cube[name].encoding["grid_mapping"] = "spatial_ref"
    return cube


def _encode_scene_qa(cloud: np.ndarray, dilated: np.ndarray, shadow: np.ndarray, water: np.ndarray) -> np.ndarray:
    """QA_PIXEL words the way USGS sets them: clear = neither cloud nor dilated cloud; confidences low/med/high."""
    clear = ~cloud & ~dilated
    flags: dict[str, Any] = {
        "dilated_cloud": dilated,
        "cloud": cloud,
        "cloud_shadow": shadow,
        "clear": clear,
        "water": water & clear & ~shadow,
    }
    confidences = {
        "cloud_confidence": np.where(cloud, 3, np.where(dilated, 2, 1)),
        "cloud_shadow_confidence": np.where(shadow, 3, 1),
        "snow_ice_confidence": np.ones_like(cloud, dtype=np.uint8),
        "cirrus_confidence": np.ones_like(cloud, dtype=np.uint8),
    }
    return encode_qa(flags, confidences)
