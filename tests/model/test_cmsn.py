from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cmsn_cube.model import CMSN, build_model, cmsn_loss


@pytest.mark.parametrize(("height", "width"), [(37, 53), (3, 5), (32, 32)])
def test_shapes_for_any_size(tiny_config, batch_factory, height, width):
    net = CMSN(**tiny_config).eval()
    inputs = batch_factory(batch=1, height=height, width=width)["inputs"]
    with torch.no_grad():
        out = net(inputs)
    for name in ("coarse", "refined", "output"):
        assert getattr(out, name).shape == (1, 3, 4, height, width), name
        assert torch.isfinite(getattr(out, name)).all(), name


def test_clear_pixels_are_kept_bit_for_bit(tiny_config, batch_factory):
    torch.manual_seed(1)
    net = CMSN(**tiny_config).eval()
    inputs = batch_factory(height=37, width=53, seed=3)["inputs"]
    inputs[:, :, :4] += torch.rand_like(inputs[:, :, :4]) * 1e-3 * (1 - inputs[:, :, 4:])  # non-round values
    with torch.no_grad():
        out = net(inputs)
    clear = (inputs[:, :, 4] == 0).unsqueeze(2).expand_as(out.output)
    cloudy = ~clear
    assert clear.any() and cloudy.any()
    assert torch.equal(out.output[clear], inputs[:, :, :4][clear])
    assert torch.equal(out.output[cloudy], out.refined[cloudy])
    # The network does produce something where it is cloudy (inputs are 0 there).
    assert out.output[cloudy].abs().min() > 0


def test_gradients_reach_every_parameter_with_sane_magnitudes(batch_factory):
    torch.manual_seed(0)
    net = CMSN(width=16, depth=2, fusion_depth=1, skip_width=8)
    batch = batch_factory(batch=2, height=32, width=32)
    cmsn_loss(net(batch["inputs"]), batch)["total"].backward()
    grad_rms = {}
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        grad_rms[name] = parameter.grad.square().mean().sqrt().item()
    # The seed's gradients were 1e-5 ... 1e-12: here every parameter gets a usable signal.
    too_small = {name: value for name, value in grad_rms.items() if value < 1e-6}
    assert not too_small, too_small
    assert max(grad_rms.values()) < 10.0
    assert sorted(grad_rms.values())[len(grad_rms) // 2] > 1e-4


def test_config_is_json_and_rebuilds_the_same_architecture(tiny_config):
    net = CMSN(**tiny_config, band_mean=(0.1, 0.1, 0.1, 0.3), band_std=(0.1, 0.1, 0.1, 0.1))
    config = json.loads(json.dumps(net.config))
    rebuilt = build_model(config)
    assert rebuilt.config == net.config
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in net.parameters()]


