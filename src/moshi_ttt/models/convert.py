"""`apply_ttt`: turn chosen layers of a moshi `LMModel` into test-time-trained ones.

A method registry says where each method goes (`METHODS`):

- "inplace" swaps `layer.gating` for an `InPlaceTTTGating` holding the same linear
  modules; its targets need the token embeddings X0;
- "ttt_mlp" adds `layer.ttt_mlp`, a gated residual `TTTMLPBlock` that a forward hook
  applies to the layer's output (moshi's layer has no seam between its attention and its
  MLP, so the block follows the MLP: the same place as before the next layer's attention).

Inputs reach the layers with forward hooks, so `LMModel.forward`, `forward_text` and
`LMGen` run unchanged:

- a pre-hook on the main transformer passes X0 (and the document ids of packed
  sequences, see `document_segments`) as keywords, which `StreamingTransformer`
  hands to every layer (and activation checkpointing saves with the layer's
  other inputs);
- a pre-hook on each layer takes them out of the call and leaves them with the layer's
  fast-weight modules: the In-Place gating's own pre-hook passes them as inputs, the
  TTT-MLP block's hook reads the document ids.

Hooks are `functools.partial`s of modules, so `copy.deepcopy` keeps them consistent.
"""

import contextlib
import copy
import dataclasses
import functools
import typing as tp

import torch
from torch import nn
from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer

from ..modules import InPlaceTTTGating
from ..modules.fast_weight import FastWeightLayer
from ..modules.ttt_mlp import TTTMLPBlock
from .config import TTTConfig

X0_KWARG = "ttt_x0"
SEGMENTS_KWARG = "ttt_segments"
TTT_MLP_SLOT = "ttt_mlp"


def _check_gating(layer: StreamingTransformerLayer, index: int, config: TTTConfig) -> None:
    gating = layer.gating
    if not isinstance(gating, ActivationGating):
        raise TypeError(f"transformer layer {index}: expected an ActivationGating MLP, got {type(gating).__name__}")
    if not (isinstance(gating.linear_in, nn.Linear) and isinstance(gating.linear_out, nn.Linear)):
        raise TypeError(f"transformer layer {index}: quantized or LoRA-wrapped gating cannot be converted: "
                        f"linear_in is {type(gating.linear_in).__name__}")


def _convert_gating(layer: StreamingTransformerLayer, index: int, config: TTTConfig) -> None:
    layer.gating = InPlaceTTTGating.from_gating(layer.gating, **config.layer_kwargs())


def _check_ttt_mlp_slot(layer: StreamingTransformerLayer, index: int, config: TTTConfig) -> None:
    if hasattr(layer, TTT_MLP_SLOT):
        raise ValueError(f"transformer layer {index} already has a TTT-MLP block")
    dim, heads = layer.self_attn.embed_dim, config.heads or layer.self_attn.num_heads
    if dim % heads:
        raise ValueError(f"ttt.heads={heads}: the model dimension {dim} of transformer layer {index} is not a "
                         "multiple of it")


def _add_ttt_mlp_block(layer: StreamingTransformerLayer, index: int, config: TTTConfig) -> None:
    heads = config.heads or layer.self_attn.num_heads
    reference = next(layer.parameters())
    block = TTTMLPBlock(layer.self_attn.embed_dim, heads, copy.deepcopy(layer.norm2), device=reference.device,
                        dtype=reference.dtype, **config.layer_kwargs())
    setattr(layer, TTT_MLP_SLOT, block.train(layer.training))
    layer.register_forward_hook(_apply_ttt_mlp_block)


@dataclasses.dataclass(frozen=True)
class Method:
    """Where a method's layers go and what they read."""

    check: tp.Callable[[StreamingTransformerLayer, int, TTTConfig], None]  # before any layer changes
    convert: tp.Callable[[StreamingTransformerLayer, int, TTTConfig], None]
    reads_embeddings: bool  # whether the layers need X0 (the token embeddings)


