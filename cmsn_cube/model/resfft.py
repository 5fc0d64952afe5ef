"""Residual block with a spatial and a Fourier branch (``ResFFTConv``).

The spatial branch (two 3×3 convolutions) sees local texture; the Fourier branch mixes channels of the
2-D spectrum with 1×1 convolutions, which gives every output pixel a receptive field as wide as the feature
map. Real and imaginary parts are stacked as channels, so the phase (where things are) is kept; the seed
took ``abs()`` of the spectrum and lost it.
"""

from __future__ import annotations

import torch
from torch import nn

from cmsn_cube.model.pointwise import PointwiseConv2d

__all__ = ["ResFFTConv"]


class ResFFTConv(nn.Module):
    """Residual block ``x + spatial(x) + fourier(x)``.

    Parameters
    ----------
    channels : int
        Number of input (and output) channels.
    fourier_hidden : int, optional
        Hidden channels of the Fourier branch (counted on stacked real + imaginary parts);
        ``2 * channels`` by default.
    residual_scale : float
        Initial value of the learnable scales applied to both branches. A value below 1 keeps a stack of
        blocks close to identity at initialisation (stable training without batch norm), while staying
        non-zero so every parameter receives a gradient from the first step.

    Examples
    --------
    >>> block = ResFFTConv(8)
    >>> block(torch.zeros(2, 8, 13, 10)).shape
    torch.Size([2, 8, 13, 10])
    """

    def __init__(self, channels: int, *, fourier_hidden: int | None = None, residual_scale: float = 0.5) -> None:
        super().__init__()
        hidden = 2 * channels if fourier_hidden is None else fourier_hidden
        self.channels = channels
        self.spatial = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.fourier = nn.Sequential(
            PointwiseConv2d(2 * channels, hidden),
            nn.LeakyReLU(0.1, inplace=True),
            PointwiseConv2d(hidden, 2 * channels),
        )
        self.spatial_scale = nn.Parameter(torch.full((1, channels, 1, 1), residual_scale))
        self.fourier_scale = nn.Parameter(torch.full((1, channels, 1, 1), residual_scale))

    def fourier_branch(self, features: torch.Tensor) -> torch.Tensor:
        """Mix channels in the frequency domain, keeping amplitude and phase.

        Parameters
        ----------
        features : torch.Tensor
            ``(N, C, H, W)`` feature map.

        Returns
        -------
        torch.Tensor
            ``(N, C, H, W)`` real feature map.
        """
        height, width = features.shape[-2:]
        # FFTs of non power-of-two sizes are not implemented in half precision: run this branch in float32.
        with torch.autocast(device_type=features.device.type, enabled=False):
            spectrum = torch.fft.rfft2(features.float(), norm="ortho")
            stacked = torch.cat([spectrum.real, spectrum.imag], dim=1)
            mixed = self.fourier(stacked)
            real, imag = mixed.chunk(2, dim=1)
            return torch.fft.irfft2(torch.complex(real, imag), s=(height, width), norm="ortho")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Parameters
        ----------
        features : torch.Tensor
            ``(N, C, H, W)`` feature map, any H and W.

        Returns
        -------
        torch.Tensor
            ``(N, C, H, W)``.
        """
        spatial = self.spatial(features)
        fourier = self.fourier_branch(features).to(spatial.dtype)
        return features + self.spatial_scale * spatial + self.fourier_scale * fourier
