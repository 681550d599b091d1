"""Chunk-local pieces of In-Place TTT: the target convolution and the delta clip.

Both act on whole chunks of `chunk_size` positions; a chunk never reads another
chunk, which is what keeps the update of chunk i free of tokens after it.
"""

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Fast-weight math runs in float32, or float64 when the inputs are float64."""
    return torch.promote_types(dtype, torch.float32)


def pad_to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, D] -> [B, n_chunks, chunk_size, D], zero-padding the last chunk."""
    B, T, D = x.shape
    n_chunks = -(-T // chunk_size)
    x = F.pad(x, (0, 0, 0, n_chunks * chunk_size - T))
    return x.view(B, n_chunks, chunk_size, D)


def chunked_future_conv(x0: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Depthwise conv over positions t .. t+K-1, zero-padded at the end of each chunk.

    x0: [B, T, D] token embeddings; weight: [D, K], tap k reads position t+k.
    Returns [B, T, D] in the dtype of the product of the inputs.
    """
    B, T, D = x0.shape
    K = weight.shape[1]
    chunks = pad_to_chunks(x0, chunk_size)
    chunks = F.pad(chunks, (0, 0, 0, K - 1))  # the zero padding at each chunk's end
    out = chunks[:, :, 0:chunk_size] * weight[:, 0]
    for k in range(1, K):
        out = out + chunks[:, :, k:k + chunk_size] * weight[:, k]
    return out.reshape(B, -1, D)[:, :T]


def future_conv_partial_rows(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The conv of the last K positions from the K embeddings seen so far (streaming).

    window: [B, K, D], the embeddings at positions p-K+1 .. p; weight: [D, K].
    Row j of the result is the conv at position p-j with the taps past p left at
    zero: its final value if the chunk ends at p, else a partial one. The sum runs
    over taps in the same order as `chunked_future_conv`.
    """
    K = weight.shape[1]
    rows = []
    for j in range(K):
        row = window[:, K - 1 - j] * weight[:, 0]
        for k in range(1, j + 1):
            row = row + window[:, K - 1 - j + k] * weight[:, k]
        rows.append(row)
    return torch.stack(rows, dim=1)


def chunk_delta_sq_norms(z: torch.Tensor, v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """||V_i^T Z_i||_F^2 for every chunk i, without forming the d x h delta.

    Uses ||V^T Z||_F^2 = sum((V V^T) * (Z Z^T)): two C x C Gram matrices per chunk.
    z: [B, T, h], v: [B, T, d] -> [B, n_chunks].
    """
    zc = pad_to_chunks(z, chunk_size)
    vc = pad_to_chunks(v, chunk_size)
    gram_z = zc @ zc.transpose(-1, -2)
    gram_v = vc @ vc.transpose(-1, -2)
    return (gram_z * gram_v).sum(dim=(-1, -2))


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
