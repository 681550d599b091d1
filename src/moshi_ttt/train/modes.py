"""What trains: `ttt`, `ttt_layers`, `lora` or `full`, and the parameter groups logged.

- ttt: the TTT parameters only (In-Place's target generators, TTT-MLP's blocks).
- ttt_layers: every parameter of the transformer layers that hold TTT.
- lora: moshi's LoRA on the linear layers, plus the TTT parameters (those stay full
  matrices, not LoRA), and with `ft_embed` the embedding tables (as moshi-finetune).
- full: everything.
"""

import torch
from moshi.models.lm import LMModel
from moshi.modules.lora import LoRALinear, replace_all_linear_with_lora

from ..models.convert import TTT_MLP_SLOT, ttt_layers

GROUPS = ("ttt_target", "ttt_gate", "ttt_mlp", "w_down", "lora", "other")


def parameter_group(name: str) -> str:
    """The group a parameter's gradient norm is logged under."""
    if ".ttt_target." in name:
        return "ttt_target"
    if ".ttt_gate." in name:
        return "ttt_gate"
    if f".{TTT_MLP_SLOT}." in name:
        return "ttt_mlp"
    if "lora_A" in name or "lora_B" in name:
        return "lora"
    if ".gating.linear_out." in name and ".depformer." not in name:
        return "w_down"
    return "other"


def apply_mode(lm: LMModel, mode: str, lora_rank: int = 16, lora_scaling: float = 2.0,
               layers: list[int] | None = None, ft_embed: bool = False) -> dict[str, int]:
    """Set requires_grad for `mode` (adding LoRA for "lora"); return trainable counts per group.

    layers: the transformer layers that train in "ttt_layers" mode; by default those
    holding TTT (a baseline without TTT names the layers its TTT run converts).
    """
    if mode == "lora":
        _add_lora(lm, lora_rank, lora_scaling)
    if layers is None:
        ttt_layer_prefixes = tuple(name.rsplit(".", 1)[0] + "." for name, _ in ttt_layers(lm))
    else:
        ttt_layer_prefixes = tuple(f"transformer.layers.{i}." for i in layers)
    for name, param in lm.named_parameters():
        if mode == "full":
            trains = True
        elif mode == "ttt_layers":
            trains = name.startswith(ttt_layer_prefixes)
        elif mode == "lora":
            trains = (parameter_group(name) in ("ttt_target", "ttt_gate", "ttt_mlp", "lora")
                      or (ft_embed and "emb" in name))
        elif mode == "ttt":
            trains = parameter_group(name) in ("ttt_target", "ttt_gate", "ttt_mlp")
        else:
            raise ValueError(f"mode={mode!r}: expected one of ttt, ttt_layers, lora, full")
        param.requires_grad_(trains)
    counts = {group: 0 for group in GROUPS}
    for name, param in lm.named_parameters():
        if param.requires_grad:
            counts[parameter_group(name)] += param.numel()
    return counts


def _add_lora(lm: LMModel, rank: int, scaling: float) -> None:
    """moshi's LoRA on every linear layer but the TTT methods' own (which train whole); B
    starts at zero, so the model starts as it was."""
    replace_all_linear_with_lora(lm, rank, scaling)
    for _, layer in ttt_layers(lm):
        for name, module in list(layer.named_modules()):
            if isinstance(module, LoRALinear) and any(name.startswith(p) for p in layer.own_parameters):
                parent, _, attribute = name.rpartition(".")
                setattr(layer.get_submodule(parent), attribute, module.frozen_W)
    for module in lm.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.zeros_(module.lora_B.weight)
