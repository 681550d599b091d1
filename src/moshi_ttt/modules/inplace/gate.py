"""The data-dependent gate of In-Place TTT: how much of its fast weights a chunk keeps, and
how strongly it writes, decided by what the chunk holds.

From the mean m_i of the layer's input (its hidden states) over chunk i:

    a_i = sigmoid(w_a . m_i + b_a)        decay of the fast part after the chunk
    c_i = 2 sigmoid(w_c . m_i + b_c)      write strength of the chunk's update ("decay_write")

They start constant (w = 0): a_i = `forget`, c_i = 1, where the layer is the one with a fixed
forgetting factor. Chunk i's factors act after chunk i, so only later chunks read them.
"""

import math
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.common import compute_dtype
from ...ops.inplace.chunking import chunk_means

Gate = tp.Literal["none", "decay", "decay_write"]
GATES: tuple[str, ...] = tp.get_args(Gate)


class ChunkGate(nn.Module):
    """`decay` (and with `write`, `write`): a linear read-out of a chunk's mean input through a sigmoid."""

    def __init__(self, dim: int, forget: float, write: bool, device=None, dtype=None):
        super().__init__()
        if not 0 < forget < 1:
            raise ValueError(f"forget={forget!r}: a decay gate starts at the forgetting factor, which must be "
                             "below 1 (e.g. 0.95)")
        self.forget = forget
        self.decay = nn.Linear(dim, 1, device=device, dtype=dtype)
        self.write = nn.Linear(dim, 1, device=device, dtype=dtype) if write else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.decay.weight.zero_()
        self.decay.bias.fill_(math.log(self.forget / (1 - self.forget)))
        if self.write is not None:
            self.write.weight.zero_()
            self.write.bias.zero_()

    def factors(self, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """means: [B, n, d] -> the decay [B, n] and the write strength [B, n] (None without)."""
        cd = compute_dtype(means.dtype)

        def read_out(linear: nn.Linear) -> torch.Tensor:
            return torch.sigmoid(F.linear(means.to(cd), linear.weight.to(cd), linear.bias.to(cd)))[..., 0]
        return read_out(self.decay), None if self.write is None else 2 * read_out(self.write)

    def forward(self, x: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, T, d] the layer's input -> the factors of its chunks, [B, n_chunks] each."""
        return self.factors(chunk_means(x, chunk_size))
