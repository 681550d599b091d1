"""In-Place TTT over whole sequences: the fast-weight part of the down-projection.

The layer's output is the slow output `Z W0^T` plus the fast-weight term
(`inplace_ttt_down`, or `inplace_ttt_add_` onto a slow output computed
elsewhere, such as a LoRA layer's): for chunk i
`eta * Z_i (lambda^i S0 + sum_{j<i} lambda^(i-1-j) c_j V_j^T Z_j)^T`: S0 the delta carried
in from earlier calls (streaming), c_j the clip factor, lambda the forgetting factor
(`forget`, 1: the fast weights keep every update).

Both ops take (z, v, weight or out, chunk_size, eta, clip_tau, forget), then the form
(algorithm, scan_block, kept_scores) and the state: S0 in (`initial_delta`), and out
(`output_final_delta`) the delta after the call's n chunks,
`lambda^n S0 + sum_{j<n} lambda^(n-1-j) c_j V_j^T Z_j`, which the next call carries in.
"""

import typing as tp

import torch

from ..common import bmm_acc, compute_dtype, operand_dtype
from .chunking import chunk_decay, chunk_delta_sq_norms, clip_scales, expand_chunk_values
from .dual import KEPT_SCORES
from .scan import scan_add_, scan_down

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
    training applies the clip inside `scan_add_`.
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
    forget: float = 1.0,
    *,
    algorithm: Algorithm = "auto",
    scan_block: int | None = None,
    kept_scores: int = KEPT_SCORES,
    initial_delta: torch.Tensor | None = None,
    output_final_delta: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The layer's down-projection `Z W0^T` plus the fast-weight term, [B, T, d] (differentiable).

    weight: W0, [d, h]; the rest as in `inplace_ttt_add_`.
    """
    block = block_size_for(algorithm, z.shape[1], v.shape[-1], z.shape[-1], chunk_size, scan_block)
    out = scan_down(z, v, weight, chunk_size, eta, clip_tau, forget, block_size=block, kept_scores=kept_scores)
    return _with_state(z, v, out, chunk_size, eta, clip_tau, forget, initial_delta, output_final_delta)


def inplace_ttt_add_(
    z: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    chunk_size: int,
    eta: float,
    clip_tau: float | None = None,
    forget: float = 1.0,
    *,
    algorithm: Algorithm = "auto",
    scan_block: int | None = None,
    kept_scores: int = KEPT_SCORES,
    initial_delta: torch.Tensor | None = None,
    output_final_delta: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out += the fast-weight term, in place (differentiable); returns out, or
    (out, final_delta) with `output_final_delta`.

    z: [B, T, h] gated activations; v: [B, T, d] targets; out: [B, T, d] slow output;
    algorithm, scan_block: see `block_size_for`; kept_scores: see `scan_add_`.
    initial_delta: [B, d, h] accumulated (clipped, not eta-scaled) deltas that precede
    position 0, if any (streaming, without gradient), read by chunk i as forget^i
    initial_delta. final_delta: [B, d, h] float32 (float64), the same after the call's
    chunks (a last partial one counts as a chunk).
    """
    block = block_size_for(algorithm, z.shape[1], v.shape[-1], z.shape[-1], chunk_size, scan_block)
    out = scan_add_(z, v, out, chunk_size, eta, clip_tau, forget, block_size=block, kept_scores=kept_scores)
    return _with_state(z, v, out, chunk_size, eta, clip_tau, forget, initial_delta, output_final_delta)


def _with_state(z, v, out, chunk_size, eta, clip_tau, forget, initial_delta, output_final_delta):
    """out plus the term of the carried delta, in place; and the final delta where asked for."""
    op = operand_dtype(z.dtype, z.device)
    if initial_delta is not None:
        carried = bmm_acc(z, initial_delta.transpose(1, 2), op)
        if forget != 1.0:
            carried.mul_(chunk_decay(forget, chunk_size, z.shape[1]).to(carried.device, carried.dtype)[None, :, None])
        out.add_(carried, alpha=eta)
    if not output_final_delta:
        return out
    return out, _final_delta(z, v, chunk_size, eta, clip_tau, forget, initial_delta, op)


def _final_delta(z, v, chunk_size, eta, clip_tau, forget, initial_delta, op) -> torch.Tensor:
    """lambda^n initial_delta + sum_j lambda^(n-1-j) c_j V_j^T Z_j over the n chunks of z."""
    T = z.shape[1]
    n = -(-T // chunk_size)
    scales = None
    if clip_tau is not None:
        sq_norms = chunk_delta_sq_norms(z, v, chunk_size)
        scales = expand_chunk_values(clip_scales(sq_norms, eta, clip_tau), chunk_size, T)
    if forget != 1.0:  # lambda^(n-1-j) at the positions of chunk j
        decay = chunk_decay(forget, chunk_size, n * chunk_size).flip(0)[:T]
        decay = decay.to(z.device, compute_dtype(v.dtype))[None, :, None]
        scales = decay if scales is None else scales * decay
    updates = bmm_acc((v if scales is None else v * scales).transpose(1, 2), z, op)
    if initial_delta is None:
        return updates
    if forget == 1.0:
        return initial_delta + updates
    return initial_delta * forget ** n + updates