METHODS: dict[str, Method] = {
    "inplace": Method(_check_gating, _convert_gating, reads_embeddings=True),
    "ttt_mlp": Method(_check_ttt_mlp_slot, _add_ttt_mlp_block, reads_embeddings=False),
}


def apply_ttt(lm_model: LMModel, config: TTTConfig | tp.Sequence[TTTConfig]) -> LMModel:
    """Convert `lm_model` in place and return it; every pretrained weight is kept.

    config: one TTTConfig, or several (one method each, on disjoint layers: e.g. In-Place
    TTT on some layers and TTT-MLP on others). `lm_model.ttt_configs` records them, and
    `lm_model.ttt_config` the first.
    """
    if not isinstance(lm_model, LMModel):
        raise TypeError(f"apply_ttt expects a moshi LMModel, got {type(lm_model).__name__}")
    if getattr(lm_model, "ttt_config", None) is not None:
        raise ValueError("this LMModel already has In-Place TTT layers or TTT-MLP blocks: "
                         "convert it once, with every config")
    if lm_model.is_streaming:
        raise ValueError("convert the LMModel before streaming with it, not inside `streaming(...)`")
    configs = [config] if isinstance(config, TTTConfig) else list(config)
    if not configs or not all(isinstance(c, TTTConfig) for c in configs):
        raise TypeError(f"apply_ttt expects a TTTConfig or a list of them, got {config!r}")
    layers = lm_model.transformer.layers
    chosen = [c.layer_indices(len(layers)) for c in configs]
    _check_disjoint(configs, chosen)
    embedding_configs = [c for c in configs if METHODS[c.method].reads_embeddings]
    if len({c.x0_source for c in embedding_configs}) > 1:
        raise ValueError("In-Place TTT configs of one model must share ttt.x0_source, got "
                         f"{[c.x0_source for c in embedding_configs]}")
    x0_source = embedding_configs[0].x0_source if embedding_configs else None
    if x0_source in ("user", "text_user") and lm_model.num_audio_codebooks <= lm_model.dep_q:
        raise ValueError(f"ttt.x0_source={x0_source!r}: this model has no user audio stream")
    for convert in ("check", "convert"):  # every check first: an error leaves the model as it was
        for c, indices in zip(configs, chosen):
            for i in indices:
                getattr(METHODS[c.method], convert)(layers[i], i, c)
    _route_inputs(lm_model, x0_source)
    _forget_streaming_children(lm_model)
    lm_model.ttt_configs = tuple(configs)
    lm_model.ttt_config = configs[0]
    return lm_model


def _check_disjoint(configs: list[TTTConfig], chosen: list[list[int]]) -> None:
    seen: dict[int, int] = {}
    for n, indices in enumerate(chosen):
        for i in indices:
            if i in seen:
                raise ValueError(f"transformer layer {i} is chosen by ttt config {seen[i]} "
                                 f"(method {configs[seen[i]].method}) and {n} (method {configs[n].method}): "
                                 "each layer takes one method")
            seen[i] = n


