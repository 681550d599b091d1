"""Autograd through the dual form, the clip and the target generator."""

import pytest
import torch

from helpers import gradcheck_layer, random_inputs
from moshi_ttt import TTTInactiveWarning

C = 3


@pytest.mark.parametrize("clip_tau", [None, 0.05])
@pytest.mark.parametrize("length", [2 * C + 1, 3 * C])
@pytest.mark.parametrize("algorithm", ["dual", "scan"])
@pytest.mark.parametrize("forget", [1.0, 0.6])
def test_gradcheck_every_parameter(make_layer, clip_tau, length, algorithm, forget, scores_kept_or_recomputed):
    layer = make_layer(dim=4, hidden=6, chunk_size=C, kernel_size=2, clip_tau=clip_tau, algorithm=algorithm,
                       forget=forget, kept_scores=scores_kept_or_recomputed)
    names = gradcheck_layer(layer, length)
    assert names == ["linear_in.weight", "linear_out.weight", "ttt_target.conv", "ttt_target.proj.weight"]


def test_clip_binds_in_gradcheck_setting(make_layer):
    """The clipped gradcheck above exercises the clip's own gradient."""
    layer = make_layer(dim=4, hidden=6, chunk_size=C, clip_tau=0.05)
    x, x0 = random_inputs(2, 3 * C, 4)
    clipped = layer(x, x0)
    layer.clip_tau = None
    assert not torch.allclose(clipped, layer(x, x0))


def target_grads(layer, length):
    layer.zero_grad()
    x, x0 = random_inputs(2, length, layer.dim)
    layer(x, x0).square().sum().backward()
    return [p.grad for p in layer.ttt_target.parameters()]


@pytest.mark.parametrize("init", ["warm", "next_token", "normal"])
def test_target_generator_learns_once_there_are_two_chunks(make_layer, init):
    layer = make_layer(chunk_size=C, init=init).train()
    conv_grad, _ = target_grads(layer, C + 1)
    assert conv_grad.abs().amax() > 0
    with pytest.warns(TTTInactiveWarning, match=f"{C} tokens with chunk_size={C}"):
        grads = target_grads(layer, C)
    assert all(g is None or not g.any() for g in grads)


def test_no_warning_for_eval_or_longer_sequences(make_layer, recwarn):
    layer = make_layer(chunk_size=C)
    x, x0 = random_inputs(1, 2, layer.dim)
    layer(x, x0)
    layer.train()
    x, x0 = random_inputs(1, C + 1, layer.dim)
    layer(x, x0)
    assert not [w for w in recwarn if issubclass(w.category, TTTInactiveWarning)]


@pytest.mark.parametrize("block_chunks", [1, 2, 10])
@pytest.mark.parametrize("clip_tau", [None, 0.5])
def test_gradcheck_fast_weight_ops(block_chunks, clip_tau, scores_kept_or_recomputed):
    from moshi_ttt.ops.inplace import scan_add_, scan_down
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 4 * C + 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    z = torch.randn(2, 4 * C + 2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 4 * C + 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    args = (C, 0.7, clip_tau)
    form = dict(block_size=block_chunks * C, kept_scores=scores_kept_or_recomputed)
    assert torch.autograd.gradcheck(lambda out, z, v: scan_add_(z, v, out.clone(), *args, **form), (out, z, v))
    assert torch.autograd.gradcheck(lambda z, v, w: scan_down(z, v, w, *args, **form), (z, v, w))
    frozen = w.detach()  # no weight gradient: the backward skips its sum
    assert torch.autograd.gradcheck(lambda z, v: scan_down(z, v, frozen, *args, **form), (z, v))
    fused = scan_down(z, v, w, *args, **form)
    torch.testing.assert_close(fused, scan_add_(z, v, z @ w.T, *args, **form))
    if clip_tau is not None:  # the clip binds: the term differs from the unclipped one
        assert not torch.allclose(fused, scan_down(z, v, w, C, 0.7, **form))


@pytest.mark.parametrize("algorithm", ["dual", "scan"])
def test_autocast_with_float32_weights(make_layer, algorithm):
    """Under bf16 autocast the ops see bf16 activations and float32 weights; the gradients
    come back in float32, within bf16 distance of the float32 run's."""
    layer = make_layer(dim=16, hidden=24, chunk_size=C, clip_tau=0.5, algorithm=algorithm, dtype=torch.float32)
    x, x0 = random_inputs(2, 5 * C + 1, 16, dtype=torch.float32)
    x0.requires_grad_(True)
    grads = []
    for enabled in (False, True):
        layer.zero_grad()
        x0.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = layer(x, x0)
        assert out.dtype == (torch.bfloat16 if enabled else torch.float32)
        out.float().square().sum().backward()
        grads.append([p.grad for p in layer.parameters()] + [x0.grad])
    for full, mixed in zip(*grads):
        assert mixed.dtype == torch.float32
        assert (mixed - full).abs().max() <= 0.05 * full.abs().max()
