"""In-Place TTT's layer: the gated MLP (`gating`), its target generator (`targets`) and
the per-sample streaming state (`state`)."""

from .gating import InPlaceTTTGating, TTTInactiveWarning
from .state import FastWeightState
from .targets import TARGET_INITS, LMAlignedTargets

__all__ = ["TARGET_INITS", "FastWeightState", "InPlaceTTTGating", "LMAlignedTargets", "TTTInactiveWarning"]
