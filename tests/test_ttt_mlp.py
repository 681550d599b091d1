"""TTT-MLP: the op against a float64 reference, the block's streaming against its
parallel form, causality, per-sample resets and gradients."""

import pytest
import torch
from torch import nn

from moshi_ttt.modules.ttt_mlp import TTTMLPBlock
from moshi_ttt.ops.ttt_mlp import InnerWeights, TTTMLPState, inner_loss, ttt_mlp, ttt_mlp_step
from moshi_ttt.ops.ttt_mlp.inner import gelu, gelu_derivative, layer_norm_l2_grad, head_layer_norm
from ttt_mlp_reference import reference_ttt_mlp


def random_op_inputs(B=3, H=2, T=11, f=4, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    q, k, v = r(B, H, T, f), r(B, H, T, f), r(B, H, T, f)
    lr = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    scale = 1 / torch.arange(1, b + 1, dtype=torch.float64) + r(b, scale=0.1)
    ln_w, ln_b = 1 + r(H, f, scale=0.1), r(H, f, scale=0.1)
    initial = InnerWeights(r(H, f, 4 * f, scale=0.3), r(H, 4 * f, scale=0.1), r(H, 4 * f, f, scale=0.3),
                           r(H, f, scale=0.1))
    return q, k, v, lr, scale, ln_w, ln_b, initial


def zero_state(initial, B):
    def zeros():
        return InnerWeights(*(torch.zeros(B, *t.shape, dtype=t.dtype) for t in initial))
    return TTTMLPState(zeros(), zeros())


def test_closed_form_gradients_match_autograd():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    w, b = 1 + 0.1 * torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g,
                                                                                     dtype=torch.float64)
    loss = 0.5 * (head_layer_norm(z, w, b) - target).pow(2).sum()
    expected, = torch.autograd.grad(loss, z)
    torch.testing.assert_close(layer_norm_l2_grad(z.detach(), target, w, b), expected, rtol=1e-10, atol=1e-12)
    x = torch.linspace(-5, 5, 101, dtype=torch.float64, requires_grad=True)
    expected, = torch.autograd.grad(gelu(x).sum(), x)
    torch.testing.assert_close(gelu_derivative(x.detach()), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [12, 11, 3, 1])  # a multiple of b, not a multiple, shorter than b
