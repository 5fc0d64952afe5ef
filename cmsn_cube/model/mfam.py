"""Multi-temporal feature aggregation module (``MFAM``).

Each date receives a fusion of all dates' features: per pixel, a softmax over source dates (computed for
each receiving date, so a date can learn to ignore itself where it is cloudy and borrow from the clearest
neighbour), followed by a spatial attention map. The fused features are merged back into every date with a
residual 1×1 convolution, so the dates are reconstructed synchronously.
"""

from __future__ import annotations

import torch
from torch import nn

from cmsn_cube.model.pointwise import PointwiseConv2d

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
        self.merge = PointwiseConv2d(2 * channels, channels)

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
        # fused[b, t] = sum_s weights[b, t, s] * features[b, s]: a multiply-add per source date (an einsum runs a
        # batched matmul of 3x3 matrices per pixel here, twice as slow)
        fused = weights[:, :, :1] * features[:, None, 0]
        for source in range(1, dates):
            fused += weights[:, :, source : source + 1] * features[:, None, source]
        fused = fused.reshape(batch * dates, channels, height, width)
        pooled = torch.cat([fused.mean(dim=1, keepdim=True), fused.amax(dim=1, keepdim=True)], dim=1)
        fused = fused * torch.sigmoid(self.spatial_attention(pooled))
        own = features.reshape(batch * dates, channels, height, width)
        merged = own + self.merge(torch.cat([own, fused], dim=1))
        return merged.reshape(batch, dates, channels, height, width)
