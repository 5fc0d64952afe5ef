"""Metrics against hand-computed values on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from cmsn_cube.metrics import evaluate_reconstruction, mae, ndvi, ndvi_error, psnr, rmse, sam, ssim


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
