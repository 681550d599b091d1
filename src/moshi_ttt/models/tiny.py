"""A tiny random-weight Moshi with the real one's structure, for smoke runs and tests.

Same kinds of streams as Moshi 7B (text, then the model's and the user's audio
codebooks, with the acoustic delay), rope attention with a finite context, a
depformer with weights per step; only the sizes are small.
"""

import copy
import typing as tp

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.models.loaders import get_moshi_lm

from .config import TTTConfig
from .convert import apply_ttt


def tiny_lm_config(**overrides: tp.Any) -> dict[str, tp.Any]:
    """moshi `LMModel` kwargs of a small Moshi-shaped model (2 + 2 audio codebooks)."""
    config: dict[str, tp.Any] = {
        "dim": 64,
        "text_card": 120,
        "existing_text_padding_id": 3,
        "n_q": 4,
        "dep_q": 2,
        "card": 64,
        "num_heads": 4,
        "num_layers": 4,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "context": 64,
        "max_period": 10000,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": 32,
        "depformer_dim_feedforward": 64,
        "depformer_num_heads": 2,
        "depformer_num_layers": 2,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_context": 2,
        "depformer_max_period": 10000,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "delays": [0, 0, 1, 0, 1],
    }
    config.update(overrides)
    return config


def build_lm(moshi_config: dict[str, tp.Any], ttt: TTTConfig | None = None, *, seed: int = 0,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LMModel:
    """A random-weight `LMModel` from moshi kwargs (seeded), converted when `ttt` is given."""
    torch.manual_seed(seed)
    lm = get_moshi_lm(None, lm_kwargs=moshi_config, device=device, dtype=dtype)
    lm.moshi_config = dict(moshi_config)
    if ttt is not None:
        apply_ttt(lm, ttt)
    return lm


def tiny_mimi_config(card: int = 64) -> dict[str, tp.Any]:
    """moshi's Mimi config with small widths; `card` codes per codebook (the LM's `card`)."""
    config = copy.deepcopy(loaders._mimi_config)
    config["seanet"].update(dimension=32, n_filters=4)
    config["quantizer"].update(dimension=16, n_q=8, bins=card, input_dimension=32, output_dimension=32)
    config["transformer"].update(d_model=32, num_heads=2, num_layers=1, dim_feedforward=64,
                                 input_dimension=32, output_dimensions=[32])
    return config
