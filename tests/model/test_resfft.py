from __future__ import annotations

import pytest
import torch

from cmsn_cube.model import MFAM, ResFFTConv


@pytest.mark.parametrize(("height", "width"), [(13, 10), (7, 9), (16, 16)])
def test_resfft_keeps_shape_for_any_size(height, width):
    block = ResFFTConv(6)
    assert block(torch.randn(2, 6, height, width)).shape == (2, 6, height, width)


def test_fourier_branch_keeps_phase():
    # With abs() of the spectrum (the seed's bug) the branch is blind to where things are: a circularly
    # shifted input gives exactly the same output. Keeping real and imaginary parts makes it position-aware.
    torch.manual_seed(0)
    block = ResFFTConv(4)
    image = torch.randn(1, 4, 12, 10)
    shifted = torch.roll(image, shifts=(3, 2), dims=(-2, -1))
    with torch.no_grad():
        original = block.fourier_branch(image)
        moved = block.fourier_branch(shifted)
        amplitude_only = torch.fft.irfft2(torch.fft.rfft2(shifted).abs(), s=(12, 10))
    assert torch.allclose(amplitude_only, torch.fft.irfft2(torch.fft.rfft2(image).abs(), s=(12, 10)), atol=1e-5)
    assert (moved - original).abs().max() > 1e-2


def test_fourier_branch_mixes_globally():
    # Changing one pixel changes the output far away (global receptive field of the spectral branch).
    torch.manual_seed(0)
    block = ResFFTConv(3)
    image = torch.randn(1, 3, 16, 16)
    poked = image.clone()
    poked[..., 0, 0] += 5.0
    with torch.no_grad():
        difference = (block.fourier_branch(poked) - block.fourier_branch(image)).abs()
    assert difference[..., 8, 8].max() > 1e-4


def test_resfft_gradients_reach_every_parameter():
    torch.manual_seed(0)
    block = ResFFTConv(4)
    block(torch.randn(2, 4, 9, 11)).square().mean().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 1e-6, name


def test_mfam_attention_and_exchange():
    torch.manual_seed(0)
    fuse = MFAM(5, n_dates=3)
    features = torch.randn(2, 3, 5, 6, 7)
    weights = fuse.attention(features)
    assert weights.shape == (2, 3, 3, 6, 7)
    torch.testing.assert_close(weights.sum(dim=2), torch.ones(2, 3, 6, 7))
    # Every date receives information from the others: changing date 2 changes what date 0 gets.
    changed = features.clone()
    changed[:, 2] += 1.0
    with torch.no_grad():
        assert not torch.allclose(fuse(features)[:, 0], fuse(changed)[:, 0])


@pytest.mark.parametrize("n_dates", [2, 3, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mfam_fuses_each_date_as_the_attention_weighted_sum_of_all_dates(n_dates, channels_last):
    torch.manual_seed(2)
    fuse = MFAM(6, n_dates=n_dates)
    features = torch.randn(2 * n_dates, 6, 9, 8)
    if channels_last:  # each date's features as the network hands them over
        features = features.contiguous(memory_format=torch.channels_last)
    features = features.unflatten(0, (2, n_dates)).requires_grad_(True)

    def literal(features):
        # the fusion written out literally, as the module docstring states it
        weights = fuse.attention(features)
        fused = torch.einsum("btshw,bschw->btchw", weights, features).flatten(0, 1)
        pooled = torch.cat([fused.mean(dim=1, keepdim=True), fused.amax(dim=1, keepdim=True)], dim=1)
        fused = fused * torch.sigmoid(fuse.spatial_attention(pooled))
        own = features.flatten(0, 1)
        return (own + fuse.merge(torch.cat([own, fused], dim=1))).unflatten(0, (2, n_dates))

    upstream = torch.randn(features.shape)
    gradients = []
    for forward in (fuse, literal):
        output = forward(features)
        inputs = [features, *fuse.parameters()]
        gradients.append((output, torch.autograd.grad(output, inputs, upstream)))
    (output, got), (expected, want) = gradients
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    for got_gradient, wanted_gradient in zip(got, want, strict=True):
        torch.testing.assert_close(got_gradient, wanted_gradient, rtol=1e-4, atol=1e-5)
