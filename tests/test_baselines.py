"""Baselines keep clear pixels bit-identical, fill every gap they can, and compute what they claim."""

from __future__ import annotations

import numpy as np
import pytest

from cmsn_cube.baselines import BASELINES, fillable, gaps_of, regression
from cmsn_cube.cube import make_cube
from cmsn_cube.testing import tiny_scene


def _cube(values: np.ndarray, cloud: np.ndarray, days=(0, 16, 48)):
    times = np.datetime64("2020-01-01") + np.array(days).astype("timedelta64[D]")
    n, _, h, w = values.shape
    return make_cube(
        values.astype(np.float32),
        time=times,
        y=np.arange(h) * -30.0,
        x=np.arange(w) * 30.0,
        crs="EPSG:32650",
        sensor="LANDSAT_8",
        cloud_mask=cloud,
    )


@pytest.fixture(scope="module")
def scene():
    cube = tiny_scene(size=64, seed=7, cloud_fractions=(0.3, 0.2, 0.4))
    reflectance = cube["reflectance"].values.copy()
    reflectance[1, :, :4, :4] = np.nan  # no data (not cloud) must be filled too
    cube["reflectance"] = (cube["reflectance"].dims, reflectance)
    cloud = cube["cloud_mask"].values.copy()
    cloud[:, 60:, 60:] = True  # cloudy on every date: nothing can fill it
    cube["cloud_mask"] = (cube["cloud_mask"].dims, cloud)
    return cube


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_clear_pixels_bit_identical_and_every_fillable_gap_filled(scene, name):
    result = BASELINES[name](scene)
    assert result.dims == ("time", "band", "y", "x") and result.dtype == np.float32
    gap = gaps_of(scene).values
    observed = scene["reflectance"].values
    clear = np.broadcast_to(~gap[:, None], observed.shape)
    assert np.array_equal(result.values[clear].view(np.uint32), observed[clear].view(np.uint32))
    can = np.broadcast_to(fillable(scene).values[:, None], observed.shape)
    assert np.isfinite(result.values[can]).all(), f"{name} left a fillable gap empty"
    cannot = np.broadcast_to((gap & ~fillable(scene).values)[:, None], observed.shape)
    assert cannot.any() and np.isnan(result.values[cannot]).all()


def test_temporal_fillers_on_hand_made_values():
    values = np.zeros((3, 4, 2, 2), dtype=np.float32)
    values[0], values[1], values[2] = 0.1, 0.5, 0.4  # days 0, 16, 48
    cloud = np.zeros((3, 2, 2), dtype=bool)
    cloud[1, 0, 0] = True  # middle date cloudy at (0, 0)
    cloud[0, 1, 1] = True  # first date cloudy at (1, 1): only later dates help
    cube = _cube(values, cloud)
    nearest, linear, median = (BASELINES[n](cube).values for n in ("nearest", "linear", "median"))
    assert nearest[1, 0, 0, 0] == np.float32(0.1)  # day 0 is 16 days away, day 48 is 32
    assert linear[1, 0, 0, 0] == pytest.approx(0.1 + (0.4 - 0.1) * 16 / 48)
    assert median[1, 0, 0, 0] == pytest.approx(0.25)  # median of 0.1 and 0.4
    assert nearest[0, 0, 1, 1] == np.float32(0.5) and linear[0, 0, 1, 1] == np.float32(0.5)
    assert median[0, 0, 1, 1] == pytest.approx(0.45)


def test_regression_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    helper = rng.uniform(0.05, 0.4, (4, 40, 40)).astype(np.float32)
    values = np.stack([helper, 0.8 * helper + 0.05, helper * 1.1]).astype(np.float32)
    cloud = np.zeros((3, 40, 40), dtype=bool)
    cloud[1, 10:20, 10:20] = True
    result = regression(_cube(values, cloud), window=11)
    np.testing.assert_allclose(result.values[1][:, 10:20, 10:20], values[1][:, 10:20, 10:20], atol=1e-5)


def _gradient_scene(n_dates: int, size: int = 64, seed: int = 0):
    """Dates that are gains and offsets of one textured image, per band, plus independent noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.05, 0.45, size=(4, size, size))
    gains = rng.uniform(0.7, 1.3, size=(n_dates, 4, 1, 1))
    offsets = rng.uniform(-0.03, 0.03, size=(n_dates, 4, 1, 1))
    return gains * base + offsets


def test_regression_takes_the_helpers_that_fit_over_a_nearer_one_that_does_not():
    from cmsn_cube.baselines import regress

    values = _gradient_scene(5)
    rng = np.random.default_rng(1)
    values[1] = rng.uniform(0.05, 0.45, size=values[1].shape)  # the nearest date: unrelated to the target
    gap = np.zeros(values.shape[:1] + values.shape[2:], dtype=bool)
    gap[0, 20:40, 20:40] = True
    filled = regress(values, gap, np.array([0.0, 5, 30, 60, 90]), best=3)
    error = np.abs(filled.values[0][:, gap[0]] - values[0][:, gap[0]])
    # three of the four helpers are exact gains and offsets of the target: the unrelated one gets no weight
    assert error.max() < 1e-4
    assert np.isnan(filled.values[1:]).all()  # no other date had a gap


def test_regression_reaches_the_one_date_of_a_long_series_that_observed_a_pixel():
    from cmsn_cube.baselines import regress

    values = _gradient_scene(10)
    gap = np.zeros(values.shape[:1] + values.shape[2:], dtype=bool)
    gap[:9, 30:34, 30:34] = True  # only the last, farthest date saw this corner
    filled = regress(values, gap, np.arange(10) * 16.0, targets=[0])
    assert np.isfinite(filled.values[0][:, gap[0]]).all()
    np.testing.assert_allclose(filled.values[0][:, gap[0]], values[0][:, gap[0]], atol=1e-4)


def test_regression_spread_matches_the_noise_it_could_not_explain():
    from cmsn_cube.baselines import regress

    values = _gradient_scene(3, size=96)
    noise = 0.01
    values[0] += np.random.default_rng(2).normal(0, noise, size=values[0].shape)  # what no helper can predict
    gap = np.zeros(values.shape[:1] + values.shape[2:], dtype=bool)
    gap[0, 30:70, 30:70] = True
    filled = regress(values, gap, np.array([0.0, 16, 32]))
    sigma = filled.sigma[0][:, gap[0]]
    z = np.abs(filled.values[0][:, gap[0]] - values[0][:, gap[0]]) / sigma
    assert np.median(sigma) == pytest.approx(noise, rel=0.15)
    assert 0.63 < np.mean(z < 1) < 0.74 and 0.93 < np.mean(z < 2) < 0.98  # Gaussian noise: 68 % and 95 %


def test_regression_averages_the_best_helpers_so_their_own_noise_cancels():
    from cmsn_cube.baselines import regress

    rng = np.random.default_rng(4)
    base = _gradient_scene(1, size=80)[0]
    # four helpers, each the target plus its own noise (a helper's noise is not the target's): averaging three
    # of them divides the noise's variance by three, one alone keeps it whole
    values = np.stack([base] + [base + rng.normal(0, 0.02, size=base.shape) for _ in range(4)])
    gap = np.zeros(values.shape[:1] + values.shape[2:], dtype=bool)
    gap[0, 20:60, 20:60] = True
    filled = regress(values, gap, np.array([0.0, 8, 16, 24, 32]))
    error = filled.values[0][:, gap[0]] - base[:, gap[0]]
    assert np.sqrt(np.mean(error**2)) < 0.02 * 0.7
