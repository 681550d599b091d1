"""In-Place TTT over whole sequences: the fast-weight part of the down-projection.

With slow output `Z W0^T`, the layer's output is `Z W0^T + inplace_ttt_update(...)`,
where the update term for chunk i is `eta * Z_i (S0 + sum_{j<i} c_j V_j^T Z_j)^T`:
S0 the delta carried in from earlier calls (streaming), c_j the clip factor.
"""

import torch

from .chunking import chunk_delta_sq_norms, clip_scales, compute_dtype, expand_chunk_values
from .dual import chunk_causal_dual


def clipped_targets(
    z: torch.Tensor, v: torch.Tensor, chunk_size: int, eta: float, clip_tau: float | None
) -> torch.Tensor:
    """V with the rows of each chunk scaled by that chunk's clip factor, in compute dtype."""
    vf = v.to(compute_dtype(v.dtype))
    if clip_tau is None:
        return vf
    sq_norms = chunk_delta_sq_norms(z.to(vf.dtype), vf, chunk_size)
    scales = clip_scales(sq_norms, eta, clip_tau)
    return vf * expand_chunk_values(scales, chunk_size, v.shape[1])


def inplace_ttt_update(
    z: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    eta: float,
    clip_tau: float | None = None,
    initial_delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast-weight output term, [B, T, d] in float32 (float64 for float64 inputs).

    z: [B, T, h] gated activations; v: [B, T, d] targets; initial_delta: [B, d, h]
    accumulated (clipped, not eta-scaled) deltas that precede position 0, if any.
    """
    vc = clipped_targets(z, v, chunk_size, eta, clip_tau)
    y = chunk_causal_dual(z, vc, chunk_size)
    if initial_delta is not None:
        y = y + z.to(y.dtype) @ initial_delta.transpose(1, 2)
    return eta * y
