"""The chunk-causal dual form of In-Place TTT, with a backward that recomputes.

For chunk size C, `Y = (M * (Z Z^T)) V` with `M[s, t] = 1` iff chunk(s) > chunk(t):
position s reads every position of the chunks strictly before its own, never its
own chunk. Then `Z (sum_{j < i} V_j^T Z_j)^T` for the rows of chunk i equals Y,
so In-Place TTT's output is `Z W0^T + eta * Y` without a d x h weight per chunk.

The loop runs over query chunks, each against the keys before it: no T x T
matrix is stored, and the backward recomputes each block, so the memory kept
between forward and backward is Z and V only.
"""

import torch

from .chunking import compute_dtype


class _ChunkCausalDual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
        ctx.save_for_backward(z, v)
        ctx.chunk_size = chunk_size
        cd = compute_dtype(v.dtype)
        zf, vf = z.to(cd), v.to(cd)
        B, T, _ = z.shape
        y = torch.zeros(B, T, v.shape[-1], dtype=cd, device=v.device)
        for start in range(chunk_size, T, chunk_size):
            end = min(start + chunk_size, T)
            scores = zf[:, start:end] @ zf[:, :start].transpose(1, 2)
            torch.bmm(scores, vf[:, :start], out=y[:, start:end])
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        z, v = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        cd = dy.dtype
        zf, vf = z.to(cd), v.to(cd)
        T = z.shape[1]
        dz = torch.zeros_like(zf)
        dv = torch.zeros_like(vf)
        for start in range(chunk_size, T, chunk_size):
            end = min(start + chunk_size, T)
            zq, zk, dyq = zf[:, start:end], zf[:, :start], dy[:, start:end]
            scores = zq @ zk.transpose(1, 2)
            dv[:, :start].baddbmm_(scores.transpose(1, 2), dyq)
            dscores = dyq @ vf[:, :start].transpose(1, 2)
            dz[:, start:end].baddbmm_(dscores, zk)
            dz[:, :start].baddbmm_(dscores.transpose(1, 2), zq)
        return dz.to(z.dtype), dv.to(v.dtype), None


def chunk_causal_dual(z: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """`(M * (Z Z^T)) V` for z: [B, T, h], v: [B, T, d]; float32 (or float64) result."""
    return _ChunkCausalDual.apply(z, v, chunk_size)
