"""Radiometric robustness: each date normalised by its own clear pixels, so TOA or surface reflectance,
one sensor or another, a hazy date, give the same reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmsn_cube.model import CMSN, build_model
from cmsn_cube.model.prior import RegressionFill, clear_pixel_statistics


def _regauged(inputs: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The same scene under another per-date, per-band radiometry; masked pixels stay 0."""
    clear = 1 - inputs[:, :, 4:]
    return torch.cat([(inputs[:, :, :4] * gain + offset) * clear, inputs[:, :, 4:]], dim=2)


@pytest.mark.parametrize("normalisation", ["clear-pixels", "fixed"])
def test_a_gain_and_offset_per_date_and_band_cancel_out(tiny_config, batch_factory, normalisation):
    torch.manual_seed(0)
    net = CMSN(**tiny_config, normalisation=normalisation).eval()
    regression = RegressionFill(net.band_mean, net.band_std, normalisation=normalisation)
    inputs = batch_factory(height=40, width=36, seed=5)["inputs"]
    generator = torch.Generator().manual_seed(1)
    gain = 0.7 + 0.6 * torch.rand(2, 3, 4, 1, 1, generator=generator)
    offset = 0.06 * torch.rand(2, 3, 4, 1, 1, generator=generator) - 0.03
    for model in (net, regression):
        with torch.no_grad():
            plain = model(inputs).refined
            mapped_back = (model(_regauged(inputs, gain, offset)).refined - offset) / gain
        error = (mapped_back - plain).abs().max().item()
        if normalisation == "clear-pixels":
            assert error < 1e-4, f"{type(model).__name__}: {error}"
        else:  # fixed statistics see another radiometry as other numbers
            assert error > 1e-3, f"{type(model).__name__}: {error}"


def test_toa_and_surface_reflectance_of_one_scene_score_alike():
    """The packaged network on one scene given as TOA and as surface-reflectance-like radiometry (path
    radiance taken out per band, gains per date): within 0.5 dB of each other."""
    from cmsn_cube.inference import reconstruct
    from cmsn_cube.metrics import psnr
    from cmsn_cube.sources.synthetic import synthetic_scene

    toa = synthetic_scene(height=96, width=96, seed=77)
    truth = toa["truth"]
    cloudy = toa["cloud_mask"].values
    path_radiance = np.array([0.04, 0.03, 0.015, 0.0])[None, :, None, None]  # haze: strongest in blue
    gain = np.array([[1.10, 1.05, 1.02, 0.97], [1.15, 1.08, 1.03, 0.95], [1.05, 1.02, 1.0, 1.0]])[..., None, None]
    surface = toa.copy()
    surface["reflectance"] = ((toa["reflectance"] - path_radiance) * gain).astype("float32")
    scores = {}
    for name, cube, undo in (("toa", toa, lambda r: r), ("sr", surface, lambda r: r / gain + path_radiance)):
        result = reconstruct(cube.drop_vars("truth"), method="cmsn").reconstructed.values
        restored = undo(result)
        scores[name] = np.mean(
            [psnr(restored[:, b][cloudy], truth.values[:, b][cloudy]) for b in range(4)]  # dB, band mean
        )
    assert abs(scores["toa"] - scores["sr"]) < 0.5, scores


def test_dates_without_clear_pixels_borrow_the_samples_statistics():
    bands = torch.rand(2, 3, 4, 8, 8)
    clear = torch.ones(2, 3, 1, 8, 8)
    clear[0, 1] = 0  # sample 0, date 1: all cloud -> the sample's pooled statistics
    clear[1] = 0  # sample 1: nothing clear -> the fallback
    fallback_mean, fallback_std = torch.full((1, 1, 4, 1, 1), 0.1), torch.full((1, 1, 4, 1, 1), 0.05)
    mean, std = clear_pixel_statistics(bands, clear, fallback_mean=fallback_mean, fallback_std=fallback_std)
    pooled = bands[0, [0, 2]].transpose(0, 1).reshape(4, -1)
    assert torch.allclose(mean[0, 1].flatten(), pooled.mean(dim=1), atol=1e-6)
    assert torch.allclose(std[0, 1].flatten(), pooled.std(dim=1, unbiased=False), atol=1e-5)
    assert torch.allclose(mean[0, 0].flatten(), bands[0, 0].mean(dim=(-2, -1)), atol=1e-6)
    assert torch.equal(mean[1], fallback_mean[0].expand(3, 4, 1, 1))
    assert torch.equal(std[1], fallback_std[0].expand(3, 4, 1, 1))


def test_checkpoints_from_before_keep_their_input_handling(tiny_config):
    old = build_model({"architecture": "cmsn-cube/cmsn-v1", **tiny_config, "prior": "regression"})
    assert (old.normalisation, old.prior_factor) == ("fixed", 4)
    new = CMSN(**tiny_config)
    assert (new.normalisation, new.prior_factor) == ("clear-pixels", 1)
    with pytest.raises(ValueError, match="normalisation"):
        CMSN(**tiny_config, normalisation="per-scene")
