"""1x1 convolutions that run through oneDNN on CPU whatever the thread count.

PyTorch sends a 1x1 convolution of a batch under 16 to its plain (im2col + GEMM) kernel when torch runs one
thread, on an old rule that it beats oneDNN there. Here it does not: the scene path's Dask workers run one torch
thread each, and oneDNN runs this network's 1x1 convolutions 1.4-3x faster on them (channels-last inputs) with the
same sums. With several threads PyTorch already picks oneDNN, so this changes nothing there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointwiseConv2d", "pointwise_conv2d"]


def _onednn_applies(features: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        features.device.type == "cpu"
        and features.dtype == torch.float32
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and bool(torch.backends.mkldnn.enabled)
        and not torch.is_autocast_enabled("cpu")  # the op itself is not on autocast's lists: let conv2d cast
    )


def pointwise_conv2d(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(features, weight, bias)`` for a ``(out, in, 1, 1)`` ``weight``, through oneDNN on CPU float32."""
    if _onednn_applies(features, weight):
        return torch.ops.aten.mkldnn_convolution(features, weight, bias, [0, 0], [1, 1], [1, 1], 1)
    return F.conv2d(features, weight, bias)


class PointwiseConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with a 1x1 kernel (same parameters, same state dict) run by :func:`pointwise_conv2d`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the 1x1 convolution."""
        return pointwise_conv2d(features, self.weight, self.bias)
