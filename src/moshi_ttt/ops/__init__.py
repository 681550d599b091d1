"""Stateless tensor math of the fast-weight methods (kernels); the modules compose these.

`common` holds what the methods share (dtype policy, float32 sums, chunks); each method
has its own package (`inplace`).
"""

from .common import compute_dtype
from .inplace import ALGORITHMS, block_size_for, check_forget, inplace_ttt_add_, inplace_ttt_down

__all__ = ["ALGORITHMS", "block_size_for", "check_forget", "compute_dtype", "inplace_ttt_add_", "inplace_ttt_down"]
