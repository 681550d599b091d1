"""The forgetting factor: each chunk, the fast weights' change decays toward W0 by lambda.

Against the float64 reference loop (which applies `W <- W0 + lambda (W - W0) + delta`
chunk by chunk), streaming against parallel, causality, gradients at capped blocks,
packed documents, and, at lambda = 1, the plain path against the forgetting path at its limit. Streaming against parallel for every step size, per-sample reset and
gradcheck run with a forgetting factor in the layer tests (parametrized `forget`).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from helpers import assert_causal, random_inputs, stream
from moshi_ttt import InPlaceTTTGating
from reference import reference_for_layer

C = 4
FORGET = 0.6


@pytest.mark.parametrize("length", [3 * C, 5 * C + 2], ids=["multiple", "ragged"])
@pytest.mark.parametrize("kernel_size,kernel_past", [(2, 0), (5, 2)])
@pytest.mark.parametrize("clip_tau", [None, 0.05])
@pytest.mark.parametrize("algorithm,scan_block", [("dual", 8), ("scan", 4), ("scan", 8), ("scan", 12)])
def test_parallel_matches_reference(make_layer, length, kernel_size, kernel_past, clip_tau, algorithm, scan_block):
    layer = make_layer(chunk_size=C, kernel_size=kernel_size, kernel_past=kernel_past, clip_tau=clip_tau,
                       algorithm=algorithm, scan_block=scan_block, forget=FORGET)
    x, x0 = random_inputs(3, length, layer.dim)
    torch.testing.assert_close(layer(x, x0), reference_for_layer(layer, x, x0), rtol=1e-10, atol=1e-10)


def test_reference_forgets():
    """Guards the comparisons: the reference's forgetting changes its output from chunk 2 on."""
    torch.manual_seed(0)
    keep = InPlaceTTTGating(8, 12, F.silu, chunk_size=C, eta=0.5, init="normal", init_std=0.3, dtype=torch.float64)
    x, x0 = random_inputs(2, 4 * C, 8)
    kept = reference_for_layer(keep, x, x0)
    keep.forget = FORGET
    forgot = reference_for_layer(keep, x, x0)
    torch.testing.assert_close(forgot[:, :2 * C], kept[:, :2 * C], rtol=0, atol=1e-12)
    assert (forgot - kept)[:, 2 * C:].abs().amax() > 1e-3


@pytest.mark.parametrize("dim,chunk_size", [(8, 16), (20, 3), (6, 1)], ids=["d<C", "d>C", "C=1"])
def test_streaming_fold_covers_every_row(make_layer, dim, chunk_size):
    layer = make_layer(dim=dim, chunk_size=chunk_size, clip_tau=0.5, forget=FORGET)
    x, x0 = random_inputs(2, 4 * chunk_size + 1, dim)
    torch.testing.assert_close(stream(layer, x, x0, [1]), reference_for_layer(layer, x, x0),
                               rtol=1e-10, atol=1e-10)


def test_fast_weight_change_read_mid_chunk(make_layer):
    """The state's W - W0, read between steps, is the reference's weight after the chunks seen."""
    layer = make_layer(chunk_size=C, forget=FORGET)
    x, x0 = random_inputs(1, 3 * C + 2, layer.dim)
    with layer.streaming(1):
        layer(x[:, :2 * C + 2], x0[:, :2 * C + 2])  # two chunks done, the second folding
        mid = layer._streaming_state.fast_weight_change().clone()
    with layer.streaming(1):
        layer(x[:, :2 * C], x0[:, :2 * C])
        layer._streaming_state.settle()
        settled = layer._streaming_state.delta.clone()
    torch.testing.assert_close(mid, settled, rtol=1e-12, atol=1e-12)
    # The second chunk's weight is lambda U_0 + U_1: different from U_0 + U_1.
    layer.forget = 1.0
    with layer.streaming(1):
        layer(x[:, :2 * C], x0[:, :2 * C])
        layer._streaming_state.settle()
        kept = layer._streaming_state.delta.clone()
    assert (kept - settled).abs().amax() > 1e-6


