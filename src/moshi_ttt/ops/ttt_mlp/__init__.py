"""TTT-MLP (Sun et al. 2024): a per-head two-layer MLP trained on the sequence as it is read.

One contract for whole sequences and for streaming: inputs, the initial state in, the
outputs and the final state out (`ttt_mlp`, `ttt_mlp_step`).
"""

from .dual import TTTMLPState, mini_batch_dual, ttt_mlp
from .inner import InnerWeights, inner_loss
from .step import ttt_mlp_step

__all__ = ["InnerWeights", "TTTMLPState", "inner_loss", "mini_batch_dual", "ttt_mlp", "ttt_mlp_step"]
