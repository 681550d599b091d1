"""Stateless tensor math of In-Place TTT (kernels); the modules compose these."""

from .chunking import (
    chunk_decay,
    chunk_delta_sq_norms,
    clip_scales,
    expand_chunk_values,
    pad_to_chunks,
)
from .inplace_ttt import ALGORITHMS, add_inplace_ttt_, block_size_for, clipped_targets, inplace_ttt_down
from .matmul import compute_dtype
from .scan import add_fast_weight_term_, check_forget, ttt_down_projection
from .target_conv import chunked_future_conv, future_conv_partial_rows, future_conv_targets

__all__ = [
    "ALGORITHMS",
    "add_fast_weight_term_",
    "add_inplace_ttt_",
    "block_size_for",
    "chunk_decay",
    "check_forget",
    "chunk_delta_sq_norms",
    "chunked_future_conv",
    "clip_scales",
    "clipped_targets",
    "compute_dtype",
    "expand_chunk_values",
    "future_conv_partial_rows",
    "future_conv_targets",
    "inplace_ttt_down",
    "pad_to_chunks",
    "ttt_down_projection",
]