def ttt_layers(model: nn.Module) -> list[tuple[str, FastWeightLayer]]:
    """(name, layer) of every fast-weight layer of a model, whatever its method."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FastWeightLayer)]


RETUNABLE = {  # per method, the settings no parameter depends on
    "inplace": ("chunk_size", "eta", "forget", "clip_tau", "objective", "algorithm", "scan_block"),
    "ttt_mlp": ("base_lr", "scan_group"),
}
CONVERSION_ONLY = ("gate_init",)  # read once, when a block is made: a converted model ignores them


def retune_ttt(lm_model: LMModel, config: TTTConfig) -> None:
    """Give a converted model's TTT layers the RETUNABLE settings of `config`; any other
    difference (which layers, the method, the target generator's shape or source) is an error.
    In a model that mixes methods, `config` retunes the layers of its own method and layers."""
    configs = list(lm_model.ttt_configs)
    num_layers = len(lm_model.transformer.layers)
    same_place = [i for i, c in enumerate(configs) if c.method == config.method
                  and c.layer_indices(num_layers) == config.layer_indices(num_layers)]
    index = same_place[0] if same_place else 0
    current = configs[index]
    retunable = RETUNABLE[current.method]
    free = retunable + CONVERSION_ONLY + ("layers", "start", "every")
    fixed = [f.name for f in dataclasses.fields(TTTConfig) if f.name not in free
             and getattr(config, f.name) != getattr(current, f.name)]
    if config.layer_indices(num_layers) != current.layer_indices(num_layers):
        fixed.insert(0, "layers")
    if current.method == "inplace" and current.gate != "none" and config.forget != current.forget:
        fixed.append("forget")  # a gate's starting decay, learned since: retuning it would change nothing
    if fixed:
        listed = ", ".join(f"ttt.{name}: {getattr(current, name)!r} -> {getattr(config, name)!r}" for name in fixed)
        places = ", ".join(f"{c.method} on layers {c.layer_indices(num_layers)}" for c in configs)
        mixed = (f"; this model mixes methods ({places}): a ttt section retunes the layers whose method and "
                 "layers it names (by default the first's)" if len(configs) > 1 else "")
        raise ValueError(f"the TTT model's structure cannot change ({listed}); only {', '.join(retunable)} can "
                         f"(drop the others from the ttt section, or start from a plain Moshi){mixed}")
    slot = "gating" if config.method == "inplace" else TTT_MLP_SLOT
    for i in config.layer_indices(num_layers):
        for name in retunable:
            setattr(getattr(lm_model.transformer.layers[i], slot), name, getattr(config, name))
    configs[index] = config
    lm_model.ttt_configs = tuple(configs)
    lm_model.ttt_config = configs[0]


@contextlib.contextmanager
def ttt_disabled(model: nn.Module) -> tp.Iterator[None]:
    """Within the block, the same weights without test-time training (`set_ttt_enabled`)."""
    set_ttt_enabled(model, False)
    try:
        yield
    finally:
        set_ttt_enabled(model, True)


def set_ttt_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every TTT layer between test-time training and the same weights without it
    (In-Place: the plain MLP; TTT-MLP: the inner MLPs kept at their initial weights)."""
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


def _route_inputs(lm_model: LMModel, x0_source: str | None) -> None:
    """Hooks that bring X0 (the embeddings of `x0_source`; None: no layer reads them) and the
    document ids of packed sequences to the fast-weight layers."""
    transformer = lm_model.transformer
    if x0_source is None or x0_source == "hidden":
        provider = _no_embeddings
    elif x0_source == "input":
        provider = _first_input
    else:
        modules = embedding_modules(lm_model, x0_source)
        for module in modules:
            module.register_forward_hook(_keep_output)
        provider = functools.partial(_take_kept_outputs, tuple(modules), x0_source)
    transformer.register_forward_pre_hook(functools.partial(_pass_inputs, provider), with_kwargs=True)
    for layer in transformer.layers:
        layer.register_forward_pre_hook(_hand_inputs_to_fast_weight_layers, with_kwargs=True)
        if isinstance(layer.gating, InPlaceTTTGating):
            layer.gating.register_forward_pre_hook(
                functools.partial(_add_routed_inputs, x0_source == "hidden"))
        if _fast_weight_children(layer):
            layer.register_forward_hook(_drop_routed_inputs)


def _fast_weight_children(layer: nn.Module) -> list[FastWeightLayer]:
    return [m for m in (layer.gating, getattr(layer, TTT_MLP_SLOT, None)) if isinstance(m, FastWeightLayer)]


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


def _hand_inputs_to_fast_weight_layers(layer: nn.Module, args: tuple, kwargs: dict):
    routed = kwargs.pop(X0_KWARG, None), kwargs.pop(SEGMENTS_KWARG, None)
    for module in _fast_weight_children(layer):
        module._routed_inputs = routed
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


def _apply_ttt_mlp_block(layer: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    block = getattr(layer, TTT_MLP_SLOT)
    routed = getattr(block, "_routed_inputs", None)
    return block(output, None if routed is None else routed[1])


def _drop_routed_inputs(layer: nn.Module, args, output) -> None:
    for module in _fast_weight_children(layer):
        module._routed_inputs = None
