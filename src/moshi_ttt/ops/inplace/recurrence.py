"""In-Place TTT's general chunk recurrence: gates on what is kept and written, and the delta rule.

With S the fast part of the down-projection (W = W0 + eta S, S = 0 after a reset), chunk i
reads S_{i-1} (`eta Z_i S_{i-1}^T`, as in the dual form) and then

    S_i = a_i S_{i-1} + c_i E_i^T Z_i,
    E_i = V_i                            objective "dot": -grad of -<Z W^T, V> (the paper's)
    E_i = V_i - eta a_i Z_i S_{i-1}^T    objective "l2": -grad of ||Z D^T - V||^2 / 2 at the
                                         kept fast part D = eta a_i S_{i-1} (the delta rule)

a_i (decay) and c_i (write strength) are per chunk and sample, and may depend on the data
(a gate, the clip, the delta rule's step bound): a key written again with the delta rule
replaces its value, and writing the same chunk over and over converges instead of growing.

E_i reads the state, so the chunks form a scan with no dual form inside a block; its
products per chunk are those of the additive scan with blocks of one chunk. Autograd
differentiates it; each block of chunks is checkpointed, so the forward keeps one d x h
state per block and the backward replays one block at a time.
"""

import math
import typing as tp
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from ..common import compute_dtype

Objective = tp.Literal["dot", "l2"]
OBJECTIVES: tuple[str, ...] = tp.get_args(Objective)


def check_objective(objective: str, name: str = "objective") -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"{name}={objective!r}: expected one of {OBJECTIVES}")


