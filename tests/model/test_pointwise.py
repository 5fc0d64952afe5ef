import pytest
import torch
import torch.nn.functional as F

from cmsn_cube.model.pointwise import PointwiseConv2d, pointwise_conv2d


@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_convolution_equals_conv2d_with_its_gradients(channels_last):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 7, 9, 11, generator=generator)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    # a slice of a wider weight, as the decoder's split 1x1 convolutions pass it
    wide = torch.randn(5, 10, 1, 1, generator=generator)
    bias = torch.randn(5, generator=generator)
    inputs = [tensor.clone().requires_grad_(True) for tensor in (features, wide, bias)]
    expected_inputs = [tensor.clone().requires_grad_(True) for tensor in (features, wide, bias)]

    output = pointwise_conv2d(inputs[0], inputs[1][:, 2:9], inputs[2])
    expected = F.conv2d(expected_inputs[0], expected_inputs[1][:, 2:9], expected_inputs[2])
    upstream = torch.randn(expected.shape, generator=generator)
    output.backward(upstream)
    expected.backward(upstream)

    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(inputs, expected_inputs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_pointwise_module_takes_a_conv2d_state_dict_and_gives_its_output():
    reference = torch.nn.Conv2d(6, 4, 1)
    pointwise = PointwiseConv2d(6, 4)
    pointwise.load_state_dict(reference.state_dict())
    features = torch.randn(2, 6, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(pointwise(features), reference(features), rtol=1e-6, atol=1e-6)


def test_pointwise_convolution_follows_cpu_autocast():
    features, weight = torch.randn(2, 6, 5, 8), torch.randn(4, 6, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pointwise_conv2d(features, weight).dtype == F.conv2d(features, weight).dtype == torch.bfloat16
