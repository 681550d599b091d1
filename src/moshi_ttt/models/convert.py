"""`apply_ttt`: turn chosen MLPs of a moshi `LMModel` into In-Place TTT layers.

The conversion swaps `layer.gating` for an `InPlaceTTTGating` holding the same
linear modules, and routes the token embeddings X0 to it with forward hooks,
so `LMModel.forward`, `forward_text` and `LMGen` run unchanged:

- a pre-hook on the main transformer passes X0 (and the document ids of packed
  sequences, see `document_segments`) as keywords, which `StreamingTransformer`
  hands to every layer (and activation checkpointing saves with the layer's
  other inputs);
- a pre-hook on each layer takes them out of the call and, on TTT layers,
  leaves them with the gating, whose own pre-hook passes them as inputs.

Hooks are `functools.partial`s of modules, so `copy.deepcopy` keeps them consistent.
"""

import contextlib
import dataclasses
import functools
import typing as tp

import torch
from torch import nn
from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import StreamingModule

from ..modules import InPlaceTTTGating
from .config import TTTConfig

X0_KWARG = "ttt_x0"
SEGMENTS_KWARG = "ttt_segments"


def apply_ttt(lm_model: LMModel, config: TTTConfig) -> LMModel:
    """Convert `lm_model` in place and return it; every pretrained weight is kept."""
    if not isinstance(lm_model, LMModel):
        raise TypeError(f"apply_ttt expects a moshi LMModel, got {type(lm_model).__name__}")
    if getattr(lm_model, "ttt_config", None) is not None:
        raise ValueError("this LMModel already has In-Place TTT layers")
    if lm_model.is_streaming:
        raise ValueError("convert the LMModel before streaming with it, not inside `streaming(...)`")
    layers = lm_model.transformer.layers
    indices = config.layer_indices(len(layers))
    if config.x0_source in ("user", "text_user") and lm_model.num_audio_codebooks <= lm_model.dep_q:
        raise ValueError(f"ttt.x0_source={config.x0_source!r}: this model has no user audio stream")
    for i in indices:
        gating = layers[i].gating
        if not isinstance(gating, ActivationGating):
            raise TypeError(f"transformer layer {i}: expected an ActivationGating MLP, "
                            f"got {type(gating).__name__}")
        layers[i].gating = InPlaceTTTGating.from_gating(gating, **config.layer_kwargs())
    _route_embeddings(lm_model, config.x0_source)
    _forget_streaming_children(lm_model)
    lm_model.ttt_config = config
    return lm_model