def chunk_step(state: torch.Tensor | None, z: torch.Tensor, v: torch.Tensor, eta: float, l2: bool,
               decay: torch.Tensor | None, write: torch.Tensor | None
               ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One chunk: (its read Z S^T, or None while S is zero; its update c E^T Z; the next state).

    state: [B, d, h] or None (zero); z: [B, n, h]; v: [B, n, d]; decay, write: [B] or None (1).
    """
    read = None if state is None else torch.bmm(z, state.transpose(1, 2))
    a = None if decay is None else decay[:, None, None]
    e = v
    if l2 and read is not None:
        e = v - eta * (read if a is None else a * read)
    if write is not None:
        e = e * write[:, None, None]
    update = torch.bmm(e.transpose(1, 2), z)
    if state is None:
        return read, update, update
    return read, update, (state if a is None else a * state) + update


def _block(state, z, v, decay, write, chunk_size: int, eta: float, l2: bool):
    """The reads [B, L, d] of a block's chunks and the state after them."""
    reads = []
    for k, q in enumerate(range(0, z.shape[1], chunk_size)):
        zq, vq = z[:, q:q + chunk_size], v[:, q:q + chunk_size]
        read, _, state = chunk_step(state, zq, vq, eta, l2, None if decay is None else decay[:, k],
                                    None if write is None else write[:, k])
        reads.append(torch.zeros_like(vq) if read is None else read)
    return torch.cat(reads, dim=1), state


def chunk_recurrence(z: torch.Tensor, v: torch.Tensor, chunk_size: int, eta: float, objective: str = "dot",
                     decay: torch.Tensor | None = None, write: torch.Tensor | None = None, *,
                     initial_delta: torch.Tensor | None = None, block_chunks: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast-weight term `eta Z_i S_{i-1}^T` of every chunk, [B, T, d], and the final delta
    S after the last chunk (a partial one counts), [B, d, h], both in the compute dtype.

    z: [B, T, h] gated activations; v: [B, T, d] targets; decay, write: [B, n_chunks] factors
    a_i and c_i (None: 1); initial_delta: [B, d, h] the S that precedes position 0 (streaming),
    zero if None. block_chunks: chunks per checkpointed block, ~sqrt(n_chunks) by default.
    Differentiable in z, v, decay and write.
    """
    check_objective(objective)
    B, T, _ = z.shape
    n = -(-T // chunk_size)
    for name, factors in (("decay", decay), ("write", write)):
        if factors is not None and tuple(factors.shape) != (B, n):
            raise ValueError(f"{name} has shape {tuple(factors.shape)}: expected one factor per sample and "
                             f"chunk, {(B, n)}")
    cd = compute_dtype(z.dtype)
    z, v = z.to(cd), v.to(cd)
    decay = None if decay is None else decay.to(cd)
    write = None if write is None else write.to(cd)
    state = None if initial_delta is None else initial_delta.to(cd)
    per_block = block_chunks or max(1, math.isqrt(n))
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, v, decay, write))
    terms = []
    for first in range(0, n, per_block):
        last = min(first + per_block, n)
        start, end = first * chunk_size, min(last * chunk_size, T)
        args = (state, z[:, start:end], v[:, start:end], None if decay is None else decay[:, first:last],
                None if write is None else write[:, first:last], chunk_size, eta, objective == "l2")
        reads, state = checkpoint(_block, *args, use_reentrant=False) if grads else _block(*args)
        terms.append(reads)
    return eta * torch.cat(terms, dim=1), state


def chunk_gram_bounds(z: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, n_chunks]: a bound on the largest eigenvalue of each chunk's Z_i^T Z_i, the
    largest absolute row sum of its Gram matrix Z_i Z_i^T (Gershgorin's circles).

    As tight as the eigenvalue for rows that are orthogonal, or all alike; differentiable.
    """
    cd = compute_dtype(z.dtype)
    bounds = []
    for start in range(0, z.shape[1], chunk_size):
        zq = z[:, start:start + chunk_size].to(cd)
        bounds.append(torch.bmm(zq, zq.transpose(1, 2)).abs().sum(-1).amax(-1))
    return torch.stack(bounds, dim=1)


def l2_step_scales(z: torch.Tensor, chunk_size: int, eta: float) -> torch.Tensor:
    """[B, n_chunks]: the factor that keeps each chunk's delta-rule step stable,
    1 / max(1, eta * bound): then eta c lambda_max(Z^T Z) <= 1, so the step moves the fast
    part at most all the way to the chunk's targets along any direction, never past them."""
    return 1 / torch.clamp(eta * chunk_gram_bounds(z, chunk_size), min=1.0)


class Trace(NamedTuple):
    """One document's recurrence, chunk by chunk, from zero fast weights."""
    before: torch.Tensor        # [B, T, d] eta Z_i S_{i-1}^T: the fast term the chunk reads
    after: torch.Tensor         # [B, T, d] eta Z_i S_i^T: the same under the weights after its update
    update_norms: torch.Tensor  # [B, n] eta ||c_i E_i^T Z_i||_F
    state_norms: torch.Tensor   # [B, n] eta ||S_i||_F: the fast weights' change after the chunk


@torch.no_grad()
def recurrence_trace(z: torch.Tensor, v: torch.Tensor, chunk_size: int, eta: float, objective: str = "dot",
                     decay: torch.Tensor | None = None, write: torch.Tensor | None = None) -> Trace:
    """The diagnostics of `chunk_recurrence`'s arguments, with the d x h state kept explicitly."""
    check_objective(objective)
    cd = compute_dtype(z.dtype)
    z, v = z.to(cd), v.to(cd)
    state = None
    before, after, update_norms, state_norms = [], [], [], []
    for i, q in enumerate(range(0, z.shape[1], chunk_size)):
        zq, vq = z[:, q:q + chunk_size], v[:, q:q + chunk_size]
        read, update, state = chunk_step(state, zq, vq, eta, objective == "l2",
                                         None if decay is None else decay[:, i].to(cd),
                                         None if write is None else write[:, i].to(cd))
        before.append(torch.zeros_like(vq) if read is None else eta * read)
        after.append(eta * torch.bmm(zq, state.transpose(1, 2)))
        update_norms.append(eta * update.flatten(1).norm(dim=1))
        state_norms.append(eta * state.flatten(1).norm(dim=1))
    return Trace(torch.cat(before, 1), torch.cat(after, 1), torch.stack(update_norms, 1), torch.stack(state_norms, 1))
