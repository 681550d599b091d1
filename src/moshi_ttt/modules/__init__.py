"""Layers of moshi-ttt, built on moshi's `StreamingModule`."""

from .fast_weights import FastWeightState
from .targets import TARGET_INITS, LMAlignedTargets
from .ttt_gating import InPlaceTTTGating, TTTInactiveWarning

__all__ = ["TARGET_INITS", "FastWeightState", "InPlaceTTTGating", "LMAlignedTargets", "TTTInactiveWarning"]
