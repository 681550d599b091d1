"""The targets `V = Conv1D_K(X0) W_target^T` over whole sequences, lean in memory.

The target at position t mixes the embeddings of t-P .. t+K-1-P of its own chunk
(zero outside it), so a chunk's update reads no other chunk. P, the taps that read
the past, is 0 by default (t .. t+K-1, the next tokens); the official In-Place TTT
code centres a kernel of 5 on t (P = 2).

The conv sums run in float32 over spans of a few chunks and are rounded once
to the output dtype, and only X0 and the weights are saved: the backward
recomputes the conv output for W_target's gradient. For Moshi's size a float32
copy of the sequence would be 16 KB a frame and the conv output 8 KB, against
~90 KB of gated-MLP activations a frame.
"""

import torch
import torch.nn.functional as F

from ..common import compute_dtype, linear_dtype, without_autocast

SPAN = 2048  # the default positions per span (rounded down to whole chunks)


def _spans(length: int, chunk_size: int, span: int) -> list[slice]:
    span = chunk_size * max(1, span // chunk_size)
    return [slice(s, s + span) for s in range(0, length, span)]


def _tap_pairs(dst: torch.Tensor, src: torch.Tensor, offset: int, chunk_size: int):
    """Pairs of views (dst at t, src at t+offset) over the positions whose t+offset is in t's chunk."""
    if offset >= 0:
        yield from _tap_views(dst, src, offset, chunk_size)
    else:
        for src_t, dst_t in _tap_views(src, dst, -offset, chunk_size):
            yield dst_t, src_t


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


def chunked_future_conv(x0: torch.Tensor, weight: torch.Tensor, chunk_size: int, past: int = 0,
                        span: int = SPAN) -> torch.Tensor:
    """Depthwise conv over positions t-P .. t+K-1-P (P = `past`), zero-padded at both ends
    of each chunk.

    x0: [B, T, D] token embeddings; weight: [D, K], tap k reads position t+k-P; span: the
    positions summed in float32 at a time. Returns [B, T, D] in the dtype of the product
    of the inputs, summed in float32 (float64 for float64), taps in order. Not
    differentiable: `future_conv_targets` is.
    """
    out_dtype = torch.promote_types(x0.dtype, weight.dtype)
    w = weight.to(compute_dtype(out_dtype))
    out = torch.empty(x0.shape, dtype=out_dtype, device=x0.device)
    for rows in _spans(x0.shape[1], chunk_size, span):
        x = x0[:, rows]
        acc = torch.zeros(x.shape, dtype=w.dtype, device=x.device)
        for k in range(w.shape[1]):
            for dst, src in _tap_pairs(acc, x, k - past, chunk_size):
                dst.addcmul_(src, w[:, k])
        out[:, rows] = acc
    return out


def _conv_backward(grad: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor, chunk_size: int, past: int,
                   span: int, need_x0: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of `chunked_future_conv` in x0 (if needed) and weight, span by span."""
    cd = compute_dtype(grad.dtype)
    w = weight.to(cd)
    grad_w = torch.zeros(w.shape, dtype=cd, device=w.device)
    grad_x = torch.empty_like(x0) if need_x0 else None
    for rows in _spans(x0.shape[1], chunk_size, span):
        x, g = x0[:, rows].to(cd), grad[:, rows].to(cd)
        for k in range(w.shape[1]):
            for g_t, x_tk in _tap_pairs(g, x, k - past, chunk_size):  # d out[t] / d w_k = x[t+k-P]
                grad_w[:, k] += (g_t * x_tk).flatten(0, -2).sum(0)
        if grad_x is not None:
            acc = torch.zeros_like(g)
            for k in range(w.shape[1]):
                for g_t, acc_tk in _tap_pairs(g, acc, k - past, chunk_size):  # x[t+k-P] reaches out[t]
                    acc_tk.addcmul_(g_t, w[:, k])
            grad_x[:, rows] = acc
    return grad_x, grad_w.to(weight.dtype)


class _FutureConvTargets(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, conv_weight, proj_weight, chunk_size, past, span):
        ctx.save_for_backward(x0, conv_weight, proj_weight)
        ctx.chunk_size, ctx.past, ctx.span = chunk_size, past, span
        dtype = linear_dtype(x0.device, proj_weight.dtype)
        with without_autocast(x0.device):
            conv_out = chunked_future_conv(x0, conv_weight, chunk_size, past, span)
            return F.linear(conv_out.to(dtype), proj_weight.to(dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x0, conv_weight, proj_weight = ctx.saved_tensors
        C, past, span = ctx.chunk_size, ctx.past, ctx.span
        need_x0, need_conv, need_proj = ctx.needs_input_grad[:3]
        grad_x0 = grad_conv = grad_proj = None
        # In the output's dtype: under autocast it differs from float32 weights'.
        if need_proj:
            conv_out = chunked_future_conv(x0, conv_weight, C, past, span).to(grad.dtype)
            grad_proj = grad.flatten(0, -2).transpose(0, 1) @ conv_out.flatten(0, -2)
            del conv_out
        if need_x0 or need_conv:
            grad_x0, grad_conv = _conv_backward(grad @ proj_weight.to(grad.dtype), x0, conv_weight, C, past,
                                                span, need_x0)
        return grad_x0, grad_conv, grad_proj, None, None, None


def future_conv_targets(x0: torch.Tensor, conv_weight: torch.Tensor, proj_weight: torch.Tensor,
                        chunk_size: int, past: int = 0, span: int = SPAN) -> torch.Tensor:
    """V = chunked_future_conv(x0) W_target^T, [B, T, d] in W_target's dtype, or autocast's
    where it is on (differentiable).

    The conv output is rounded to that dtype before the projection, as a linear
    layer of the model would see it.
    """
    return _FutureConvTargets.apply(x0, conv_weight, proj_weight, chunk_size, past, span)


def future_conv_partial_rows(window: torch.Tensor, weight: torch.Tensor, past: int = 0) -> torch.Tensor:
    """The conv of the positions a new embedding still changes, from the K embeddings seen so
    far (streaming).

    window: [B, K, D], the embeddings at positions p-K+1 .. p (zero where they are before
    the chunk); weight: [D, K]. Row j (j = 0 .. K-1-P) of the result is the conv at position
    p-j with the taps past p left at zero: its final value if the chunk ends at p or when
    j = K-1-P, else a partial one. The sum runs over taps in the order of `chunked_future_conv`.
    """
    K = weight.shape[1]
    rows = []
    for j in range(K - past):
        row = torch.zeros_like(window[:, 0])
        for k in range(j + past + 1):  # tap k reads p-j+k-P, window slot K-1-j+k-P
            row = row + window[:, K - 1 - j + k - past] * weight[:, k]
        rows.append(row)
    return torch.stack(rows, dim=1)
