"""Metrics against hand-computed values on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from cmsn_cube.metrics import evaluate_reconstruction, mae, ndvi, ndvi_error, psnr, rmse, sam, ssim, ssim_sum


def test_identical_images_give_infinite_psnr_and_ssim_one():
    image = np.random.default_rng(0).random((16, 16))
    assert psnr(image, image) == np.inf
    assert ssim(image, image) == pytest.approx(1.0)
    assert mae(image, image) == 0 and rmse(image, image) == 0


def test_hand_computed_errors():
    truth = np.array([0.1, 0.2, 0.3, 0.4])
    prediction = np.array([0.1, 0.3, 0.3, 0.2])  # errors 0, 0.1, 0, -0.2
    assert mae(prediction, truth) == pytest.approx(0.075)
    assert rmse(prediction, truth) == pytest.approx(np.sqrt(0.05 / 4))
    assert psnr(prediction, truth) == pytest.approx(10 * np.log10(1 / 0.0125))
    assert psnr(prediction, truth, data_range=2.0) == pytest.approx(10 * np.log10(4 / 0.0125))
    mask = np.array([False, True, False, False])
    assert mae(prediction, truth, mask=mask) == pytest.approx(0.1)
    assert psnr(prediction, truth, mask=mask) == pytest.approx(20.0)


def test_nan_pixels_are_left_out():
    truth = np.array([0.1, 0.2, np.nan, 0.4])
    prediction = np.array([0.2, np.nan, 0.5, 0.4])
    assert mae(prediction, truth) == pytest.approx(0.05)
    assert np.isnan(mae(prediction, truth, mask=np.array([False, True, True, False])))
    image = np.random.default_rng(1).random((20, 20))
    holed = image.copy()
    holed[0, 0] = np.nan
    assert ssim(holed, image) == pytest.approx(1.0)


def test_ssim_differs_for_different_images():
    rng = np.random.default_rng(2)
    a, b = rng.random((32, 32)), rng.random((32, 32))
    assert ssim(a, b) < 0.2
    mask = np.zeros((32, 32), dtype=bool)
    mask[:16] = True
    assert ssim(a, a * 0.5, mask=mask) < 1


def test_ssim_is_wang_et_al_with_a_uniform_7_px_window_and_mirrored_borders():
    from scipy import ndimage
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(4)
    a = rng.random((24, 20))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    # every pixel's own window, borders included (mirrored), averaged: not skimage's border-cropped mean
    _, full = structural_similarity(a, b, data_range=1.0, win_size=7, full=True)
    assert ssim(a, b) == pytest.approx(full.mean(), rel=1e-12)
    assert ssim(a, b) != pytest.approx(structural_similarity(a, b, data_range=1.0, win_size=7), rel=1e-6)

    def mean(image):  # uniform 7 x 7 window, mirrored borders
        return ndimage.uniform_filter(image, size=7, mode="reflect")

    n = 49
    covariance = (mean(a * b) - mean(a) * mean(b)) * n / (n - 1)  # sample covariances
    var_a, var_b = (mean(a * a) - mean(a) ** 2) * n / (n - 1), (mean(b * b) - mean(b) ** 2) * n / (n - 1)
    c1, c2 = 0.01**2, 0.03**2
    by_hand = ((2 * mean(a) * mean(b) + c1) * (2 * covariance + c2)) / (
        (mean(a) ** 2 + mean(b) ** 2 + c1) * (var_a + var_b + c2)
    )
    assert ssim(a, b) == pytest.approx(by_hand.mean(), rel=1e-9)


def test_ssim_sums_pool_over_images():
    rng = np.random.default_rng(5)
    a, b = rng.random((3, 16, 16)), rng.random((3, 16, 16))
    mask = rng.random((3, 16, 16)) < 0.4
    parts = [ssim_sum(a[i], b[i], mask=mask[i]) for i in range(3)]
    total, count = ssim_sum(a, b, mask=mask)
    assert count == int(mask.sum()) == sum(c for _, c in parts)
    assert total == pytest.approx(sum(t for t, _ in parts), rel=1e-12)
    assert ssim(a, b, mask=mask) == pytest.approx(total / count, rel=1e-12)
    assert ssim_sum(a, b, mask=np.zeros_like(mask)) == (0.0, 0) and np.isnan(ssim(a, b, mask=np.zeros_like(mask)))


def test_spectral_angle_and_ndvi():
    assert sam(np.array([1.0, 0, 0, 0]), np.array([0, 2.0, 0, 0]), axis=0) == pytest.approx(90.0)
    assert sam(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.2, 0.4, 0.6, 0.8]), axis=0) == pytest.approx(0.0, abs=1e-5)
    values = np.array([[0.1, 0.0], [0.1, 0.0], [0.1, 0.0], [0.3, 0.0]])[:, :, None]  # (band, y=2, x=1)
    result = ndvi(values, axis=0)
    assert result[0, 0] == pytest.approx(0.5) and np.isnan(result[1, 0])
    assert ndvi(np.array([0, 0, -0.1, 0.05]), axis=0) == -1.0  # (0.15 / -0.05) clipped to [-1, 1]
    digital_numbers = np.array([0, 0, 300, 100], dtype=np.uint16)  # integer bands must not wrap: (100 - 300) / 400
    assert ndvi(digital_numbers, axis=0) == pytest.approx(-0.5)
    assert ndvi(values.astype(np.float32), axis=0).dtype == np.float32  # float32 blocks stay float32
    da = xr.DataArray(values, dims=("band", "y", "x"), coords={"band": ["blue", "green", "red", "nir"]})
    assert float(ndvi(da)[0, 0]) == pytest.approx(0.5) and "band" not in ndvi(da).dims
    other = values.copy()
    other[3, 0, 0] = 0.1  # NDVI 0
    assert ndvi_error(other, values, axis=0) == pytest.approx(0.5)


def test_evaluate_reconstruction_table():
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.05, 0.5, (2, 4, 16, 16))
    cloudy = np.zeros((2, 16, 16), dtype=bool)
    cloudy[:, 4:12, 4:12] = True
    reconstructed = truth.copy()
    reconstructed[:, :, cloudy[0]] += 0.01  # cloudy pixels off by 0.01 in every band and date
    table = evaluate_reconstruction(reconstructed, truth, cloudy)
    assert table.loc[("cloudy", "mean"), "mae"] == pytest.approx(0.01)
    assert table.loc[("cloudy", "red"), "psnr"] == pytest.approx(40.0)
    assert table.loc[("all", "mean"), "mae"] == pytest.approx(0.01 * 64 / 256)
    assert table.loc[("cloudy", "mean"), "n_pixels"] == 128 and table.loc[("all", "mean"), "coverage"] == 1
    reconstructed[0, :, 5, 5] = np.nan
    assert evaluate_reconstruction(reconstructed, truth, cloudy).loc[("cloudy", "mean"), "coverage"] == pytest.approx(
        127 / 128
    )
