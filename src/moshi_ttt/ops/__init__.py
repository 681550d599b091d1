"""Stateless tensor math of In-Place TTT (kernels); the modules compose these."""

from .chunking import (
    chunk_delta_sq_norms,
    chunked_future_conv,
    clip_scales,
    compute_dtype,
    expand_chunk_values,
    pad_to_chunks,
)
from .dual import chunk_causal_dual
from .inplace_ttt import clipped_targets, inplace_ttt_update

__all__ = [
    "chunk_causal_dual",
    "chunk_delta_sq_norms",
    "chunked_future_conv",
    "clip_scales",
    "clipped_targets",
    "compute_dtype",
    "expand_chunk_values",
    "inplace_ttt_update",
    "pad_to_chunks",
]