@pytest.mark.parametrize("p", [1, C, 2 * C + 2])
def test_parallel_is_causal(make_layer, p):
    layer = make_layer(chunk_size=C, kernel_size=3, clip_tau=0.05, forget=FORGET)
    assert_causal(layer, 5 * C, p)


def test_exec_mask_freezes_a_sample(make_layer):
    layer = make_layer(chunk_size=C, forget=FORGET)
    x, x0 = random_inputs(2, 5 * C, layer.dim)
    junk, junk0 = random_inputs(2, 2 * C + 1, layer.dim, seed=3)
    expected = stream(layer, x, x0, [1])
    with layer.streaming(2):
        head = layer(x[:, :C + 1], x0[:, :C + 1])
        layer.set_exec_mask(torch.tensor([False, True]))
        layer(junk, junk0)
        layer.set_exec_mask(torch.tensor([True, True]))
        tail = torch.cat([layer(x[:, t:t + 1], x0[:, t:t + 1]) for t in range(C + 1, x.shape[1])], dim=1)
    torch.testing.assert_close(torch.cat([head[:1], tail[:1]], dim=1), expected[:1], rtol=1e-12, atol=1e-12)


def test_gradcheck_with_blocks_capped_by_a_strong_forgetting_factor(make_layer):
    """forget 1e-6 caps dual blocks at 3 chunks (write() <= 2^64): the capped scan's backward too."""
    from moshi_ttt.ops.inplace.scan import max_block
    assert max_block(1e-6, 3) == 9
    layer = make_layer(dim=4, hidden=6, chunk_size=3, algorithm="dual", forget=1e-6, eta=2.0)
    x, x0 = random_inputs(2, 14, 4)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    x.requires_grad_(True)

    def f(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x, x0))

    assert torch.autograd.gradcheck(f, (x, *params))
    torch.testing.assert_close(layer(x, x0), reference_for_layer(layer, x, x0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("algorithm", ["dual", "scan"])
def test_packed_documents_forget_on_their_own(make_layer, algorithm):
    """Each packed document of a row forgets from its own start, as if it ran alone."""
    layer = make_layer(chunk_size=C, algorithm=algorithm, forget=FORGET)
    lengths = [2 * C + 1, 3 * C + 2]
    x, x0 = random_inputs(1, sum(lengths), layer.dim)
    segments = torch.repeat_interleave(torch.tensor([0, 1]), torch.tensor(lengths))[None]
    packed = layer(x, x0, segments)
    start = 0
    for n in lengths:
        expected = reference_for_layer(layer, x[:, start:start + n], x0[:, start:start + n])
        torch.testing.assert_close(packed[:, start:start + n], expected, rtol=1e-10, atol=1e-10)
        start += n


def test_gradients_through_the_lora_path(make_layer):
    """inplace_ttt_add_ (the path of a LoRA-wrapped slow weight) gives the same gradients."""
    from moshi_ttt.ops import inplace_ttt_add_, inplace_ttt_down
    z, v = random_inputs(2, 5 * C + 1, 6)
    weight = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in ("down", "add"):
        zz, vv = z.clone().requires_grad_(True), v.clone().requires_grad_(True)
        if fn == "down":
            out = inplace_ttt_down(zz, vv, weight, C, 0.5, algorithm="scan", scan_block=8, forget=FORGET)
        else:
            out = inplace_ttt_add_(zz, vv, zz @ weight.T, C, 0.5, algorithm="scan", scan_block=8, forget=FORGET)
        grads.append(torch.autograd.grad(out.square().sum(), (zz, vv, weight)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_long_blocks_stay_finite(make_layer):
    """A strong forgetting factor over many chunks in one dual block: write() would overflow
    float32 without the block cap (0.01^-40 = 1e80)."""
    layer = make_layer(dim=8, hidden=12, chunk_size=2, algorithm="dual", forget=0.01, dtype=torch.float32)
    x, x0 = random_inputs(1, 80, 8, dtype=torch.float32)
    out = layer(x, x0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference_for_layer(layer, x, x0), rtol=1e-4, atol=1e-4)


def test_update_norm_is_bounded_by_the_clip_and_forgetting(make_layer):
    """With clip tau and factor lambda, ||W - W0||_F <= tau / (1 - lambda), however long the stream;
    without forgetting it grows past that bound."""
    tau = 0.05
    bound = tau / (1 - FORGET)
    norms = {}
    for forget in (FORGET, 1.0):
        layer = make_layer(chunk_size=C, clip_tau=tau, forget=forget, init_std=1.0)
        x, x0 = random_inputs(1, 60 * C, layer.dim)
        with torch.no_grad(), layer.streaming(1):
            layer(x, x0)
            norms[forget] = float(layer.fast_weight_change_norms())
    assert norms[FORGET] <= bound * (1 + 1e-9)
    assert norms[1.0] > 2 * bound


def test_bad_forget_is_refused():
    from moshi_ttt import TTTConfig
    for bad in (0.0, 1.5, -0.1, float("nan"), True, 1e-7):
        with pytest.raises(ValueError, match=r"forget=.*expected a number in \(0, 1\]"):
            InPlaceTTTGating(8, 12, F.silu, forget=bad)
        with pytest.raises(ValueError, match=r"ttt.forget=.*expected a number in \(0, 1\]"):
            TTTConfig(forget=bad)


NEARLY_ONE = 1 - 1e-9  # takes the forgetting code path, and differs from 1 by far less than the tolerance


def outputs_and_grads(forget: float, algorithm: str, block: int, clip: float | None) -> dict[str, torch.Tensor]:
    """Outputs, input and parameter gradients, and streams in steps of 1 and of 5 and 9, of a small float64 layer."""
    torch.manual_seed(0)
    layer = InPlaceTTTGating(8, 12, F.silu, chunk_size=4, eta=0.5, kernel_size=3, clip_tau=clip, init="normal",
                             init_std=0.3, algorithm=algorithm, scan_block=block, conv_span=8, forget=forget,
                             dtype=torch.float64).train()
    x, x0 = random_inputs(2, 19, 8)
    x.requires_grad_(True)
    y = layer(x, x0)
    y.square().sum().backward()
    got = {"out": y.detach(), "dx": x.grad}
    got.update({name: p.grad for name, p in layer.named_parameters()})
    layer.eval()
    with torch.no_grad():
        got["stream1"] = stream(layer, x.detach(), x0, [1])
        got["stream5"] = stream(layer, x.detach(), x0, [5, 9])
    return got


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("algorithm,block", [("dual", 8), ("scan", 8), ("scan", 4)])
def test_without_forgetting_the_plain_path_equals_the_forgetting_path_at_its_limit(algorithm, block, clip):
    """forget = 1 skips the forgetting code; forget = 1 - 1e-9 runs it. Both paths, in this process,
    agree on every output, gradient and stream to within what 1e-9 of forgetting can move them
   ."""
    plain = outputs_and_grads(1.0, algorithm, block, clip)
    forgetting = outputs_and_grads(NEARLY_ONE, algorithm, block, clip)
    assert sorted(plain) == sorted(forgetting)
    for key in plain:
        torch.testing.assert_close(plain[key], forgetting[key], rtol=1e-7, atol=1e-7, msg=key)
    assert any(not torch.equal(plain[k], forgetting[k]) for k in plain)  # two code paths, not one


def test_the_lora_path_without_forgetting_is_the_plain_one():
    """inplace_ttt_add_ onto a slow output (the LoRA path) with forget 1 equals the down-projection."""
    from moshi_ttt.ops import inplace_ttt_add_, inplace_ttt_down
    z, v = random_inputs(2, 19, 8)
    weight = torch.randn(8, 8, dtype=torch.float64)
    down = inplace_ttt_down(z, v, weight, 4, 0.5, algorithm="scan", scan_block=8)
    added = inplace_ttt_add_(z, v, z @ weight.T, 4, 0.5, algorithm="scan", scan_block=8, forget=1.0)
    torch.testing.assert_close(added, down, rtol=1e-14, atol=1e-14)
