"""The chunk-causal dual form of In-Place TTT inside a block of chunks.

For chunk size C, `Y = (M * (Z Z^T)) V` with `M[s, t] = 1` iff chunk(s) > chunk(t):
position s reads every position of the chunks strictly before its own, never its
own chunk. The rows of chunk i of Y equal `Z_i (sum_{j < i} V_j^T Z_j)^T`, the
fast-weight term, without a d x h weight.

These functions run over the query chunks of one block, each against the keys
before it, accumulating into buffers the caller owns: no T x T matrix is kept,
and the backward recomputes every score. `scan` strings blocks together.
"""

import torch

from .matmul import baddbmm_acc_, bmm_acc


def dual_forward_(y: torch.Tensor, z: torch.Tensor, v: torch.Tensor, chunk_size: int, op: torch.dtype) -> None:
    """y += (M * (Z Z^T)) V; y float32 [B, L, d], z [B, L, h], v [B, L, d] in `op`."""
    L = z.shape[1]
    for start in range(chunk_size, L, chunk_size):
        end = min(start + chunk_size, L)
        scores = bmm_acc(z[:, start:end], z[:, :start].transpose(1, 2), op)
        baddbmm_acc_(y[:, start:end], scores, v[:, :start], op)


def dual_backward_(dz: torch.Tensor, dv: torch.Tensor, z: torch.Tensor, v: torch.Tensor,
                   dy: torch.Tensor, chunk_size: int, op: torch.dtype) -> None:
    """dz, dv += the gradients of `dual_forward_` for the output gradient dy (all float32 buffers)."""
    L = z.shape[1]
    for start in range(chunk_size, L, chunk_size):
        end = min(start + chunk_size, L)
        zq, zk, dyq = z[:, start:end], z[:, :start], dy[:, start:end].to(op)
        scores = bmm_acc(zq, zk.transpose(1, 2), op)
        baddbmm_acc_(dv[:, :start], scores.transpose(1, 2), dyq, op)
        dscores = bmm_acc(dyq, v[:, :start].transpose(1, 2), op)
        baddbmm_acc_(dz[:, start:end], dscores, zk, op)
        baddbmm_acc_(dz[:, :start], dscores.transpose(1, 2), zq, op)
