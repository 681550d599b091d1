"""moshi-ttt: In-Place Test-Time Training (and TTT-MLP) for Kyutai's Moshi.

The names below load on first use, so that `moshi-ttt --help` answers without importing
torch and moshi.
"""

import os

from .utils.lazy import lazy_names

if not os.path.exists("/dev/nvidiactl") or os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
    # No NVIDIA GPU (or none visible): moshi compiles its gating kernel lazily, which on a CPU
    # only costs ~20 s at the first step; this must be set before moshi is imported to take effect.
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

_FROM_MODULE = {
    "InPlaceTTTGating": ".modules", "LMAlignedTargets": ".modules", "TTTInactiveWarning": ".modules",
    "TTTMLPBlock": ".modules",
    **{name: ".models" for name in ("TTTConfig", "apply_ttt", "build_lm", "document_segments", "load_ttt_lm",
                                    "load_ttt_weights", "save_moshi_lm", "save_ttt_lm", "save_ttt_weights",
                                    "set_ttt_enabled", "tiny_lm_config", "tiny_mimi_config", "ttt_layers")},
}
__all__ = sorted(_FROM_MODULE)
__version__ = "0.1.0"

__getattr__ = lazy_names(__name__, _FROM_MODULE)
