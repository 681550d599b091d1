"""`moshi-ttt train`: finetuning TTT Moshi, from a laptop smoke run to many GPUs.

The names below load on first use, so that `moshi-ttt train --help` answers without torch.
"""

import importlib
import typing as tp

_FROM_MODULE = {**{name: ".config" for name in ("DataConfig", "LoraConfig", "OptimConfig", "SyntheticConfig",
                                                "TrainConfig")}, "train": ".trainer"}
__all__ = sorted(_FROM_MODULE)


def __getattr__(name: str) -> tp.Any:
    if name in _FROM_MODULE:
        return getattr(importlib.import_module(_FROM_MODULE[name], __name__), name)
    raise AttributeError(f"module 'moshi_ttt.train' has no attribute {name!r}")
