"""The CMSN network, its losses and checkpoints (imports torch; ``import cmsn_cube`` alone does not)."""

from __future__ import annotations

from cmsn_cube.model.checkpoint import (
    build_model,
    list_models,
    load_checkpoint,
    load_model,
    model_card,
    save_checkpoint,
)
from cmsn_cube.model.cmsn import ARCHITECTURE, CMSN, CMSNOutput
from cmsn_cube.model.losses import DEFAULT_LOSS_WEIGHTS, CMSNLoss, cmsn_loss
from cmsn_cube.model.mfam import MFAM
from cmsn_cube.model.resfft import ResFFTConv

__all__ = [
    "ARCHITECTURE",
    "CMSN",
    "CMSNLoss",
    "CMSNOutput",
    "DEFAULT_LOSS_WEIGHTS",
    "MFAM",
    "ResFFTConv",
    "build_model",
    "cmsn_loss",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_card",
    "save_checkpoint",
]
