"""In-Place TTT's tensor math: the whole-sequence ops (`op`, over `scan` and `dual`), the
chunk recurrence of the delta rule and the gates (`recurrence`), the targets
(`target_conv`), the clip (`chunking`), the streaming step's Triton kernels
(`step_kernels`) and the float64 reference loops (`naive`)."""

from .chunking import chunk_delta_sq_norms, clip_scales, expand_chunk_values
from .dual import KEPT_SCORES
from .op import ALGORITHMS, block_size_for, clipped_targets, inplace_ttt_add_, inplace_ttt_down
from .recurrence import OBJECTIVES, chunk_recurrence, l2_step_scales, recurrence_trace
from .scan import check_forget, scan_add_, scan_down
from .target_conv import chunked_future_conv, future_conv_partial_rows, future_conv_targets

__all__ = [
    "ALGORITHMS",
    "KEPT_SCORES",
    "OBJECTIVES",
    "block_size_for",
    "check_forget",
    "chunk_delta_sq_norms",
    "chunk_recurrence",
    "chunked_future_conv",
    "clip_scales",
    "clipped_targets",
    "expand_chunk_values",
    "future_conv_partial_rows",
    "future_conv_targets",
    "inplace_ttt_add_",
    "inplace_ttt_down",
    "l2_step_scales",
    "recurrence_trace",
    "scan_add_",
    "scan_down",
]
