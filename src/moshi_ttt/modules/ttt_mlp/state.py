"""Per-sample streaming state of a TTT-MLP block.

Everything is zero at a conversation's start and after a reset: the inner weights are
kept as their change from the block's learned initial values (`delta`), beside the
running sums of the current mini-batch (`ops.ttt_mlp`), the position in it and the last
inputs of the causal convolutions. Float32 (float64 for a float64 block), never a
parameter; every write is masked by `exec_mask`.
"""

from dataclasses import dataclass

import torch
from moshi.modules.streaming import State

from ...ops.ttt_mlp import InnerWeights, TTTMLPState


@dataclass
class TTTMLPStreamState(State):
    inner: TTTMLPState          # delta [B, H, ...] at the mini-batch's start, and the mini-batch's sums
    pos: torch.Tensor           # [B] position in the current mini-batch
    q_tail: torch.Tensor        # [B, K-1, d] the conv inputs before this position (K = 1: no conv)
    k_tail: torch.Tensor

    @classmethod
    def zeros(cls, batch_size: int, initial: InnerWeights, dim: int, conv_kernel: int,
              device: torch.device) -> "TTTMLPStreamState":
        dtype = torch.promote_types(initial.w1.dtype, torch.float32)

        def zeros():
            return InnerWeights(*(torch.zeros(batch_size, *t.shape, device=device, dtype=dtype) for t in initial))
        tail = max(conv_kernel - 1, 0)
        return cls(batch_size, device, inner=TTTMLPState(zeros(), zeros()),
                   pos=torch.zeros(batch_size, device=device, dtype=torch.long),
                   q_tail=torch.zeros(batch_size, tail, dim, device=device, dtype=dtype),
                   k_tail=torch.zeros(batch_size, tail, dim, device=device, dtype=dtype))

    def tensors(self) -> list[torch.Tensor]:
        return [*self.inner.delta, *self.inner.sums, self.pos, self.q_tail, self.k_tail]

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        for t in self.tensors():
            t.masked_fill_(reset_mask.view(-1, *([1] * (t.dim() - 1))), 0)

    def update(self, inner: TTTMLPState, pos: torch.Tensor) -> None:
        """Take the new inner state and position for the samples that run (in place)."""
        run = self.exec_mask
        for old, new in zip([*self.inner.delta, *self.inner.sums, self.pos], [*inner.delta, *inner.sums, pos]):
            old.copy_(torch.where(run.view(-1, *([1] * (old.dim() - 1))), new.to(old.dtype), old))
