"""Training checkpoints: written atomically, the last k kept, resumed exactly.

    run_dir/checkpoints/step_000100/
        trainable.safetensors   the parameters that train, by name
        training_state.pt       optimizer, schedule, RNG states, data position, step
        config.yaml             the resolved training config

Under FSDP, `trainable/` (torch.distributed.checkpoint: each process writes its shards
of what trains and of the optimizer's state) takes the place of trainable.safetensors
and of the optimizer in training_state.pt; it loads on any number of processes, sharded
or not.

Frozen parameters are not saved: a resumed run rebuilds the model from its
source (a checkpoint, or the seeded tiny config) and loads what trained on top.
"""

import random
import re
import shutil
import typing as tp
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..utils.atomic import atomic_dir, replace_dir
from .distributed import Distributed
from .fsdp import SHARDED_DIR, is_sharded, load_sharded, save_sharded

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint directory (step_NNNNNN) was written after."""
    return int(_STEP_DIR.match(checkpoint.name).group(1))


def rng_state() -> dict[str, tp.Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, tp.Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    training_state: dict[str, tp.Any], config_yaml: str, keep_last: int,
                    dist: Distributed | None = None) -> Path:
    """Write step `step`'s checkpoint and keep the last `keep_last` (with `dist`: every process
    calls it; an error on the main process is raised on all)."""
    target = checkpoint_dir(run_dir) / f"step_{step:06d}"

    def prune() -> None:
        others = [p for p in list_checkpoints(run_dir) if p != target]  # the one just written always stays
        for old in others[:max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old)

    def write() -> None:
        trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        with atomic_dir(target) as tmp:
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save({**training_state, "optimizer": optimizer.state_dict()}, tmp / "training_state.pt")
            (tmp / "config.yaml").write_text(config_yaml)
        prune()

    if is_sharded(model):
        if dist is None:
            raise ValueError("save_checkpoint: a sharded model is saved by every process: pass their Distributed")
        _save_sharded_checkpoint(target, model, optimizer, training_state, config_yaml, dist)
        _on_main_for_all(dist, prune)
    elif dist is None:
        write()
    else:
        _on_main_for_all(dist, write)
    return target


def _save_sharded_checkpoint(target: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             training_state: dict[str, tp.Any], config_yaml: str, dist: Distributed) -> None:
    """Every process writes its shards into one temporary directory (its name known to all);
    the main process completes it and renames it into place (so the processes of every node
    need to see one run_dir: a shared filesystem)."""
    tmp = target.with_name(f".{target.name}.tmp")
    _on_main_for_all(dist, lambda: _start_sharded_checkpoint(tmp))
    save_sharded(tmp, model, optimizer)

    def complete() -> None:
        torch.save(training_state, tmp / "training_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        replace_dir(tmp, target)
    _on_main_for_all(dist, complete)


def _start_sharded_checkpoint(tmp: Path) -> None:
    for stale in tmp.parent.glob(".step_*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)


def _on_main_for_all(dist: Distributed, work: tp.Callable[[], None]) -> None:
    """Run `work` on the main process; if it fails, every process raises (none waits for it)."""
    error = None
    if dist.is_main:
        try:
            work()
        except Exception as caught:  # raised again below, and on every other process
            error = caught
    failed = dist.all_reduce_max(torch.tensor([float(error is not None)], device=dist.device))
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("the main process failed to write the checkpoint (its error is in its log)")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                    ) -> dict[str, tp.Any]:
    """Load the trained parameters (and the optimizer's state) into `model`; return the training state."""
    if (path / SHARDED_DIR).is_dir():
        load_sharded(path, model, optimizer)
        return torch.load(path / "training_state.pt", weights_only=False)
    if is_sharded(model):
        raise ValueError(f"{path}: written by a run without FSDP (trainable.safetensors); resume it with "
                         "distributed: ddp, or on one process")
    state = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
    unexpected = sorted(n for n in state if n not in params)
    if missing or unexpected:
        raise ValueError(f"{path}: does not match this run's model and mode: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    training_state = torch.load(path / "training_state.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(training_state["optimizer"])
    return training_state
