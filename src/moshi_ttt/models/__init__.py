"""TTT-enabled Moshi: conversion, configuration, checkpoints.

The names below load on first use: reading a `TTTConfig` (and the `--help` of the
commands that only parse one) needs no torch.
"""

from ..utils.lazy import lazy_names

_FROM_MODULE = {
    **{name: ".checkpoints" for name in ("checkpoint_info", "is_ttt_checkpoint", "lm_from_checkpoint_info",
                                         "load_lm", "load_moshi_lm", "load_ttt_lm", "load_ttt_weights",
                                         "save_moshi_lm", "save_ttt_lm", "save_ttt_weights", "ttt_state_dict")},
    "TTTConfig": ".config",
    **{name: ".convert" for name in ("apply_ttt", "document_segments", "retune_ttt", "set_ttt_enabled",
                                     "ttt_disabled", "ttt_layers")},
    **{name: ".tiny" for name in ("build_lm", "tiny_lm_config", "tiny_mimi_config")},
}
__all__ = sorted(_FROM_MODULE)

__getattr__ = lazy_names(__name__, _FROM_MODULE)