@pytest.mark.parametrize("group", [0, 1, 2])
def test_op_matches_reference(T, group):
    q, k, v, lr, scale, ln_w, ln_b, initial = random_op_inputs(T=T)
    expected = reference_ttt_mlp(q, k, v, lr, scale, ln_w, ln_b, *initial)
    with torch.enable_grad():
        out, _ = ttt_mlp(q, k, v, lr, scale, ln_w, ln_b, initial, checkpoint_group=group)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_steps_match_op_and_its_final_state():
    q, k, v, lr, scale, ln_w, ln_b, initial = random_op_inputs(T=11)
    out, final = ttt_mlp(q, k, v, lr, scale, ln_w, ln_b, initial)
    B, b = q.shape[0], scale.shape[0]
    state = zero_state(initial, B)
    outs = []
    for t in range(q.shape[2]):
        pos = torch.full((B,), t % b)
        o, state = ttt_mlp_step(q[:, :, t], k[:, :, t], v[:, :, t], lr[:, :, t], scale[pos], pos == b - 1,
                                ln_w, ln_b, initial, state)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 2), out, rtol=1e-10, atol=1e-10)
    for got, want in zip([*state.delta, *state.sums], [*final.delta, *final.sums]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The op continues from a state at a mini-batch boundary as from the start.
    whole, _ = ttt_mlp(q, k, v, lr, scale, ln_w, ln_b, initial)
    head, middle = ttt_mlp(*(t[:, :, :8] for t in (q, k, v, lr)), scale, ln_w, ln_b, initial)
    tail, _ = ttt_mlp(*(t[:, :, 8:] for t in (q, k, v, lr)), scale, ln_w, ln_b, initial, initial_delta=middle.delta)
    torch.testing.assert_close(torch.cat([head, tail], 2), whole, rtol=1e-10, atol=1e-10)


def test_losses_fall_after_each_update():
    q, k, v, lr, scale, ln_w, ln_b, initial = random_op_inputs(T=16)
    losses = []
    ttt_mlp(q, k, v, 3 * lr, scale, ln_w, ln_b, initial, losses=losses)
    losses = torch.stack(losses, 2)  # [B, H, n, 3]
    assert losses.shape == (3, 2, 4, 5)
    torch.testing.assert_close(losses[:, :, 0, 0], losses[:, :, 0, 1])  # the first starts at the initial weights
    assert (losses[..., 2] < losses[..., 1]).float().mean() > 0.9  # a gradient step lowers its own loss
    w = InnerWeights(*(t.expand(3, *t.shape) for t in initial))
    torch.testing.assert_close(losses[:, :, 0, 0], inner_loss(w, k[:, :, :4], v[:, :, :4], ln_w, ln_b).mean(-1))
    torch.testing.assert_close(losses[:, :, 0, 3], losses[:, :, 0, 4])  # the first update is the whole change
    _, final = ttt_mlp(q, k, v, 3 * lr, scale, ln_w, ln_b, initial)
    change = sum(t.flatten(2).square().sum(-1) for t in final.delta).sqrt()
    torch.testing.assert_close(losses[:, :, -1, 4], change)


def make_block(dim=8, heads=2, mini_batch=4, conv_kernel=0, gate_init=0.5, base_lr=1.0, seed=0):
    torch.manual_seed(seed)
    block = TTTMLPBlock(dim, heads, nn.LayerNorm(dim, dtype=torch.float64), mini_batch=mini_batch,
                        base_lr=base_lr, conv_kernel=conv_kernel, gate_init=gate_init, dtype=torch.float64)
    with torch.no_grad():  # away from the initial values, so that every parameter matters
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block.eval()


def stream(block, x, sizes):
    outs = []
    with block.streaming(x.shape[0]):
        t, i = 0, 0
        while t < x.shape[1]:
            outs.append(block(x[:, t:t + sizes[i % len(sizes)]]))
            t += sizes[i % len(sizes)]
            i += 1
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("conv_kernel", [0, 4])
@pytest.mark.parametrize("sizes", [[1], [3], [5], [1, 4, 2], [8]])  # 1, 3, b+1, mixed, 2b
def test_block_streaming_equals_parallel(conv_kernel, sizes):
    block = make_block(conv_kernel=conv_kernel)
    x = torch.randn(3, 19, 8, dtype=torch.float64)
    torch.testing.assert_close(stream(block, x, sizes), block(x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("conv_kernel", [0, 4])
def test_block_is_causal(conv_kernel):
    block = make_block(conv_kernel=conv_kernel)
    x = torch.randn(2, 17, 8, dtype=torch.float64)
    for p in (1, 4, 9, 16):
        changed = x.clone()
        changed[:, p:] = torch.randn_like(changed[:, p:])
        torch.testing.assert_close(block(changed)[:, :p], block(x)[:, :p], rtol=0, atol=0)
        assert not torch.allclose(block(changed)[:, p:], block(x)[:, p:])


def test_block_per_sample_reset_and_exec_mask():
    block = make_block(conv_kernel=4)
    x = torch.randn(3, 14, 8, dtype=torch.float64)
    with block.streaming(3):
        block(x[:, :7])
        block.reset_streaming(torch.tensor([False, True, False]))
        after_reset = block(x[:, 7:])
    alone = block(x[1:2, 7:])  # a fresh start, for sample 1 only
    torch.testing.assert_close(after_reset[1:2], alone, rtol=1e-9, atol=1e-10)
    whole = block(x)
    torch.testing.assert_close(after_reset[[0, 2]], whole[[0, 2], 7:], rtol=1e-9, atol=1e-10)
    # A sample that does not run keeps its state: as if the skipped steps never happened.
    with block.streaming(2):
        outs = []
        for t in range(10):
            block._streaming_state.set_exec_mask(torch.tensor([True, t % 3 != 1]))
            outs.append(block(x[:2, t:t + 1]))
    kept = [t for t in range(10) if t % 3 != 1]
    torch.testing.assert_close(torch.cat(outs, 1)[1:2, kept], block(x[1:2, kept]), rtol=1e-9, atol=1e-10)


def test_packed_documents_start_fresh():
    block = make_block(conv_kernel=4)
    x = torch.randn(2, 15, 8, dtype=torch.float64)
    segments = torch.tensor([[0] * 6 + [1] * 9, [0] * 15])
    out = block(x, segments)
    torch.testing.assert_close(out[0:1, 6:], block(x[0:1, 6:]), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out[1:2], block(x[1:2]), rtol=1e-9, atol=1e-10)


def test_gate_at_zero_is_the_identity_and_ttt_off_keeps_the_initial_weights():
    block = make_block(gate_init=0.0)
    with torch.no_grad():
        block.gate.zero_()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    assert torch.equal(block(x), x)
    block = make_block()
    block.ttt_enabled = False
    with block.streaming(2):
        block(x)
        assert block.fast_weight_change_norms().abs().max() == 0
    block.ttt_enabled = True
    with block.streaming(2):
        block(x)
        assert block.fast_weight_change_norms().min() > 0


def test_gradcheck_every_parameter():
    block = make_block(dim=4, heads=2, mini_batch=2, conv_kernel=2)
    block.train()
    block.scan_group = 1
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    params = [p for p in block.parameters()]
    names = [n for n, _ in block.named_parameters()]

    def run(x, *values):
        return torch.func.functional_call(block, dict(zip(names, values)), (x,))
    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-5)


def test_autocast_does_not_lower_the_inner_loop():
    q, k, v, lr, scale, ln_w, ln_b, initial = (t.float() if isinstance(t, torch.Tensor) else
                                                InnerWeights(*(w.float() for w in t)) for t in random_op_inputs(T=11))
    plain, _ = ttt_mlp(q, k, v, lr, scale, ln_w, ln_b, initial)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, _ = ttt_mlp(q, k, v, lr, scale, ln_w, ln_b, initial)
        state = zero_state(InnerWeights(*(w.float() for w in initial)), 3)
        pos = torch.zeros(3, dtype=torch.long)
        step, _ = ttt_mlp_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], lr[:, :, 0], scale[pos], pos == 3,
                               ln_w, ln_b, initial, state)
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)
    torch.testing.assert_close(step, plain[:, :, 0], rtol=1e-6, atol=1e-6)


