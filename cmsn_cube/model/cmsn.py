"""The CMSN network: coarse-to-refined multi-temporal synchronous cloud removal.

Layout (``T`` dates share every weight; ``C`` = ``width``)::

    inputs (B, T, 5, H, W) ─ normalise bands, zero cloudy pixels ─┐
      per date: stem 3×3 (full res, skip_width) ── s2 conv (1/2, width/2) ── s2 conv (1/4, width)
                 │                                 │                          ResFFTConv × depth
                 │                                 │                          MFAM (dates exchange features)
                 │                                 │                          ResFFTConv × fusion_depth
                 │                                 └── MFAM (1/2) ── concat ◄─ upsample
                 └──────── concat with all dates' bands (own date first) ◄── upsample
                             └─ coarse head: prior (local regression on the other dates) + residual ─► coarse
                                 refinement stage (coarse + all dates' bands + features) ─► refined
    output = input bands where clear (bit-identical), refined where cloudy

The heavy work (Fourier blocks, fusion) runs at 1/4 resolution, which is both fast and gives a wide
receptive field; the full-resolution path only carries the bands of all dates so the net can copy structure
from a clear date and correct its radiometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cmsn_cube.model.mfam import MFAM
from cmsn_cube.model.pointwise import pointwise_conv2d
from cmsn_cube.model.prior import local_regression_spread, normalising_statistics, temporal_mean_fill
from cmsn_cube.model.resfft import ResFFTConv

__all__ = ["CMSN", "CMSNOutput", "ARCHITECTURE", "DEFAULT_BAND_MEAN", "DEFAULT_BAND_STD"]

#: Name written into every config; a checkpoint naming anything else is refused.
ARCHITECTURE = "cmsn-cube/cmsn-v1"

# Approximate TOA reflectance statistics of vegetated Landsat scenes (blue, green, red, nir): they only need
# to bring bands to a similar scale, so fixed values (stored in the config) are enough.
DEFAULT_BAND_MEAN: tuple[float, ...] = (0.10, 0.10, 0.10, 0.25)
DEFAULT_BAND_STD: tuple[float, ...] = (0.05, 0.06, 0.08, 0.10)

_DOWNSAMPLING = 4  # two stride-2 stages

PriorName = Literal["mean", "regression"]
NormalisationName = Literal["fixed", "clear-pixels"]
#: How reflectance is scaled before the network: fixed band statistics (``band_mean``/``band_std``), or each
#: sample's dates by their own clear pixels (``band_mean``/``band_std`` then serve only a sample without any).
NORMALISATIONS = ("fixed", "clear-pixels")
#: First guess the coarse decoder corrects: the mean of the other clear dates, or a local radiometric regression.
PRIORS = ("mean", "regression")


class CMSNOutput(NamedTuple):
    """What :class:`CMSN` returns; every field is ``(B, T, bands, H, W)`` reflectance."""

    coarse: torch.Tensor
    """Decoder reconstruction of every pixel of every date."""
    refined: torch.Tensor
    """Refinement-stage reconstruction of every pixel of every date."""
    output: torch.Tensor
    """Input bands where the mask is 0 (bit-identical), ``refined`` where the mask is 1."""
    spread: torch.Tensor | None = None
    """Asked for (``spread=True``) with the regression prior: the raw spread of the prior's error that the local
    fits predict (reflectance; NaN where no other date is clear): what :mod:`cmsn_cube.uncertainty` calibrates."""


def _conv(in_channels: int, out_channels: int, kernel: int = 3, *, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2),
        nn.LeakyReLU(0.1, inplace=True),
    )


def _date_orders(n_dates: int) -> list[list[int]]:
    # For date t: t itself first, then the other dates in time order, so a shared convolution always sees
    # "own date" in the same channels.
    return [[t] + [s for s in range(n_dates) if s != t] for t in range(n_dates)]


def _checked_config(
    *,
    width: int,
    depth: int,
    fusion_depth: int,
    skip_width: int,
    n_dates: int,
    bands: Sequence[str],
    band_mean: Sequence[float],
    band_std: Sequence[float],
    prior: str,
    prior_factor: int,
    normalisation: str,
) -> dict[str, Any]:
    """Return the config of a :class:`CMSN` built with these arguments (plain JSON types).

    Raises
    ------
    ValueError
        If an argument is out of range: the message names it and what it must be.
    """
    n_bands = len(bands)
    if len(band_mean) != n_bands or len(band_std) != n_bands:
        raise ValueError(
            f"band_mean and band_std need one value per band ({n_bands}: {list(bands)}), "
            f"got {len(band_mean)} and {len(band_std)}"
        )
    if min(band_std) <= 0:
        raise ValueError(f"band_std must be positive, got {list(band_std)}")
    if width < 2 or skip_width < 1 or depth < 0 or fusion_depth < 0 or n_dates < 2:
        raise ValueError(
            "need width >= 2, skip_width >= 1, depth >= 0, fusion_depth >= 0 and n_dates >= 2; got "
            f"width={width}, skip_width={skip_width}, depth={depth}, fusion_depth={fusion_depth}, "
            f"n_dates={n_dates}"
        )
    config = {
        "architecture": ARCHITECTURE,
        "width": int(width),
        "depth": int(depth),
        "fusion_depth": int(fusion_depth),
        "skip_width": int(skip_width),
        "n_dates": int(n_dates),
        "bands": [str(band) for band in bands],
        "band_mean": [float(value) for value in band_mean],
        "band_std": [float(value) for value in band_std],
        "prior": prior,
        "prior_factor": int(prior_factor),
        "normalisation": normalisation,
    }
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {list(NORMALISATIONS)}, got {normalisation!r}")
    if prior_factor < 1:
        raise ValueError(f"prior_factor must be >= 1, got {prior_factor}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {list(PRIORS)}, got {prior!r}")
    return config


class CMSN(nn.Module):
    """Coarse-to-refined multi-temporal synchronous cloud removal network.

    The network's output is the weighted local regression prior plus a learned residual: with ``prior="regression"``
    (the default), every other date predicts a cloudy pixel through a gain and an offset fitted per band in a
    window around it, the predictions averaged, weighted by how well each fit explains its window
    (:func:`~cmsn_cube.model.prior.local_regression_fill`); the coarse decoder adds a residual to that, and the
    refinement stage another. There is no tanh (no output activation): the residuals are added in normalised units
    and brought back to reflectance with the same statistics, unbounded. Clear pixels are passed through unchanged.

    Parameters
    ----------
    width : int
        Channels at 1/4 resolution, where the Fourier blocks and the main fusion run.
    depth : int
        Number of :class:`ResFFTConv` blocks before the fusion.
    fusion_depth : int
        Number of :class:`ResFFTConv` blocks after the fusion.
    skip_width : int
        Channels of the full-resolution path.
    n_dates : int
        Dates per sample (3 in the tensor contract).
    bands : sequence of str
        Band names in channel order; stored in the config and checked when a checkpoint is loaded.
    band_mean, band_std : sequence of float
        Fixed per-band normalisation of reflectance (one value per band).
    prior : {"regression", "mean"}
        The first guess the decoder corrects: the local regression on the other dates, or their mean.
    prior_factor : int
        The regression prior's statistics grid is this many times coarser than the pixels (1: full resolution,
        the classical weighted regression exactly, as the packaged model is trained; 4: the prior costs 23 ms
        instead of 144 ms for 2 × 3 dates of 256² px on 2 CPU cores, a third of the whole forward pass at 1).
    normalisation : {"clear-pixels", "fixed"}
        ``clear-pixels``: each date of each sample is standardised by its own clear pixels, band by band, and
        the output brought back with the same statistics, so a per-date, per-band gain and offset (TOA against
        surface reflectance, another sensor, haze) does not change the result. ``fixed``: ``band_mean`` and
        ``band_std`` for every sample (the first checkpoints).

    Notes
    -----
    Inputs are ``(B, T, len(bands) + 1, H, W)``: reflectance of each band in [0, 1] with cloudy pixels set to
    0, then the cloud mask (1 = cloud). Any H and W work: the input is reflect-padded to a multiple of 4 and
    the outputs are cropped back.

    Examples
    --------
    >>> net = CMSN(width=8, depth=1, skip_width=4)
    >>> out = net(torch.rand(1, 3, 5, 37, 53).round())
    >>> out.output.shape
    torch.Size([1, 3, 4, 37, 53])
    """

    band_mean: torch.Tensor
    band_std: torch.Tensor
    date_orders: torch.Tensor

    def __init__(
        self,
        *,
        width: int = 48,
        depth: int = 2,
        fusion_depth: int = 1,
        skip_width: int = 16,
        n_dates: int = 3,
        bands: Sequence[str] = ("blue", "green", "red", "nir"),
        band_mean: Sequence[float] = DEFAULT_BAND_MEAN,
        band_std: Sequence[float] = DEFAULT_BAND_STD,
        prior: PriorName = "regression",
        prior_factor: int = 1,
        normalisation: NormalisationName = "clear-pixels",
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = _checked_config(
            width=width,
            depth=depth,
            fusion_depth=fusion_depth,
            skip_width=skip_width,
            n_dates=n_dates,
            bands=bands,
            band_mean=band_mean,
            band_std=band_std,
            prior=prior,
            prior_factor=prior_factor,
            normalisation=normalisation,
        )
        self.normalisation, self.prior_factor = normalisation, int(prior_factor)
        self.prior_name = prior
        self.n_dates = n_dates
        self.n_bands = len(bands)
        #: channels of "every date's bands and mask", which the decoder and the refinement read
        self._all_dates_channels = n_dates * (self.n_bands + 1)
        self.register_buffer("band_mean", torch.tensor(band_mean, dtype=torch.float32).view(1, 1, -1, 1, 1))
        self.register_buffer("band_std", torch.tensor(band_std, dtype=torch.float32).view(1, 1, -1, 1, 1))
        self.register_buffer("date_orders", torch.tensor(_date_orders(n_dates)), persistent=False)
        # Built in this order on purpose: construction draws from torch's RNG, so the order fixes the weights.
        self._build_layers(width=width, depth=depth, fusion_depth=fusion_depth, skip_width=skip_width)
        self._init_weights()

    def _build_layers(self, *, width: int, depth: int, fusion_depth: int, skip_width: int) -> None:
        """Create the encoder, the fusions, the coarse decoder and the refinement stage (see the module layout)."""
        half_width = max(width // 2, 1)
        all_dates_bands = self._all_dates_channels
        # Encoder, shared by all dates.
        self.stem = _conv(self.n_bands + 1, skip_width)
        self.down_half = _conv(skip_width, half_width, stride=2)
        self.down_quarter = _conv(half_width, width, stride=2)
        self.encoder_blocks = nn.Sequential(*[ResFFTConv(width) for _ in range(depth)])
        self.fusion = MFAM(width, n_dates=self.n_dates)
        self.fusion_blocks = nn.Sequential(*[ResFFTConv(width) for _ in range(fusion_depth)])
        # Decoder: 1/4 -> 1/2 (with a lighter fusion of the 1/2 skip) -> full resolution.
        self.fusion_half = MFAM(half_width, n_dates=self.n_dates)
        self.decode_half = nn.Sequential(_conv(width + half_width, half_width, 1), _conv(half_width, half_width))
        self.decode_full = nn.Sequential(
            _conv(half_width + skip_width + all_dates_bands, skip_width, 1), _conv(skip_width, skip_width)
        )
        self.coarse_head = nn.Conv2d(skip_width, self.n_bands, 3, padding=1)
        # Refinement stage: sees the coarse estimate next to every date's bands.
        self.refine = nn.Sequential(
            _conv(self.n_bands + all_dates_bands + skip_width, skip_width, 1),
            _conv(skip_width, skip_width),
            nn.Conv2d(skip_width, self.n_bands, 3, padding=1),
        )

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.1, nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Heads start small (not zero: every parameter must receive a gradient) so the initial coarse
        # estimate is the prior (a classical fill).
        for head in (self.coarse_head, self.refine[-1]):
            assert isinstance(head, nn.Conv2d)  # internal invariant, not user input
            with torch.no_grad():
                head.weight.mul_(0.1)

    @property
    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(parameter.numel() for parameter in self.parameters() if parameter.requires_grad)

    @staticmethod
    def _pointwise(stage: nn.Sequential, sizes: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor, nn.Module]:
        """Return the first (1x1) convolution of ``stage``: its weight split by input pieces, its bias, activation."""
        block = stage[0]
        assert isinstance(block, nn.Sequential)  # internal invariant (built by _conv), not user input
        conv, activation = block
        assert isinstance(conv, nn.Conv2d) and conv.bias is not None
        return list(conv.weight.split(list(sizes), dim=1)), conv.bias, activation

    @staticmethod
    def _upsampled_pointwise(features: torch.Tensor, weight: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``weight`` (1x1) applied to ``features`` bilinearly upsampled to ``size``, mixing channels first."""
        return F.interpolate(pointwise_conv2d(features, weight), size=tuple(size), mode="bilinear", align_corners=False)

    def _add_all_dates_pointwise(self, features: torch.Tensor, per_sample: torch.Tensor, weight: torch.Tensor) -> None:
        """Add to each date's ``features`` the 1x1 ``weight`` applied to all dates' channels in that date's order.

        Parameters
        ----------
        features : torch.Tensor
            ``(B * T, out, H, W)``, updated in place.
        per_sample : torch.Tensor
            ``(B, T * C, H, W)``: every date's ``C`` channels, dates in time order.
        weight : torch.Tensor
            ``(out, T * C, 1, 1)``, input channels ordered as the dates of ``date_orders`` (own date first).

        One convolution per date with the weight's slots put in time order, added to that date's (strided) view:
        no per-date gather of the inputs, no regrouping copy of the outputs, and a gradient as cheap as the sum's.
        """
        dates = self.n_dates
        # slot_of[t, s]: where date s sits in date t's order
        slot_of = torch.argsort(self.date_orders, dim=1)
        by_slot = weight.reshape(weight.shape[0], dates, -1)  # (out, slot, C)
        per_date = features.unflatten(0, (-1, dates))
        for date in range(dates):
            per_date[:, date] += pointwise_conv2d(per_sample, by_slot[:, slot_of[date]].flatten(1)[..., None, None])

    def _decode(
        self, quarter: torch.Tensor, half_fused: torch.Tensor, full: torch.Tensor, per_sample: torch.Tensor
    ) -> torch.Tensor:
        """Decode 1/4 -> 1/2 -> full resolution.

        The first (1x1) convolution of each decoder stage, and of the refinement, reads a concatenation of
        inputs (the layout in the module docstring); it is applied here piece by piece, which is the same sum
        without copying the pieces side by side. A 1x1 convolution commutes with bilinear upsampling, so the
        coarser piece is mixed before it is upsampled, and every date's view of all dates' bands
        (``per_sample``: ``(B, T * (bands + 1), H, W)``) is mixed straight from it, date by date.
        """
        (from_quarter, from_half), bias, activation = self._pointwise(
            self.decode_half, [quarter.shape[1], half_fused.shape[1]]
        )
        decoded = self._upsampled_pointwise(quarter, from_quarter, half_fused.shape[-2:])
        decoded += pointwise_conv2d(half_fused, from_half, bias)
        decoded = self.decode_half[1](activation(decoded))

        (from_half, from_full, decode_dates), bias, activation = self._pointwise(
            self.decode_full, [decoded.shape[1], full.shape[1], self._all_dates_channels]
        )
        upsampled = self._upsampled_pointwise(decoded, from_half, full.shape[-2:])
        decoded = pointwise_conv2d(full, from_full, bias)
        decoded += upsampled
        self._add_all_dates_pointwise(decoded, per_sample, decode_dates)
        return self.decode_full[1](activation(decoded))

    def _heads(
        self, decoded: torch.Tensor, prior: torch.Tensor, per_sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the coarse and the refined estimate (normalised units) from the decoded features.

        The refinement's first (1x1) convolution is applied piece by piece, as in :meth:`_decode`.
        """
        (from_coarse, from_dates, from_decoded), refine_bias, activation = self._pointwise(
            self.refine, [self.n_bands, self._all_dates_channels, decoded.shape[1]]
        )
        coarse = prior + self.coarse_head(decoded)
        refine_in = pointwise_conv2d(coarse, from_coarse, refine_bias)
        refine_in += pointwise_conv2d(decoded, from_decoded)
        self._add_all_dates_pointwise(refine_in, per_sample, from_dates)
        refine_in = activation(refine_in)
        return coarse, coarse + self.refine[2](self.refine[1](refine_in))

    def forward(self, inputs: torch.Tensor, *, spread: bool = False) -> CMSNOutput:
        """Reconstruct every date.

        Parameters
        ----------
        inputs : torch.Tensor
            ``(B, T, bands + 1, H, W)`` float: reflectance (0 at cloudy pixels) then the cloud mask.
        spread : bool
            Also give the regression prior's spread (``CMSNOutput.spread``; what the whole-scene inference
            calibrates into its uncertainty). Training, validation and window views do not ask for it.

        Returns
        -------
        CMSNOutput
            ``coarse``, ``refined`` and ``output``, each ``(B, T, bands, H, W)``, and ``spread`` if asked.

        Raises
        ------
        ValueError
            If ``inputs`` does not have the shape the model was built for.
        """
        if inputs.ndim != 5 or inputs.shape[1] != self.n_dates or inputs.shape[2] != self.n_bands + 1:
            raise ValueError(
                f"inputs must be (batch, {self.n_dates} dates, {self.n_bands} bands + mask, H, W); "
                f"got {tuple(inputs.shape)}"
            )
        batch, dates, _, height, width = inputs.shape
        bands = inputs[:, :, : self.n_bands]
        mask = inputs[:, :, self.n_bands :].clamp(0, 1)
        clear = 1 - mask
        mean, std = self.statistics(bands, clear)
        normalised = (bands - mean) / std * clear  # cloudy pixels sit at the band mean
        variance = None
        if self.prior_name == "regression":
            prior, variance = local_regression_spread(normalised, clear, factor=self.prior_factor, spread=spread)
        else:
            prior = temporal_mean_fill(normalised, clear)
        net_inputs = torch.cat([normalised, mask], dim=2)

        pad_bottom = (-height) % _DOWNSAMPLING
        pad_right = (-width) % _DOWNSAMPLING
        padded = self._pad(net_inputs.reshape(batch * dates, -1, height, width), pad_bottom, pad_right)
        prior_padded = self._pad(prior.reshape(batch * dates, -1, height, width), pad_bottom, pad_right)
        full_height, full_width = padded.shape[-2:]

        # channels-last: oneDNN's convolutions on these few channels run faster without layout conversions; the
        # prior too, or the coarse estimate (prior + head) and with it the refinement fall back to NCHW (3x slower)
        per_sample = padded.reshape(batch, -1, full_height, full_width).contiguous(memory_format=torch.channels_last)
        padded = padded.contiguous(memory_format=torch.channels_last)
        prior_padded = prior_padded.contiguous(memory_format=torch.channels_last)
        full = self.stem(padded)
        half = self.down_half(full)
        quarter = self.encoder_blocks(self.down_quarter(half))
        quarter = quarter.reshape(batch, dates, -1, *quarter.shape[-2:])
        quarter = self.fusion(quarter)
        quarter = self.fusion_blocks(quarter.flatten(0, 1))
        half_fused = self.fusion_half(half.reshape(batch, dates, -1, *half.shape[-2:])).flatten(0, 1)

        decoded = self._decode(quarter, half_fused, full, per_sample)
        coarse_normalised, refined_normalised = self._heads(decoded, prior_padded, per_sample)

        def to_reflectance(normalised_bands: torch.Tensor) -> torch.Tensor:
            cropped = normalised_bands[..., :height, :width].reshape(batch, dates, self.n_bands, height, width)
            return cropped.float() * std + mean

        coarse = to_reflectance(coarse_normalised)
        refined = to_reflectance(refined_normalised)
        # torch.where copies input values bit for bit where the mask is clear.
        output = torch.where(mask > 0.5, refined, bands.to(refined.dtype))
        stated = None if variance is None else variance.float().sqrt() * std
        return CMSNOutput(coarse=coarse, refined=refined, output=output, spread=stated)

    def statistics(self, bands: torch.Tensor, clear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the ``(mean, std)`` that normalise ``bands`` (``(B, T, C, H, W)``), broadcastable to them."""
        return normalising_statistics(
            bands, clear, normalisation=self.normalisation, band_mean=self.band_mean, band_std=self.band_std
        )

    @staticmethod
    def _pad(images: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
        if bottom == 0 and right == 0:
            return images
        # Reflection needs the pad to be smaller than the image; tiny images fall back to replication.
        mode = "reflect" if images.shape[-2] > bottom and images.shape[-1] > right else "replicate"
        return F.pad(images, (0, right, 0, bottom), mode=mode)

    def extra_repr(self) -> str:
        """Return the config (less the architecture name) for ``repr(model)``."""
        return ", ".join(f"{key}={value}" for key, value in self.config.items() if key != "architecture")
