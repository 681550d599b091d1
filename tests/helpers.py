"""Shared test helpers: seeded inputs and streaming runs."""

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