def ttt_layers(model: nn.Module) -> list[tuple[str, InPlaceTTTGating]]:
    """(name, layer) of every In-Place TTT layer of a model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, InPlaceTTTGating)]


RETUNABLE = ("chunk_size", "eta", "forget", "clip_tau", "algorithm", "scan_block")  # no parameter depends on them


def retune_ttt(lm_model: LMModel, config: TTTConfig) -> None:
    """Give a converted model's TTT layers the RETUNABLE settings of `config`; any other
    difference (which layers, the target generator's shape or source) is an error."""
    current = lm_model.ttt_config
    num_layers = len(lm_model.transformer.layers)
    fixed = [f.name for f in dataclasses.fields(TTTConfig) if f.name not in RETUNABLE + ("layers", "start", "every")
             and getattr(config, f.name) != getattr(current, f.name)]
    if config.layer_indices(num_layers) != current.layer_indices(num_layers):
        fixed.insert(0, "layers")
    if fixed:
        listed = ", ".join(f"ttt.{name}: {getattr(current, name)!r} -> {getattr(config, name)!r}" for name in fixed)
        raise ValueError(f"the TTT model's structure cannot change ({listed}); only {', '.join(RETUNABLE)} can "
                         "(drop the others from the ttt section, or start from a plain Moshi)")
    for _, layer in ttt_layers(lm_model):
        for name in RETUNABLE:
            setattr(layer, name, getattr(config, name))
    lm_model.ttt_config = config


def set_ttt_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every TTT layer between In-Place TTT and the plain MLP (same weights)."""
    for _, layer in ttt_layers(model):
        layer.ttt_enabled = enabled


def _forget_streaming_children(lm_model: LMModel) -> None:
    """moshi caches each StreamingModule's streaming children on first use; the new
    TTT layers are not in such a list, so drop the lists to have them built again."""
    for module in lm_model.modules():
        if isinstance(module, StreamingModule):
            module._cached_children = None


def embedding_modules(lm_model: LMModel, source: str) -> list[nn.Module]:
    """The embedding tables whose outputs sum to X0 for a `source` that picks streams."""
    user = list(lm_model.emb[lm_model.dep_q:])
    if source == "text":
        return [lm_model.text_emb]
    if source == "user":
        return user
    if source == "text_user":
        return [lm_model.text_emb] + user
    raise ValueError(f"x0_source={source!r} does not pick streams")


def _route_embeddings(lm_model: LMModel, source: str) -> None:
    transformer = lm_model.transformer
    if source == "input":
        provider = _first_input
    elif source == "hidden":
        provider = _no_embeddings
    else:
        modules = embedding_modules(lm_model, source)
        for module in modules:
            module.register_forward_hook(_keep_output)
        provider = functools.partial(_take_kept_outputs, tuple(modules), source)
    transformer.register_forward_pre_hook(functools.partial(_pass_inputs, provider), with_kwargs=True)
    for layer in transformer.layers:
        layer.register_forward_pre_hook(_hand_inputs_to_gating, with_kwargs=True)
        if isinstance(layer.gating, InPlaceTTTGating):
            layer.gating.register_forward_pre_hook(
                functools.partial(_add_routed_inputs, source == "hidden"))
            layer.register_forward_hook(_drop_routed_inputs)


@contextlib.contextmanager
def document_segments(lm_model: LMModel, segments: torch.Tensor | None) -> tp.Iterator[None]:
    """Within the block, whole-sequence forwards of `lm_model` treat packed documents apart.

    segments: [B, T] document id of each position, T the transformer's length (for
    `LMModel.forward(codes)`, the length of `codes`). Every document gets its own
    fast weights, starting from W0.
    """
    lm_model.transformer._ttt_segments = segments
    try:
        yield
    finally:
        lm_model.transformer._ttt_segments = None


def _first_input(args: tuple) -> torch.Tensor:
    return args[0]


def _no_embeddings(args: tuple) -> None:
    return None


def _keep_output(module: nn.Module, args, output: torch.Tensor) -> None:
    module._ttt_kept_output = output


def _take_kept_outputs(modules: tuple[nn.Module, ...], source: str, args: tuple) -> torch.Tensor:
    total = None
    for module in modules:
        output = getattr(module, "_ttt_kept_output", None)
        if output is None:
            raise RuntimeError(f"x0_source={source!r} found no embedding of its streams: call the model "
                               "through LMModel.forward or forward_text")
        module._ttt_kept_output = None
        total = output if total is None else total + output
    return total


def _pass_inputs(provider: tp.Callable, transformer: nn.Module, args: tuple, kwargs: dict):
    kwargs[X0_KWARG] = provider(args)
    kwargs[SEGMENTS_KWARG] = getattr(transformer, "_ttt_segments", None)
    return args, kwargs


def _hand_inputs_to_gating(layer: nn.Module, args: tuple, kwargs: dict):
    routed = kwargs.pop(X0_KWARG, None), kwargs.pop(SEGMENTS_KWARG, None)
    if isinstance(layer.gating, InPlaceTTTGating):
        layer.gating._routed_inputs = routed
    return args, kwargs


def _add_routed_inputs(x0_is_hidden: bool, gating: InPlaceTTTGating, args: tuple):
    if len(args) != 1:
        return None
    routed = getattr(gating, "_routed_inputs", None)
    if routed is None:
        raise RuntimeError("In-Place TTT layer called without token embeddings: run the model "
                           "through LMModel.forward / forward_text, or call the layer as layer(x, x0)")
    x0, segments = routed
    return args[0], args[0] if x0_is_hidden else x0, segments


def _drop_routed_inputs(layer: nn.Module, args, output) -> None:
    layer.gating._routed_inputs = None
