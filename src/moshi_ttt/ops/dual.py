"""The chunk-causal dual form of In-Place TTT, one chunk's rows at a time.

For chunk size C, `Y = (M * (Z Z^T)) V` with `M[s, t] = 1` iff chunk(s) > chunk(t):
position s reads every position of the chunks strictly before its own, never its
own chunk. The rows of chunk i of Y equal `Z_i (sum_{j < i} V_j^T Z_j)^T`, the
fast-weight term, without a d x h weight.

Each function returns the float32 sums of one chunk's rows, so the caller writes
every row of Y, dZ and dV once; no T x T matrix is kept, and the backward
recomputes the scores it needs.
"""

import torch

from .chunking import compute_dtype
from .matmul import baddbmm_acc_, bmm_acc


def _acc(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, op: torch.dtype) -> torch.Tensor:
    """acc + a @ b in float32 (float64 for float64), a new tensor when acc is None."""
    return bmm_acc(a, b, op) if acc is None else baddbmm_acc_(acc, a, b, op)


def dual_forward_chunk(acc: torch.Tensor | None, z_query: torch.Tensor, z_keys: torch.Tensor,
                       v_keys: torch.Tensor, op: torch.dtype,
                       key_scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """acc + (z_query z_keys^T) diag(key_scales) v_keys: one chunk's rows against the chunks before it.

    key_scales: [B, n_keys] factors of the keys' targets (the clip), or None.
    """
    if z_keys.shape[1] == 0:
        return acc
    scores = bmm_acc(z_query, z_keys.transpose(1, 2), op)
    if key_scales is not None:
        scores.mul_(key_scales[:, None, :])
    return _acc(acc, scores, v_keys, op)


def dual_backward_chunk(z: torch.Tensor, v: torch.Tensor, dy: torch.Tensor, start: int, end: int,
                        op: torch.dtype, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows [start, end) of dZ and of the gradient of the (scaled) targets, for a block.

    z [B, L, h], v [B, L, d], dy [B, L, d] of the block; scales: [B, L] factors of the
    targets (the clip), or None. Chunk q reads the chunks before it (as a query) and
    is read by the chunks after it (as a key); with cV the scaled targets:
      dZ_q = (dY_q cV_<q^T) Z_<q + (cV_q dY_>q^T) Z_>q,   d(cV)_q = (Z_q Z_>q^T) dY_>q
    """
    B, L, hidden = z.shape
    zq, vq, dyq = z[:, start:end], v[:, start:end], dy[:, start:end]
    dz = dv = None
    if start > 0:
        dscores = bmm_acc(dyq, v[:, :start].transpose(1, 2), op)
        if scales is not None:
            dscores.mul_(scales[:, None, :start])
        dz = _acc(dz, dscores, z[:, :start], op)
    if end < L:
        zk, dyk = z[:, end:], dy[:, end:]
        dscores = bmm_acc(vq, dyk.transpose(1, 2), op)
        if scales is not None:
            dscores.mul_(scales[:, start:end, None])
        dz = _acc(dz, dscores, zk, op)
        dv = _acc(dv, bmm_acc(zq, zk.transpose(1, 2), op), dyk, op)
    cd = compute_dtype(op)
    if dz is None:
        dz = z.new_zeros(B, end - start, hidden, dtype=cd)
    if dv is None:
        dv = v.new_zeros(B, end - start, v.shape[-1], dtype=cd)
    return dz, dv
