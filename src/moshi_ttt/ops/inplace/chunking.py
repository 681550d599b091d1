"""Chunk-local pieces of In-Place TTT: the delta clip, the forgetting factor's powers, chunk means.

They act on whole chunks of `chunk_size` positions; a chunk never reads another
chunk, which is what keeps the update of chunk i free of tokens after it.
"""

import torch

from ..common import bmm_acc, compute_dtype, operand_dtype, pad_to_chunks


def chunk_grams(z: torch.Tensor, v: torch.Tensor, start: int, end: int,
                op: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The C x C Gram matrices Z Z^T and V V^T of the rows [start, end), in float32."""
    zq, vq = z[:, start:end], v[:, start:end]
    return bmm_acc(zq, zq.transpose(1, 2), op), bmm_acc(vq, vq.transpose(1, 2), op)


def chunk_delta_sq_norms(z: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """||V_i^T Z_i||_F^2 for every chunk i, without forming the d x h delta.

    Uses ||V^T Z||_F^2 = sum((V V^T) * (Z Z^T)): two C x C Gram matrices per chunk.
    z: [B, T, h], v: [B, T, d] -> [B, n_chunks] in float32 (float64 for float64).
    """
    op = operand_dtype(z.dtype, z.device)
    norms = [torch.mul(*chunk_grams(z, v, start, start + chunk_size, op)).sum((1, 2))
             for start in range(0, z.shape[1], chunk_size)]
    return torch.stack(norms, dim=1)


def clip_scales(sq_norms: torch.Tensor, eta: float, tau: float | None) -> torch.Tensor:
    """Factor that brings ||eta * delta||_F down to tau when it is larger; 1 otherwise.

    The clamp keeps the gradient finite for an all-zero delta.
    """
    if tau is None:
        return torch.ones_like(sq_norms)
    scaled = torch.clamp(sq_norms * (eta * eta), min=tau * tau)
    return tau / torch.sqrt(scaled)


def expand_chunk_values(per_chunk: torch.Tensor, chunk_size: int, length: int) -> torch.Tensor:
    """[B, n_chunks] -> [B, length, 1]: each position gets its chunk's value."""
    return per_chunk.repeat_interleave(chunk_size, dim=1)[:, :length, None]


def chunk_decay(forget: float, chunk_size: int, length: int) -> torch.Tensor:
    """[length] float64 (on the CPU): forget^i at the positions of chunk i, the weight of the
    forgetting factor after i chunks."""
    chunks = torch.arange(length, dtype=torch.float64) // chunk_size
    return torch.tensor(forget, dtype=torch.float64) ** chunks


def chunk_means(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, D] -> [B, n_chunks, D] in the compute dtype: the mean over each chunk's positions
    (a last partial chunk over its own)."""
    x = x.to(compute_dtype(x.dtype))
    sums = pad_to_chunks(x, chunk_size).sum(2)
    counts = pad_to_chunks(torch.ones_like(x[..., :1]), chunk_size).sum(2)
    return sums / counts
