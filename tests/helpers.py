"""Shared test helpers: seeded inputs, streaming runs, `moshi-ttt train` under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.func import functional_call


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


def assert_causal(layer, length, p):
    """Perturbing every input from position p on leaves the outputs before p exactly as they were
    and changes those after."""
    x, x0 = random_inputs(2, length, layer.dim)
    base = layer(x, x0)
    x2, x02 = x.clone(), x0.clone()
    x2[:, p:] += torch.randn_like(x2[:, p:])
    x02[:, p:] += torch.randn_like(x02[:, p:])
    moved = layer(x2, x02)
    assert torch.equal(moved[:, :p], base[:, :p])
    assert not torch.allclose(moved[:, p:], base[:, p:])


def assert_reset_one_sample(layer, length, reset_at):
    """Resetting sample 1's streaming state at `reset_at` starts it afresh there and leaves sample 0
    exactly as without the reset."""
    x, x0 = random_inputs(2, length, layer.dim)
    untouched = stream(layer, x, x0, [1])
    fresh = stream(layer, x[1:, reset_at:], x0[1:, reset_at:], [1])
    outs = []
    with layer.streaming(2):
        for t in range(x.shape[1]):
            if t == reset_at:
                layer.reset_streaming(torch.tensor([False, True]))
            outs.append(layer(x[:, t:t + 1], x0[:, t:t + 1]))
    outs = torch.cat(outs, dim=1)
    torch.testing.assert_close(outs[0], untouched[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1, reset_at:], fresh[0], rtol=1e-12, atol=1e-12)


def gradcheck_layer(layer, length):
    """gradcheck of the layer's output in its inputs and every parameter; returns the parameter names."""
    x, x0 = random_inputs(2, length, layer.dim)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    x.requires_grad_(True)
    x0.requires_grad_(True)

    def f(x, x0, *params):
        return functional_call(layer, dict(zip(names, params)), (x, x0))

    assert torch.autograd.gradcheck(f, (x, x0, *params))
    return names


def torchrun_train(config_path: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """`moshi-ttt train --config config_path` on two CPU processes (gloo)."""
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
               "-m", "moshi_ttt.cli", "train", "--config", str(config_path), *arguments]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
