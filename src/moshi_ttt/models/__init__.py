"""TTT-enabled Moshi: conversion, configuration, checkpoints."""

from .checkpoints import (
    checkpoint_info,
    is_ttt_checkpoint,
    lm_from_checkpoint_info,
    load_lm,
    load_moshi_lm,
    load_ttt_lm,
    load_ttt_weights,
    save_moshi_lm,
    save_ttt_lm,
    save_ttt_weights,
    ttt_state_dict,
)
from .config import TTTConfig
from .convert import apply_ttt, document_segments, retune_ttt, set_ttt_enabled, ttt_layers
from .tiny import build_lm, tiny_lm_config, tiny_mimi_config

__all__ = [
    "TTTConfig",
    "apply_ttt",
    "build_lm",
    "checkpoint_info",
    "document_segments",
    "is_ttt_checkpoint",
    "lm_from_checkpoint_info",
    "load_lm",
    "load_moshi_lm",
    "load_ttt_lm",
    "load_ttt_weights",
    "retune_ttt",
    "save_moshi_lm",
    "save_ttt_lm",
    "save_ttt_weights",
    "set_ttt_enabled",
    "tiny_lm_config",
    "tiny_mimi_config",
    "ttt_layers",
    "ttt_state_dict",
]
