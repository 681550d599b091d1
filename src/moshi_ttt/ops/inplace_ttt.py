"""In-Place TTT over whole sequences: the fast-weight part of the down-projection.

The layer's output is the slow output `Z W0^T` plus the fast-weight term
(`inplace_ttt_down`, or `add_inplace_ttt_` onto a slow output computed
elsewhere, such as a LoRA layer's): for chunk i
`eta * Z_i (lambda^i S0 + sum_{j<i} lambda^(i-1-j) c_j V_j^T Z_j)^T`: S0 the delta carried
in from earlier calls (streaming), c_j the clip factor, lambda the forgetting factor
(`forget`, 1: the fast weights keep every update).
"""

import typing as tp

import torch

from .chunking import chunk_decay, chunk_delta_sq_norms, clip_scales, expand_chunk_values
from .matmul import bmm_acc, compute_dtype, operand_dtype
from .scan import add_fast_weight_term_, ttt_down_projection

Algorithm = tp.Literal["auto", "dual", "scan"]
ALGORITHMS: tuple[str, ...] = tp.get_args(Algorithm)
SCAN_BLOCK = 2048  # the longest default scan block (positions): the fastest on an H100 at Moshi's size


def dual_length_limit(dim: int, hidden: int) -> float:
    """The length up to which one dual block over the whole sequence needs fewer
    products than the scan: T (4h + 4d) <= 12 d h (~9000 positions at Moshi's size)."""
    return 12 * dim * hidden / (4 * hidden + 4 * dim)


def block_size_for(algorithm: str, length: int, dim: int, hidden: int, chunk_size: int,
                   scan_block: int | None = None) -> int:
    """The scan block size that implements `algorithm` for a sequence of `length`.

    "dual" is one block over the whole sequence (~ T^2 (4h + 4d) / 2 multiply-adds for
    forward and backward); "scan" uses blocks of `scan_block` positions rounded down to
    whole chunks (~ 6 T d h); "auto" takes the dual form up to `dual_length_limit`.
    Without `scan_block`, blocks are as long as SCAN_BLOCK (the state is read and written
    once a block) and a quarter of the dual limit (the dual part inside a block then
    costs at most a quarter of the state's products).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: expected one of {ALGORITHMS}")
    limit = dual_length_limit(dim, hidden)
    if algorithm == "auto":
        algorithm = "dual" if length <= limit else "scan"
    if algorithm == "dual":
        return -(-length // chunk_size) * chunk_size
    if scan_block is None:
        scan_block = int(min(SCAN_BLOCK, limit / 4))
    return max(chunk_size, scan_block // chunk_size * chunk_size)


def clipped_targets(
    z: torch.Tensor, v: torch.Tensor, chunk_size: int, eta: float, clip_tau: float | None
) -> torch.Tensor:
    """V with the rows of each chunk scaled by that chunk's clip factor (V itself without a clip).

    For streaming and diagnostics (float32 copies, no gradient economy); whole-sequence
    training applies the clip inside `add_fast_weight_term_`.
    """
    if clip_tau is None:
        return v
    vf = v.to(compute_dtype(v.dtype))
    sq_norms = chunk_delta_sq_norms(z.to(vf.dtype), vf, chunk_size)
    scales = clip_scales(sq_norms, eta, clip_tau)
    return vf * expand_chunk_values(scales, chunk_size, v.shape[1])


def inplace_ttt_down(
    z: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    chunk_size: int,
    eta: float,
    clip_tau: float | None = None,
    algorithm: Algorithm = "auto",
    scan_block: int | None = None,
    forget: float = 1.0,
) -> torch.Tensor:
    """The layer's down-projection `Z W0^T` plus the fast-weight term, [B, T, d] (differentiable).

    z: [B, T, h] gated activations; v: [B, T, d] targets; weight: W0, [d, h];
    algorithm, scan_block: see `block_size_for`.
    """
    block = block_size_for(algorithm, z.shape[1], v.shape[-1], z.shape[-1], chunk_size, scan_block)
    return ttt_down_projection(z, v, weight, eta, chunk_size, block, clip_tau, forget)


def add_inplace_ttt_(
    out: torch.Tensor,
    z: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    eta: float,
    clip_tau: float | None = None,
    initial_delta: torch.Tensor | None = None,
    algorithm: Algorithm = "auto",
    scan_block: int | None = None,
    forget: float = 1.0,
) -> torch.Tensor:
    """out += the fast-weight term, in place (differentiable); returns out.

    out: [B, T, d] slow output; z: [B, T, h] gated activations; v: [B, T, d] targets;
    initial_delta: [B, d, h] accumulated (clipped, not eta-scaled) deltas that precede
    position 0, if any (streaming, without gradient), read by chunk i as forget^i
    initial_delta; algorithm, scan_block: see `block_size_for`.
    """
    block = block_size_for(algorithm, z.shape[1], v.shape[-1], z.shape[-1], chunk_size, scan_block)
    out = add_fast_weight_term_(out, z, v, eta, chunk_size, block, clip_tau, forget)
    if initial_delta is not None:
        carried = bmm_acc(z, initial_delta.transpose(1, 2), operand_dtype(z.dtype, z.device))
        if forget != 1.0:
            carried.mul_(chunk_decay(forget, chunk_size, z.shape[1]).to(carried.device, carried.dtype)[None, :, None])
        out.add_(carried, alpha=eta)
    return out