def test_checkpointed_scan_gives_the_same_gradients():
    inputs = random_op_inputs(T=11)
    grads = []
    for group in (0, 1, 2):
        leaves = [t.clone().requires_grad_(True) for t in inputs[:7]]
        initial = InnerWeights(*(w.clone().requires_grad_(True) for w in inputs[7]))
        out, final = ttt_mlp(*leaves, initial, checkpoint_group=group)
        (out.square().sum() + sum(t.square().sum() for t in [*final.delta, *final.sums])).backward()
        grads.append([t.grad for t in [*leaves, *initial]])
    for other in grads[1:]:
        for got, want in zip(other, grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_exec_mask_with_whole_mini_batches_in_one_step():
    block = make_block(conv_kernel=4)
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    with block.streaming(2):
        first = block(x[:, :3])
        block._streaming_state.set_exec_mask(torch.tensor([True, False]))
        block(torch.randn(2, 5, 8, dtype=torch.float64))  # sample 1 skips these frames
        block._streaming_state.set_exec_mask(torch.tensor([True, True]))
        sample_1 = block(x[1:2, 3:].expand(2, -1, -1))[1:2]
    torch.testing.assert_close(torch.cat([first[1:2], sample_1], 1), block(x[1:2]), rtol=1e-9, atol=1e-10)


def test_a_block_made_on_meta_initialises_every_parameter():
    block = TTTMLPBlock(8, 2, nn.LayerNorm(8), conv_kernel=4, gate_init=0.3, device="meta")
    block.to_empty(device="cpu")
    block.norm.reset_parameters()
    block.reset_parameters()
    assert all(torch.isfinite(p).all() for p in block.parameters())
    assert torch.equal(block.gate, torch.full((8,), 0.3)) and torch.equal(block.ln_weight, torch.ones(2, 4))
    assert not block.b1.any() and not block.lr_bias.any() and block.w1.std() > 0.01
