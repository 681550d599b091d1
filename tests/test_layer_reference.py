"""The parallel and streaming layer against the slow float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from moshi.modules.gating import ActivationGating

from helpers import random_inputs, stream
from moshi_ttt import InPlaceTTTGating
from reference import reference_for_layer

C = 4


@pytest.mark.parametrize("length", [3 * C, 3 * C + 2, C - 1], ids=["multiple", "ragged", "shorter"])
@pytest.mark.parametrize("kernel_size,kernel_past", [(1, 0), (2, 0), (3, 0), (5, 2)])
@pytest.mark.parametrize("clip_tau", [None, 0.05])
@pytest.mark.parametrize("algorithm", ["dual", "scan"])
def test_parallel_matches_reference(make_layer, length, kernel_size, kernel_past, clip_tau, algorithm):
    layer = make_layer(chunk_size=C, kernel_size=kernel_size, kernel_past=kernel_past, clip_tau=clip_tau,
                       algorithm=algorithm)
    x, x0 = random_inputs(3, length, layer.dim)
    out = layer(x, x0)
    ref = reference_for_layer(layer, x, x0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_reference_sees_the_updates(make_layer):
    """Guards the comparisons above: TTT changes the output, and the clip binds."""
    layer = make_layer(chunk_size=C)
    x, x0 = random_inputs(3, 3 * C, layer.dim)
    plain = reference_for_layer(make_layer(chunk_size=C, eta=0.0), x, x0)
    free = reference_for_layer(layer, x, x0)
    layer.clip_tau = 0.05
    clipped = reference_for_layer(layer, x, x0)
    assert (free - plain)[:, C:].abs().amax() > 1e-2
    assert (free - clipped)[:, C:].abs().amax() > 1e-2
    torch.testing.assert_close(free[:, :C], plain[:, :C], rtol=0, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["dual", "scan"])
def test_float32_layer_matches_reference(make_layer, algorithm):
    layer = make_layer(chunk_size=C, clip_tau=0.05, algorithm=algorithm, dtype=torch.float32)
    x, x0 = random_inputs(3, 3 * C + 1, layer.dim, dtype=torch.float32)
    torch.testing.assert_close(layer(x, x0).double(), reference_for_layer(layer, x, x0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step_sizes", [[1], [3], [C + 1], [2, 5, 1, 7], [3 * C]], ids=str)
@pytest.mark.parametrize("clip_tau", [None, 0.05])
@pytest.mark.parametrize("algorithm", ["dual", "scan"])
@pytest.mark.parametrize("kernel_size,kernel_past", [(3, 0), (5, 2), (3, 2)])
@pytest.mark.parametrize("forget", [1.0, 0.6])
def test_streaming_matches_parallel(make_layer, step_sizes, clip_tau, algorithm, kernel_size, kernel_past, forget):
    layer = make_layer(chunk_size=C, kernel_size=kernel_size, kernel_past=kernel_past, clip_tau=clip_tau,
                       algorithm=algorithm, forget=forget)
    x, x0 = random_inputs(3, 5 * C + 3, layer.dim)
    torch.testing.assert_close(stream(layer, x, x0, step_sizes), layer(x, x0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim,chunk_size", [(8, 16), (20, 3), (6, 1)], ids=["d<C", "d>C", "C=1"])
def test_streaming_fold_covers_every_row(make_layer, dim, chunk_size):
    """The previous chunk is folded into delta row by row: any d against C."""
    layer = make_layer(dim=dim, chunk_size=chunk_size, clip_tau=0.5)
    x, x0 = random_inputs(2, 4 * chunk_size + 1, dim)
    expected = reference_for_layer(layer, x, x0)
    torch.testing.assert_close(stream(layer, x, x0, [1]), expected, rtol=1e-10, atol=1e-10)


def plain_steps(gating, x):
    """moshi's gating one token at a time (matmul shapes as in a streaming step)."""
    return torch.cat([gating(x[:, t:t + 1]) for t in range(x.shape[1])], dim=1)


def test_warm_start_equals_moshi_gating():
    torch.manual_seed(0)
    gating = ActivationGating(16, 64, F.silu)
    x, x0 = random_inputs(2, 21, 16, dtype=torch.float32)
    expected = gating(x)
    layer = InPlaceTTTGating.from_gating(gating, chunk_size=4, eta=3.0, init="warm")
    assert layer.linear_in.weight is gating.linear_in.weight
    assert layer.linear_out.weight is gating.linear_out.weight
    assert torch.equal(layer(x, x0), expected)
    assert torch.equal(stream(layer, x, x0, [1]), plain_steps(gating, x))


def test_eta_zero_or_disabled_is_plain_mlp(make_layer):
    torch.manual_seed(0)
    gating = ActivationGating(8, 24, F.silu).double()
    x, x0 = random_inputs(2, 13, 8)
    expected = gating(x)
    zero = InPlaceTTTGating.from_gating(gating, chunk_size=4, eta=0.0, init="normal", init_std=0.5)
    assert torch.equal(zero(x, x0), expected)
    off = InPlaceTTTGating.from_gating(gating, chunk_size=4, eta=2.0, init="normal", init_std=0.5)
    assert not torch.equal(off(x, x0), expected)
    off.ttt_enabled = False
    assert torch.equal(off(x, x0), expected)
    assert torch.equal(stream(off, x, x0, [1]), plain_steps(gating, x))


