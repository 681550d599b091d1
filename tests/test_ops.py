"""The targets (conv, then projection) against a loop over positions, and their gradients."""

import pytest
import torch

from moshi_ttt.ops.inplace import chunked_future_conv, future_conv_targets

SMALL_SPAN = 8  # positions per float32 span of the conv: several spans at test sizes


def loop_conv(x0, weight, chunk_size, past=0):
    """out[t] = sum_k weight[:, k] * x0[t + k - past], for t + k - past inside t's chunk."""
    B, T, D = x0.shape
    out = torch.zeros(B, T, D, dtype=torch.float64)
    for t in range(T):
        chunk_start = t // chunk_size * chunk_size
        chunk_end = min(chunk_start + chunk_size, T)
        for k in range(weight.shape[1]):
            if chunk_start <= t + k - past < chunk_end:
                out[:, t] += weight[:, k].double() * x0[:, t + k - past].double()
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11])
@pytest.mark.parametrize("kernel_size,past", [(1, 0), (2, 0), (3, 0), (5, 0), (2, 1), (5, 2), (3, 2)])
@pytest.mark.parametrize("length", [1, 7, 24, 29])
def test_conv_equals_loop(chunk_size, kernel_size, past, length):
    g = torch.Generator().manual_seed(length)
    x0 = torch.randn(2, length, 5, dtype=torch.float64, generator=g)
    weight = torch.randn(5, kernel_size, dtype=torch.float64, generator=g)
    torch.testing.assert_close(chunked_future_conv(x0, weight, chunk_size, past, SMALL_SPAN),
                               loop_conv(x0, weight, chunk_size, past))


@pytest.mark.parametrize("chunk_size, kernel_size, past, length",
                         [(3, 2, 0, 20), (4, 3, 0, 19), (2, 4, 0, 9), (4, 5, 2, 19), (3, 2, 1, 10)])
def test_targets_gradcheck(chunk_size, kernel_size, past, length):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, length, 3, dtype=torch.float64, generator=g, requires_grad=True)
    conv = torch.randn(3, kernel_size, dtype=torch.float64, generator=g, requires_grad=True)
    proj = torch.randn(3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    expected = loop_conv(x0, conv, chunk_size, past) @ proj.T
    torch.testing.assert_close(future_conv_targets(x0, conv, proj, chunk_size, past, SMALL_SPAN), expected)
    assert torch.autograd.gradcheck(lambda *a: future_conv_targets(*a, chunk_size, past, SMALL_SPAN), (x0, conv, proj))
    # The embeddings need no gradient when frozen.
    conv.grad = None
    future_conv_targets(x0.detach(), conv, proj, chunk_size, past, SMALL_SPAN).sum().backward()
    assert conv.grad is not None


def test_conv_sums_in_float32_and_rounds_once():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 30, 64, generator=g).bfloat16()
    weight = torch.randn(64, 3, generator=g).bfloat16()
    out = chunked_future_conv(x0, weight, 4, span=SMALL_SPAN)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, loop_conv(x0, weight, 4).float().bfloat16())  # not bf16 sums: those round twice
    x0.requires_grad_()
    proj = torch.eye(64, dtype=torch.bfloat16, requires_grad=True)
    future_conv_targets(x0, weight.requires_grad_(), proj, 4, span=SMALL_SPAN).sum().backward()
    assert x0.grad.dtype == weight.grad.dtype == proj.grad.dtype == torch.bfloat16
