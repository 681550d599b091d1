"""The chunk-causal dual form of In-Place TTT inside a block of chunks.

For chunk size C, `Y = (M * (Z Z^T)) V` with `M[s, t] = 1` iff chunk(s) > chunk(t):
position s reads every position of the chunks strictly before its own, never its
own chunk. The rows of chunk i of Y equal `Z_i (sum_{j < i} V_j^T Z_j)^T`, the
fast-weight term, without a d x h weight.

The backward needs the scores `S = M * (Z Z^T)` and their gradient
`dS = M * (dY V^T)`: `dV = S^T dY`, `dZ = dS Z + dS^T Z`. Small blocks keep S from
the forward and build dS once (L x L each, in the matmul operand dtype, which is
what every product reads anyway): per pair of chunks, products of width 3h + 3d
in all. Large blocks, where L x L would outgrow the activations, recompute them a
chunk at a time (4h + 4d). Each function returns the float32 sums of one chunk's
rows, so the caller writes every row of Y, dZ and dV once.
"""

import torch

from ..common import baddbmm_acc_, bmm_acc, compute_dtype


def _acc(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, op: torch.dtype) -> torch.Tensor:
    """acc + a @ b in float32 (float64 for float64), a new tensor when acc is None."""
    return bmm_acc(a, b, op) if acc is None else baddbmm_acc_(acc, a, b, op)


KEPT_SCORES = 4096  # the default largest block (positions) whose L x L scores are kept


def block_scores(batch: int, length: int, chunk_size: int, device: torch.device, op: torch.dtype,
                 kept_scores: int) -> torch.Tensor | None:
    """[B, L, L] buffer for a block's masked scores (only the blocks below the diagonal
    are written), or None where they are recomputed: one chunk, or L > kept_scores."""
    if length <= chunk_size or length > kept_scores:
        return None
    return torch.empty(batch, length, length, dtype=op, device=device)


def dual_forward_chunk(acc: torch.Tensor | None, z_query: torch.Tensor, z_keys: torch.Tensor,
                       v_keys: torch.Tensor, op: torch.dtype, key_scales: torch.Tensor | None,
                       scores_out: torch.Tensor | None) -> torch.Tensor | None:
    """acc + (z_query z_keys^T) diag(key_scales) v_keys: one chunk's rows against the chunks before it.

    key_scales: [B, n_keys] factors of the keys' targets (the clip), or None. The
    scores z_query z_keys^T are written to `scores_out` when given, for the backward.
    """
    if z_keys.shape[1] == 0:
        return acc
    scores = bmm_acc(z_query, z_keys.transpose(1, 2), op)
    if scores_out is not None:
        scores_out.copy_(scores)
    if key_scales is not None:
        scores.mul_(key_scales[:, None, :])
    return _acc(acc, scores, v_keys, op)


def block_score_grads(v: torch.Tensor, dy: torch.Tensor, chunk_size: int, op: torch.dtype,
                      scales: torch.Tensor | None) -> torch.Tensor:
    """dS = M * (dY (cV)^T) over a block, [B, L, L] in `op` (blocks below the diagonal).

    v, dy: [B, L, d]; scales: [B, L] factors of the targets (the clip), or None.
    """
    B, L, _ = v.shape
    grads = torch.empty(B, L, L, dtype=op, device=v.device)
    for start in range(chunk_size, L, chunk_size):
        grads[:, start:start + chunk_size, :start] = _score_grad_rows(v, dy, start, start + chunk_size, op, scales)
    return grads


def _score_grad_rows(v, dy, start, end, op, scales):
    """dS[start:end, :start] in float32."""
    rows = bmm_acc(dy[:, start:end], v[:, :start].transpose(1, 2), op)
    if scales is not None:
        rows.mul_(scales[:, None, :start])
    return rows


def dual_backward_chunk(z: torch.Tensor, v: torch.Tensor, dy: torch.Tensor, start: int, end: int,
                        op: torch.dtype, scales: torch.Tensor | None, scores: torch.Tensor | None,
                        score_grads: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows [start, end) of dZ and of the gradient of the (scaled) targets, for a block.

    z [B, L, h], v [B, L, d], dy [B, L, d] of the block; scales: [B, L] factors of the
    targets (the clip), or None; `scores` and `score_grads` the block's S and dS when
    kept, else None (recomputed here). Chunk q reads the chunks before it (as a
    query) and is read by the chunks after it (as a key):
      dZ_q = dS[q, <q] Z_<q + dS[>q, q]^T Z_>q,   d(cV)_q = S[>q, q]^T dY_>q
    """
    B, L, hidden = z.shape
    dz = dv = None
    if start > 0:
        left = (score_grads[:, start:end, :start] if score_grads is not None
                else _score_grad_rows(v, dy, start, end, op, scales))
        dz = _acc(dz, left, z[:, :start], op)
    if end < L:
        if score_grads is not None:
            right = score_grads[:, end:, start:end].transpose(1, 2)
        else:  # dS[>q, q]^T = c_q V_q dY_>q^T
            right = bmm_acc(v[:, start:end], dy[:, end:].transpose(1, 2), op)
            if scales is not None:
                right.mul_(scales[:, start:end, None])
        dz = _acc(dz, right, z[:, end:], op)
        after = (scores[:, end:, start:end].transpose(1, 2) if scores is not None
                 else bmm_acc(z[:, start:end], z[:, end:].transpose(1, 2), op))
        dv = _acc(dv, after, dy[:, end:], op)
    cd = compute_dtype(op)
    if dz is None:
        dz = z.new_zeros(B, end - start, hidden, dtype=cd)
    if dv is None:
        dv = v.new_zeros(B, end - start, v.shape[-1], dtype=cd)
    return dz, dv
