"""The classical priors the coarse decoder corrects."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from cmsn_cube.model import CMSN
from cmsn_cube.model.prior import box_sum, local_regression_fill, temporal_mean_fill


def test_box_sum_matches_direct_sum():
    images = torch.rand(2, 3, 20, 17, dtype=torch.float64)
    sums = box_sum(images, 2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    direct = sum(padded[..., dy : dy + 20, dx : dx + 17] for dy in range(5) for dx in range(5))
    torch.testing.assert_close(sums, direct)


def _dates_linked_by_gain_and_offset():
    generator = torch.Generator().manual_seed(0)
    # normalised bands vary by about one unit within a window, as real normalised reflectance does
    base = 4 * torch.nn.functional.interpolate(
        torch.rand(1, 4, 12, 12, generator=generator), size=(96, 96), mode="bilinear"
    )
    gains, offsets = torch.tensor([1.0, 1.3, 0.7]), torch.tensor([0.0, -0.2, 0.3])
    dates = torch.stack([base[0] * g + o for g, o in zip(gains, offsets, strict=True)])[None]  # (1, 3, 4, H, W)
    clear = torch.ones(1, 3, 1, 96, 96)
    clear[0, 1, :, 30:60, 20:70] = 0  # a cloud on date 2
    return dates, clear


def test_regression_prior_recovers_a_gain_and_offset_change():
    dates, clear = _dates_linked_by_gain_and_offset()
    filled = local_regression_fill(dates * clear, clear)
    cloud = clear[0, 1, 0] == 0
    error = (filled[0, 1][:, cloud] - dates[0, 1][:, cloud]).abs().mean()
    naive = (temporal_mean_fill(dates * clear, clear)[0, 1][:, cloud] - dates[0, 1][:, cloud]).abs().mean()
    assert error < naive / 8, (float(error), float(naive))  # the mean fill ignores the gain and offset
    assert torch.equal(filled[clear.expand_as(dates) > 0], dates[clear.expand_as(dates) > 0]), "clear values are kept"


def test_no_clear_helper_falls_back_to_band_mean():
    dates, clear = _dates_linked_by_gain_and_offset()
    clear[:, :, :, :10, :10] = 0  # cloudy on every date
    filled = local_regression_fill(dates * clear, clear)
    assert torch.isfinite(filled).all()
    assert torch.equal(filled[0, :, :, :10, :10], torch.zeros(3, 4, 10, 10))


def test_models_of_both_priors_run_and_record_it():
    inputs = torch.rand(1, 3, 5, 32, 36).round()
    for prior in ("mean", "regression"):
        model = CMSN(width=8, depth=1, skip_width=4, prior=prior)
        assert model.config["prior"] == prior
        assert model(inputs).output.shape == (1, 3, 4, 32, 36)


def _regression_fill_pixel_by_pixel(values, clear, radius):
    """The weighted local regression of prior.py's docstring, written out one pixel and one pair at a time.

    Its constants are written here, not imported: a changed ridge or residual floor in prior.py must fail.
    """
    ridge, residual_floor = 0.1, 0.01  # in standardised units (see prior.py)
    values, clear = values.double().numpy(), clear.double().numpy()[:, :, 0]
    batch, dates, channels, height, width = values.shape
    filled = values * clear[:, :, None]
    for b, t, y, x in itertools.product(range(batch), range(dates), range(height), range(width)):
        if clear[b, t, y, x]:
            continue
        window = (slice(max(y - radius, 0), y + radius + 1), slice(max(x - radius, 0), x + radius + 1))
        total, weight = np.zeros(channels), 0.0
        for helper in (s for s in range(dates) if s != t):
            both = clear[b, helper][window] * clear[b, t][window]
            count = both.sum()
            source, target = values[b, helper][(slice(None), *window)], values[b, t][(slice(None), *window)]
            mean_x = (both * source).sum((1, 2)) / max(count, 1)
            mean_y = (both * target).sum((1, 2)) / max(count, 1)
            var_x = np.maximum((both * source**2).sum((1, 2)) / max(count, 1) - mean_x**2, 0)
            var_y = np.maximum((both * target**2).sum((1, 2)) / max(count, 1) - mean_y**2, 0)
            cov = (both * source * target).sum((1, 2)) / max(count, 1) - mean_x * mean_y
            gain = (cov + ridge) / (var_x + ridge)
            residual = np.maximum(var_y - gain * cov, 0).mean() + residual_floor
            trust = clear[b, helper, y, x] * max(count / (count + 20.0) / residual, 0)
            total += trust * (gain * values[b, helper, :, y, x] + mean_y - gain * mean_x)
            weight += trust
        if weight > 0:
            filled[b, t, :, y, x] = total / weight
        else:  # no helper: the mean of the other dates clear there, else 0 (the band mean)
            others = [s for s in range(dates) if s != t and clear[b, s, y, x]]
            filled[b, t, :, y, x] = np.mean([values[b, s, :, y, x] for s in others], axis=0) if others else 0.0
    return filled


def test_regression_prior_matches_the_fill_written_pixel_by_pixel():
    generator = torch.Generator().manual_seed(3)
    clear = (torch.rand(2, 3, 1, 11, 13, generator=generator) > 0.35).float()
    clear[0, :, :, :3, :3] = 0  # cloudy on every date: the band mean
    clear[1, 2] = 0  # a date cloudy everywhere
    values = torch.randn(2, 3, 2, 11, 13, generator=generator) * clear
    filled = local_regression_fill(values, clear, radius=2, factor=1)
    expected = _regression_fill_pixel_by_pixel(values, clear, radius=2)
    np.testing.assert_allclose(filled.double().numpy(), expected, rtol=1e-4, atol=1e-5)
