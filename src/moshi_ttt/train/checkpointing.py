"""Training checkpoints: written atomically, the last k kept, resumed exactly.

    run_dir/checkpoints/step_000100/
        trainable.safetensors   the parameters that train, by name
        training_state.pt       optimizer, schedule, RNG states, data position, step
        config.yaml             the resolved training config

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

from ..utils.atomic import atomic_dir

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, training_state: dict[str, tp.Any],
                    config_yaml: str, keep_last: int) -> Path:
    target = checkpoint_dir(run_dir) / f"step_{step:06d}"
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_dir(target) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(training_state, tmp / "training_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
    others = [p for p in list_checkpoints(run_dir) if p != target]  # the one just written always stays
    for old in others[:max(0, len(others) - (keep_last - 1))]:
        shutil.rmtree(old)
    return target


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, tp.Any]:
    """Load the trained parameters into `model`; return the training state."""
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
    return torch.load(path / "training_state.pt", weights_only=False)