def test_wrong_input_shape_is_refused(tiny_config):
    net = CMSN(**tiny_config)
    with pytest.raises(ValueError, match="bands \\+ mask"):
        net(torch.zeros(1, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="band_mean"):
        CMSN(band_mean=(0.1, 0.1))


def test_default_model_is_small():
    # The default must train on a CPU and fit a packaged checkpoint of a few MB.
    assert CMSN().num_parameters < 1_000_000


def _concatenating_decoder(net: CMSN, quarter, half_fused, full, per_date, prior):
    """The decoder and heads of the module docstring run literally: each 1x1 convolution on a torch.cat."""
    dates = per_date.shape[1]
    up = F.interpolate(quarter, size=half_fused.shape[-2:], mode="bilinear", align_corners=False)
    decoded = net.decode_half(torch.cat([up, half_fused], dim=1))
    up = F.interpolate(decoded, size=full.shape[-2:], mode="bilinear", align_corners=False)
    orders = [[t] + [s for s in range(dates) if s != t] for t in range(dates)]  # own date first
    all_dates = per_date[:, orders].flatten(0, 1).flatten(1, 2)  # (B*T, T*C, H, W)
    decoded = net.decode_full(torch.cat([up, full, all_dates], dim=1))
    coarse = prior + net.coarse_head(decoded)
    return coarse, coarse + net.refine(torch.cat([coarse, all_dates, decoded], dim=1))


@pytest.mark.parametrize("n_dates", [2, 3, 4])
def test_decoder_equals_its_concatenated_layout(n_dates):
    # forward() applies the 1x1 convolutions piece by piece and date by date, in place on strided views; the sums
    # and, for training, their gradients must be those of the literal layout
    torch.manual_seed(5)
    net = CMSN(width=8, depth=1, fusion_depth=0, skip_width=6, n_dates=n_dates)
    with torch.no_grad():
        for parameter in net.parameters():  # non-trivial biases and heads, unlike the initialisation
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    batch, height, width = 2, 20, 28
    quarter = torch.randn(batch * n_dates, 8, height // 4, width // 4)
    half_fused = torch.randn(batch * n_dates, 4, height // 2, width // 2)
    full = torch.randn(batch * n_dates, 6, height, width)
    per_date = torch.randn(batch, n_dates, 5, height, width, requires_grad=True)
    prior = torch.randn(batch * n_dates, 4, height, width)
    to_channels_last = {"memory_format": torch.channels_last}  # the layout forward() runs them in
    decoded = net._decode(
        quarter.contiguous(**to_channels_last),
        half_fused.contiguous(**to_channels_last),
        full.contiguous(**to_channels_last),
        per_date.flatten(1, 2).contiguous(**to_channels_last),
    )
    coarse, refined = net._heads(
        decoded, prior.contiguous(**to_channels_last), per_date.flatten(1, 2).contiguous(**to_channels_last)
    )
    expected_coarse, expected_refined = _concatenating_decoder(net, quarter, half_fused, full, per_date, prior)
    torch.testing.assert_close(coarse, expected_coarse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(refined, expected_refined, rtol=1e-5, atol=1e-5)

    def gradients(coarse, refined):
        net.zero_grad()
        per_date.grad = None
        (coarse.square().sum() + (refined * torch.linspace(-1, 1, width)).sum()).backward()
        return [parameter.grad.clone() for parameter in net.parameters() if parameter.grad is not None] + [
            per_date.grad.clone()
        ]

    got, expected = gradients(coarse, refined), gradients(expected_coarse, expected_refined)
    assert len(got) == len(expected) > 10
    for got_gradient, expected_gradient in zip(got, expected, strict=True):
        # float32 sums over the whole tile in another order: a tolerance on the gradient's own scale
        scale = expected_gradient.abs().max().item()
        torch.testing.assert_close(got_gradient, expected_gradient, rtol=1e-4, atol=1e-5 * scale)


def test_full_resolution_convolutions_run_channels_last(tiny_config, batch_factory):
    # an NCHW input (e.g. the prior added to the coarse head) sends oneDNN to a path ~3x slower on these channels
    net = CMSN(**tiny_config).eval()
    layouts = {}

    def record(name):
        def hook(module, inputs):
            layouts[name] = inputs[0].is_contiguous(memory_format=torch.channels_last)

        return hook

    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Conv2d) and name.split(".")[0] in {
            "stem",
            "decode_full",
            "coarse_head",
            "refine",
        }:
            module.register_forward_pre_hook(record(name))
    with torch.no_grad():
        net(batch_factory(batch=2, height=32, width=32)["inputs"])
    assert len(layouts) >= 5 and all(layouts.values()), layouts


def test_one_thread_forward_runs_every_convolution_through_onednn(tiny_config, batch_factory):
    # the scene path's Dask workers run one torch thread each; there PyTorch sends 1x1 convolutions of small
    # batches to its plain kernel, 1.4-3x slower than oneDNN on this network's channels-last features
    net = CMSN(**tiny_config).eval()
    inputs = batch_factory(batch=2, height=32, width=32)["inputs"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            net(inputs)
    finally:
        torch.set_num_threads(threads)
    kernels = [
        event.name for event in profile.events() if event.name.endswith("_convolution") or "conv2d" in event.name
    ]
    assert "aten::_slow_conv2d_forward" not in kernels
    assert "aten::mkldnn_convolution" in kernels
