"""Shared test helpers: seeded inputs, streaming runs, `moshi-ttt train` under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import torch


def random_inputs(batch, length, dim, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=g, dtype=dtype)
    x0 = torch.randn(batch, length, dim, generator=g, dtype=dtype)
    return x, x0


def stream(layer, x, x0, step_sizes):
    """Run the layer in streaming mode over steps of the given sizes (cycled)."""
    outs = []
    with layer.streaming(x.shape[0]):
        t, i = 0, 0
        while t < x.shape[1]:
            size = step_sizes[i % len(step_sizes)]
            outs.append(layer(x[:, t:t + size], x0[:, t:t + size]))
            t += size
            i += 1
    return torch.cat(outs, dim=1)


def torchrun_train(config_path: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """`moshi-ttt train --config config_path` on two CPU processes (gloo)."""
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
               "-m", "moshi_ttt.cli", "train", "--config", str(config_path), *arguments]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
