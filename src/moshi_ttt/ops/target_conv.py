"""The targets `V = Conv1D_K(X0) W_target^T` over whole sequences, lean in memory.

The target at position t mixes the embeddings of t .. t+K-1 of its own chunk
(zero past the chunk's end), so a chunk's update reads no later chunk.

The conv sums run in float32 over spans of a few chunks and are rounded once
to the output dtype, and only X0 and the weights are saved: the backward
recomputes the conv output for W_target's gradient. For Moshi's size a float32
copy of the sequence would be 16 KB a frame and the conv output 8 KB, against
~90 KB of gated-MLP activations a frame.
"""

import torch
import torch.nn.functional as F

from .matmul import compute_dtype, linear_dtype, without_autocast

SPAN = 2048  # positions per span (rounded to whole chunks)


def _spans(length: int, chunk_size: int) -> list[slice]:
    span = chunk_size * max(1, SPAN // chunk_size)
    return [slice(s, s + span) for s in range(0, length, span)]


def _tap_views(a: torch.Tensor, b: torch.Tensor, k: int, chunk_size: int):
    """Pairs of views (a at t, b at t+k) over the positions t whose t+k is in t's chunk.

    a, b: [B, L, D] over the same span, which starts at a chunk start.
    """
    B, L, D = a.shape
    C = chunk_size
    full = L // C * C
    if full and k < C:
        yield (a[:, :full].view(B, -1, C, D)[:, :, :C - k], b[:, :full].view(B, -1, C, D)[:, :, k:])
    if L - full > k:
        yield a[:, full:L - k], b[:, full + k:]


def chunked_future_conv(x0: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Depthwise conv over positions t .. t+K-1, zero-padded at the end of each chunk.

    x0: [B, T, D] token embeddings; weight: [D, K], tap k reads position t+k.
    Returns [B, T, D] in the dtype of the product of the inputs, summed in float32
    (float64 for float64). Not differentiable: `future_conv_targets` is.
    """
    out_dtype = torch.promote_types(x0.dtype, weight.dtype)
    w = weight.to(compute_dtype(out_dtype))
    out = torch.empty(x0.shape, dtype=out_dtype, device=x0.device)
    for span in _spans(x0.shape[1], chunk_size):
        x = x0[:, span]
        acc = (x * w[:, 0]).to(w.dtype)
        for k in range(1, w.shape[1]):
            for dst, src in _tap_views(acc, x, k, chunk_size):
                dst.addcmul_(src, w[:, k])
        out[:, span] = acc
    return out


def _conv_backward(grad: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor, chunk_size: int,
                   need_x0: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of `chunked_future_conv` in x0 (if needed) and weight, span by span."""
    cd = compute_dtype(grad.dtype)
    w = weight.to(cd)
    grad_w = torch.zeros(w.shape, dtype=cd, device=w.device)
    grad_x = torch.empty_like(x0) if need_x0 else None
    for span in _spans(x0.shape[1], chunk_size):
        x, g = x0[:, span].to(cd), grad[:, span].to(cd)
        for k in range(w.shape[1]):
            for g_t, x_tk in _tap_views(g, x, k, chunk_size):  # d out[t] / d w_k = x[t+k]
                grad_w[:, k] += (g_t * x_tk).flatten(0, -2).sum(0)
        if grad_x is not None:
            acc = g * w[:, 0]
            for k in range(1, w.shape[1]):
                for g_t, acc_tk in _tap_views(g, acc, k, chunk_size):  # x[t+k] reaches out[t]
                    acc_tk.addcmul_(g_t, w[:, k])
            grad_x[:, span] = acc
    return grad_x, grad_w.to(weight.dtype)


class _FutureConvTargets(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, conv_weight, proj_weight, chunk_size):
        ctx.save_for_backward(x0, conv_weight, proj_weight)
        ctx.chunk_size = chunk_size
        dtype = linear_dtype(x0.device, proj_weight.dtype)
        with without_autocast(x0.device):
            return F.linear(chunked_future_conv(x0, conv_weight, chunk_size).to(dtype), proj_weight.to(dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x0, conv_weight, proj_weight = ctx.saved_tensors
        C = ctx.chunk_size
        need_x0, need_conv, need_proj = ctx.needs_input_grad[:3]
        grad_x0 = grad_conv = grad_proj = None
        # In the output's dtype: under autocast it differs from float32 weights'.
        if need_proj:
            conv_out = chunked_future_conv(x0, conv_weight, C).to(grad.dtype)
            grad_proj = grad.flatten(0, -2).transpose(0, 1) @ conv_out.flatten(0, -2)
            del conv_out
        if need_x0 or need_conv:
            grad_x0, grad_conv = _conv_backward(grad @ proj_weight.to(grad.dtype), x0, conv_weight, C, need_x0)
        return grad_x0, grad_conv, grad_proj, None


def future_conv_targets(x0: torch.Tensor, conv_weight: torch.Tensor, proj_weight: torch.Tensor,
                        chunk_size: int) -> torch.Tensor:
    """V = chunked_future_conv(x0) W_target^T, [B, T, d] in W_target's dtype, or autocast's
    where it is on (differentiable).

    The conv output is rounded to that dtype before the projection, as a linear
    layer of the model would see it.
    """
    return _FutureConvTargets.apply(x0, conv_weight, proj_weight, chunk_size)


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