def test_next_token_init_targets_next_embedding(make_layer):
    layer = make_layer(dim=6, chunk_size=4, kernel_size=2, init="next_token")
    x0 = torch.randn(1, 8, 6, dtype=torch.float64)
    v = layer.ttt_target(x0, 4)
    torch.testing.assert_close(v[:, [0, 1, 2, 4, 5, 6]], x0[:, [1, 2, 3, 5, 6, 7]])
    assert torch.equal(v[:, [3, 7]], torch.zeros(1, 2, 6, dtype=torch.float64))  # chunk ends


def test_auto_picks_dual_for_short_and_scan_for_long():
    from moshi_ttt.ops import block_size_for
    assert block_size_for("auto", 3072, 4096, 11264, 512) == 3072
    assert block_size_for("auto", 9000, 4096, 11264, 512) == 9216  # the dual limit: ~9011
    assert block_size_for("auto", 9100, 4096, 11264, 512) == 2048
    assert block_size_for("auto", 12288, 4096, 11264, 512) == 2048
    assert block_size_for("dual", 1000, 4096, 11264, 512) == 1024
    assert block_size_for("scan", 1000, 4096, 11264, 512) == 2048
    assert block_size_for("scan", 1000, 4096, 11264, 3000) == 3000
    # A small model: blocks of a quarter of its dual limit (~563), in whole chunks.
    assert block_size_for("scan", 4096, 256, 704, 64) == 128
    assert block_size_for("scan", 4096, 4096, 11264, 512, scan_block=1500) == 1024
    assert block_size_for("scan", 4096, 4096, 11264, 512, scan_block=100) == 512


@pytest.mark.parametrize("block_chunks", [1, 2, 3, 100])
def test_fast_weight_term_is_exact_for_any_block(make_layer, block_chunks):
    """One chunk per block (pure scan) to one block for everything (pure dual)."""
    from moshi_ttt.ops.inplace import scan_add_
    torch.manual_seed(0)
    z = torch.randn(2, 7 * C + 1, 6, dtype=torch.float64)
    v = torch.randn(2, 7 * C + 1, 5, dtype=torch.float64)
    out = torch.randn_like(v)
    expected = out.clone()
    for start in range(C, z.shape[1], C):
        state = v[:, :start].transpose(1, 2) @ z[:, :start]
        expected[:, start:start + C] += 0.5 * z[:, start:start + C] @ state.transpose(1, 2)
    result = scan_add_(z, v, out, C, 0.5, block_size=block_chunks * C)
    assert result is out
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="block_size=6 must be a multiple of chunk_size=4"):
        scan_add_(z, v, out, C, 0.5, block_size=6)


@pytest.mark.parametrize("op", ["down", "add"])
@pytest.mark.parametrize("length", [5 * C, 5 * C + 2], ids=["multiple", "ragged"])
@pytest.mark.parametrize("clip_tau", [None, 0.05])
@pytest.mark.parametrize("forget", [1.0, 0.6])
def test_the_final_delta_carries_a_sequence_across_calls(op, length, clip_tau, forget):
    """Two calls, the first's final delta the second's initial delta, give the reference's outputs
    over the whole sequence and its final delta after each part."""
    from moshi_ttt.ops import inplace_ttt_add_, inplace_ttt_down
    from moshi_ttt.ops.inplace.naive import naive_inplace_ttt
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, length, 6, dtype=torch.float64, generator=g)
    v = torch.randn(2, length, 5, dtype=torch.float64, generator=g)
    weight = torch.randn(5, 6, dtype=torch.float64, generator=g)
    args = (C, 0.5, clip_tau, forget)

    def call(zz, vv, initial_delta):
        state = dict(algorithm="scan", scan_block=2 * C, initial_delta=initial_delta, output_final_delta=True)
        if op == "down":
            return inplace_ttt_down(zz, vv, weight, *args, **state)
        return inplace_ttt_add_(zz, vv, zz @ weight.T, *args, **state)

    cut = 2 * C
    first, delta = call(z[:, :cut], v[:, :cut], None)
    second, final = call(z[:, cut:], v[:, cut:], delta)
    expected, expected_final = naive_inplace_ttt(z, v, weight, *args)
    _, expected_delta = naive_inplace_ttt(z[:, :cut], v[:, :cut], weight, *args)
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(delta, expected_delta, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10)
    resumed, _ = naive_inplace_ttt(z[:, cut:], v[:, cut:], weight, *args, initial_delta=expected_delta)
    torch.testing.assert_close(resumed, expected[:, cut:], rtol=1e-12, atol=1e-12)
    if clip_tau is not None:  # the clip binds
        assert not torch.allclose(expected, naive_inplace_ttt(z, v, weight, C, 0.5, None, forget)[0])
