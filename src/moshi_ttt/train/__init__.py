"""`moshi-ttt train`: finetuning TTT Moshi, from a laptop smoke run to many GPUs.

The names below load on first use, so that `moshi-ttt train --help` answers without torch.
"""

from ..utils.lazy import lazy_names

_FROM_MODULE = {**{name: ".config" for name in ("DataConfig", "LoraConfig", "OptimConfig", "SyntheticConfig",
                                                "TrainConfig")}, "train": ".trainer"}
__all__ = sorted(_FROM_MODULE)

__getattr__ = lazy_names(__name__, _FROM_MODULE)
