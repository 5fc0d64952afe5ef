"""Multi-temporal feature aggregation module (``MFAM``).

Each date receives a fusion of all dates' features: per pixel, a softmax over source dates (computed for
each receiving date, so a date can learn to ignore itself where it is cloudy and borrow from the clearest
neighbour), followed by a spatial attention map. The fused features are merged back into every date with a
residual 1×1 convolution, so the dates are reconstructed synchronously.
"""

from __future__ import annotations

import torch
from torch import nn

from cmsn_cube.model.pointwise import PointwiseConv2d, pointwise_conv2d

__all__ = ["MFAM"]


class MFAM(nn.Module):
    """Fuse ``(B, T, C, H, W)`` features across the ``T`` dates.

    Parameters
    ----------
    channels : int
        Channels ``C`` of each date's features.
    n_dates : int
        Number of dates ``T``.
    spatial_kernel : int
        Kernel size of the spatial attention convolution.

    Examples
    --------
    >>> fuse = MFAM(8, n_dates=3)
    >>> fuse(torch.zeros(2, 3, 8, 9, 7)).shape
    torch.Size([2, 3, 8, 9, 7])
    """

    def __init__(self, channels: int, *, n_dates: int = 3, spatial_kernel: int = 7) -> None:
        super().__init__()
        self.channels = channels
        self.n_dates = n_dates
        # Logits for every (receiving date, source date) pair: T*T channels.
        self.date_logits = nn.Sequential(
            PointwiseConv2d(n_dates * channels, channels),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(channels, n_dates * n_dates, 3, padding=1),
        )
        self.spatial_attention = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)
        self.merge = nn.Conv2d(2 * channels, channels, 1)  # its weight is applied piece by piece in forward

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        """Return per-pixel weights over source dates for every receiving date.

        Parameters
        ----------
        features : torch.Tensor
            ``(B, T, C, H, W)``: the features of every date, which are also the sources.

        Returns
        -------
        torch.Tensor
            ``(B, T_receiving, T_source, H, W)``, summing to 1 over ``T_source``.
        """
        batch, dates, channels, height, width = features.shape
        # all dates' channels side by side, channels-last (a plain reshape gives NCHW, slower for these convolutions)
        stacked = features.permute(0, 3, 4, 1, 2).reshape(batch, height, width, dates * channels).permute(0, 3, 1, 2)
        logits = self.date_logits(stacked)
        return torch.softmax(logits.reshape(batch, dates, dates, height, width), dim=2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Give every date the features fused over all dates.

        The fused features pass through a spatial attention map; a residual 1×1 convolution then merges them into
        each date's own features.

        Parameters
        ----------
        features : torch.Tensor
            ``(B, T, C, H, W)``.

        Returns
        -------
        torch.Tensor
            ``(B, T, C, H, W)``: each date's own features plus what it received from all dates.
        """
        batch, dates, channels, height, width = features.shape
        weights = self.attention(features)
        own = features.reshape(batch * dates, channels, height, width)
        # fused[b, t] = sum_s weights[b, t, s] * features[b, s]: a multiply-add per source date (an einsum runs a
        # batched matmul of 3x3 matrices per pixel here, twice as slow), written channels-last as the convolutions
        # around it want (a broadcast product's own layout made the merge below copy and convolve in NCHW)
        fused = torch.zeros_like(own, memory_format=torch.channels_last).unflatten(0, (batch, dates))
        for source in range(dates):
            fused.addcmul_(weights[:, :, source : source + 1], features[:, None, source])
        fused = fused.flatten(0, 1)
        pooled = torch.cat([fused.mean(dim=1, keepdim=True), fused.amax(dim=1, keepdim=True)], dim=1)
        fused = fused * torch.sigmoid(self.spatial_attention(pooled))
        # the merge's 1x1 convolution of [own, fused], piece by piece: the same sum without copying them side by side
        from_own, from_fused = self.merge.weight.split(channels, dim=1)
        merged = own + pointwise_conv2d(own, from_own)
        merged += pointwise_conv2d(fused, from_fused, self.merge.bias)
        return merged.reshape(batch, dates, channels, height, width)
