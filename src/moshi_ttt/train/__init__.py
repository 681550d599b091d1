"""`moshi-ttt train`: finetuning TTT Moshi, from a laptop smoke run to many GPUs."""

from .config import DataConfig, LoraConfig, OptimConfig, SyntheticConfig, TrainConfig
from .trainer import train

__all__ = ["DataConfig", "LoraConfig", "OptimConfig", "SyntheticConfig", "TrainConfig", "train"]
