"""FSDP2 for `moshi-ttt train`: one shard unit per transformer layer, sharded checkpoints.

Every `StreamingTransformerLayer` (the main transformer's and the depformer's, the unit
moshi-finetune wraps) is one `fully_shard` unit; the root holds the rest (embeddings,
output heads, norms). A TTT layer lives inside its transformer layer, so its unit's
parameters are whole while it runs: In-Place TTT's down-projection reads
`linear_out.weight` inside the layer's forward, and TTT-MLP's block runs in a forward
hook that fires before FSDP's own (it was registered first, at conversion).

On a GPU with `bf16`, the gathered parameters are bfloat16 and gradients reduce in
float32; what trains keeps float32 master shards (moshi-finetune's policy). So what
trains enters every op in bf16 (autocast still runs its float32 ops in float32), where
DDP's autocast casts only the matmuls' operands: autocast's bf16 copies of float32
weights would be saved for the backward, whole, in every process. Gradients reduce
after every micro-batch, so they stay sharded.
"""

import abc
import typing as tp
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from moshi.modules.transformer import StreamingTransformerLayer
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

SHARDED_DIR = "trainable"  # a checkpoint's DCP directory (model and optimizer shards)


def shard_model(lm: torch.nn.Module, world_size: int, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Shard `lm` in place across the process group: a unit per transformer layer, then the root."""
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if (bf16 and device.type == "cuda") else MixedPrecisionPolicy()
    units = [m for m in lm.modules() if isinstance(m, StreamingTransformerLayer)]
    for module in units + [lm]:
        _allow_class_swap(type(module))
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(lm, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return lm


def _allow_class_swap(cls: type) -> None:
    """`fully_shard` swaps a module's class for `FSDP<cls>(FSDPModule, cls)`, which CPython
    refuses for a class whose first base is `abc.ABC` (python/cpython#79229), as moshi's
    StreamingModule is. A class built over an ABC-first FSDPModule has the layout CPython
    accepts; it goes in torch's cache of FSDP classes, where fully_shard looks first."""
    from torch.distributed.fsdp._fully_shard import _fully_shard as implementation
    cache = getattr(implementation, "cls_to_fsdp_cls", None)
    if not isinstance(cache, dict):
        raise RuntimeError(f"torch {torch.__version__}: fully_shard keeps no cls_to_fsdp_cls cache; moshi's "
                           "modules cannot be sharded this way (use distributed: ddp)")
    if abc.ABC in cls.__mro__ and cls not in cache:
        cache[cls] = type(f"FSDP{cls.__name__}", (_ABCFSDPModule, cls), {"__deepcopy__": _no_deepcopy})


class _ABCFSDPModule(abc.ABC, FSDPModule):
    """FSDPModule with `abc.ABC` as its first base (see `_allow_class_swap`). The module's
    classes come before FSDPModule in the lookup, unlike in torch's class; moshi's define
    none of its methods (tests/test_fsdp.py), and `FSDPModule.__new__`'s `cls.__mro__[2]`
    is still the module's class."""


def _no_deepcopy(*_: tp.Any) -> tp.NoReturn:
    raise TypeError("a sharded module cannot be deep-copied: copy its state dict instead")


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter (a collective for a shard: every process calls it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter or gradient (all of it when not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


_TRAINABLE = StateDictOptions(ignore_frozen_params=True)


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What trains and the optimizer's state, each process writing its shards (a collective)."""
    state = {"model": get_model_state_dict(model, options=_TRAINABLE),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=_TRAINABLE)}
    dcp.save(state, checkpoint_id=str(directory / SHARDED_DIR))


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a `save_sharded` checkpoint into `model` (sharded or not, on any number of processes)."""
    state = {"model": get_model_state_dict(model, options=_TRAINABLE)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=_TRAINABLE)
    dcp.load(state, checkpoint_id=str(directory / SHARDED_DIR))
    set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_TRAINABLE)


def consolidated_state_dict(model: torch.nn.Module) -> dict[str, tp.Any]:
    """The whole model's state dict on the CPU of process 0 (empty elsewhere; a collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
