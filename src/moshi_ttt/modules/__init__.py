"""Layers of moshi-ttt, built on moshi's `StreamingModule`."""

from .fast_weight import FastWeightLayer
from .inplace import TARGET_INITS, FastWeightState, InPlaceTTTGating, LMAlignedTargets, TTTInactiveWarning
from .ttt_mlp import TTTMLPBlock, TTTMLPStreamState

__all__ = ["TARGET_INITS", "FastWeightLayer", "FastWeightState", "InPlaceTTTGating", "LMAlignedTargets",
           "TTTInactiveWarning", "TTTMLPBlock", "TTTMLPStreamState"]
