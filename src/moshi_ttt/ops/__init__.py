"""Stateless tensor math of In-Place TTT (kernels); the modules compose these."""

from .chunking import (
    chunk_delta_sq_norms,
    chunked_future_conv,
    clip_scales,
    compute_dtype,
    expand_chunk_values,
    future_conv_partial_rows,
    pad_to_chunks,
)
from .inplace_ttt import ALGORITHMS, block_size_for, clipped_targets, inplace_ttt_update
from .scan import block_scan

__all__ = [
    "ALGORITHMS",
    "block_scan",
    "block_size_for",
    "chunk_delta_sq_norms",
    "chunked_future_conv",
    "clip_scales",
    "clipped_targets",
    "compute_dtype",
    "expand_chunk_values",
    "future_conv_partial_rows",
    "inplace_ttt_update",
    "pad_to_chunks",
]
