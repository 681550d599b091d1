"""moshi-ttt: In-Place Test-Time Training for Kyutai's Moshi."""

import os

import torch

if not torch.cuda.is_available():
    # moshi compiles its gating kernel lazily, which on a CPU only costs ~20 s at the first
    # step; this must be set before moshi is imported to take effect.
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

from .models import (
    TTTConfig,
    apply_ttt,
    build_lm,
    document_segments,
    load_ttt_lm,
    load_ttt_weights,
    save_ttt_lm,
    save_ttt_weights,
    set_ttt_enabled,
    tiny_lm_config,
    tiny_mimi_config,
    ttt_layers,
)
from .modules import InPlaceTTTGating, LMAlignedTargets, TTTInactiveWarning

__all__ = [
    "InPlaceTTTGating",
    "LMAlignedTargets",
    "TTTConfig",
    "TTTInactiveWarning",
    "apply_ttt",
    "build_lm",
    "document_segments",
    "load_ttt_lm",
    "load_ttt_weights",
    "save_ttt_lm",
    "save_ttt_weights",
    "set_ttt_enabled",
    "tiny_lm_config",
    "tiny_mimi_config",
    "ttt_layers",
]
__version__ = "0.1.0"
