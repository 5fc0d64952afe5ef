"""Tiny, structured batches of the sample-stream contract for the model tests (no files, no mocks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def make_batch(*, batch: int = 2, height: int = 24, width: int = 24, seed: int = 0, cloud_fraction: float = 0.3):
    """Three dates sharing one smooth scene with per-date gain/offset, and blob clouds pasted on them."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 4, max(height // 4, 2), max(width // 4, 2), generator=generator)
    scene = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    gain = 0.8 + 0.4 * torch.rand(batch, 3, 4, 1, 1, generator=generator)
    offset = 0.05 * torch.rand(batch, 3, 4, 1, 1, generator=generator)
    truth = (0.05 + 0.4 * scene.unsqueeze(1) * gain + offset).clamp(0, 1)
    blobs = F.interpolate(torch.rand(batch, 3, 4, 4, generator=generator), size=(height, width), mode="bilinear")
    mask = blobs > torch.quantile(blobs.flatten(1), 1 - cloud_fraction, dim=1).view(batch, 1, 1, 1)
    truth_valid = torch.ones(batch, 3, height, width, dtype=torch.bool)
    truth_valid[:, :, 0, :3] = False  # a few pixels without truth
    truth = truth * truth_valid.unsqueeze(2)
    bands = truth * (~mask).unsqueeze(2)
    inputs = torch.cat([bands, mask.unsqueeze(2).float()], dim=2).float()
    return {"inputs": inputs, "truth": truth.float(), "truth_valid": truth_valid, "sim_mask": mask & truth_valid}


@pytest.fixture(autouse=True)
def _two_threads():
    # The test machine has 2 cores shared with others.
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def batch_factory():
    return make_batch


TINY_CONFIG = {"width": 8, "depth": 1, "fusion_depth": 1, "skip_width": 4}


@pytest.fixture
def tiny_config():
    return dict(TINY_CONFIG)
