"""TTT-MLP, the second fast-weight method: a gated residual block beside attention."""

from .block import TTTMLPBlock
from .state import TTTMLPStreamState

__all__ = ["TTTMLPBlock", "TTTMLPStreamState"]
