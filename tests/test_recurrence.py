"""The delta rule (objective "l2") and the data-dependent gate: the chunk recurrence of
`ops.inplace.recurrence`, in the layer, against the float64 reference loop (extended with
both), streaming against parallel, causality, per-sample state, gradients, what the delta
rule is for (a key written again reads its new value), and its products counted."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import set_checkpoint_early_stop

from helpers import assert_causal, assert_reset_one_sample, gradcheck_layer, random_inputs, stream
from moshi_ttt import InPlaceTTTGating
from moshi_ttt.ops import inplace_ttt_down
from moshi_ttt.ops.inplace.recurrence import chunk_recurrence, l2_step_scales, recurrence_trace
from reference import reference_for_layer

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from layer import matmul_flops  # noqa: E402

C = 4
FORGET = 0.6
# (objective, gate, forget): every way the recurrence is reached
OPTIONS = [("l2", "none", 1.0), ("l2", "none", FORGET), ("l2", "decay", FORGET), ("l2", "decay_write", FORGET),
           ("dot", "decay", FORGET), ("dot", "decay_write", FORGET)]
IDS = [f"{o}-{g}-{f}" for o, g, f in OPTIONS]


@pytest.fixture(params=OPTIONS, ids=IDS)
def option(request):
    objective, gate, forget = request.param
    return dict(objective=objective, gate=gate, forget=forget)


@pytest.mark.parametrize("length", [3 * C, 5 * C + 2, C - 1], ids=["multiple", "ragged", "shorter"])
@pytest.mark.parametrize("kernel_size,kernel_past", [(2, 0), (5, 2)])
@pytest.mark.parametrize("scan_block", [C, 2 * C, 3 * C])
def test_parallel_matches_reference(make_layer, option, length, kernel_size, kernel_past, scan_block):
    layer = make_layer(chunk_size=C, kernel_size=kernel_size, kernel_past=kernel_past, scan_block=scan_block,
                       **option)
    x, x0 = random_inputs(3, length, layer.dim)
    torch.testing.assert_close(layer(x, x0), reference_for_layer(layer, x, x0), rtol=1e-10, atol=1e-10)


def test_the_comparisons_see_each_option(make_layer):
    """Guards the tests: the delta rule, the gate and the step bound each change the output."""
    x, x0 = random_inputs(3, 6 * C, 8)
    dot = make_layer(chunk_size=C)(x, x0)
    l2 = make_layer(chunk_size=C, objective="l2")
    assert (l2(x, x0) - dot)[:, C:].abs().amax() > 1e-2
    scales = l2_step_scales(l2.gated(x), C, l2.eta)
    assert (scales < 0.9).any() and (scales == 1).any()  # the bound binds on some chunks, not all
    fixed = make_layer(chunk_size=C, forget=FORGET)(x, x0)
    gated = make_layer(chunk_size=C, forget=FORGET, gate="decay")
    decay, _ = gated.ttt_gate(x, C)
    assert decay.std() > 0.05
    assert (gated(x, x0) - fixed)[:, 2 * C:].abs().amax() > 1e-2
    torch.testing.assert_close(gated(x, x0)[:, :2 * C], fixed[:, :2 * C], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("objective", ["dot", "l2"])
@pytest.mark.parametrize("gate", ["decay", "decay_write"])
def test_a_constant_gate_is_the_fixed_forgetting_factor(make_layer, objective, gate):
    """A gate that reads nothing (its initial weights) equals `forget` on its own: for "dot"
    the fixed factor runs through the dual form and the scan, a different code path."""
    fixed = make_layer(chunk_size=C, forget=FORGET, objective=objective)
    gated = make_layer(chunk_size=C, forget=FORGET, objective=objective, gate=gate)
    gated.ttt_gate.reset_parameters()
    x, x0 = random_inputs(2, 5 * C + 1, 8)
    torch.testing.assert_close(gated(x, x0), fixed(x, x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stream(gated, x, x0, [1]), stream(fixed, x, x0, [1]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [C, 3 * C])
def test_the_recurrence_equals_the_dual_form_for_the_additive_rule(block):
    """chunk_recurrence with a constant decay against the dual-form scan: outputs and gradients."""
    z, v = random_inputs(2, 5 * C + 1, 6)
    weight = torch.randn(6, 6, dtype=torch.float64)
    decay = torch.full((2, 6), FORGET, dtype=torch.float64)
    grads = []
    for form in ("scan", "recurrence"):
        zz, vv = z.clone().requires_grad_(True), v.clone().requires_grad_(True)
        if form == "scan":
            out = inplace_ttt_down(zz, vv, weight, C, 0.5, forget=FORGET, algorithm="scan", scan_block=8)
        else:
            out = zz @ weight.T + chunk_recurrence(zz, vv, C, 0.5, "dot", decay, block_chunks=block // C)[0]
        grads.append((out, *torch.autograd.grad(out.square().sum(), (zz, vv))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("step_sizes", [[1], [3], [C + 1], [2, 5, 1, 7], [3 * C]], ids=str)
@pytest.mark.parametrize("kernel_size,kernel_past", [(3, 0), (5, 2)])
def test_streaming_matches_parallel(make_layer, option, step_sizes, kernel_size, kernel_past):
    layer = make_layer(chunk_size=C, kernel_size=kernel_size, kernel_past=kernel_past, **option)
    x, x0 = random_inputs(3, 5 * C + 3, layer.dim)
    torch.testing.assert_close(stream(layer, x, x0, step_sizes), layer(x, x0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim,chunk_size", [(8, 16), (20, 3), (6, 1)], ids=["d<C", "d>C", "C=1"])
def test_streaming_fold_covers_every_row(make_layer, option, dim, chunk_size):
    layer = make_layer(dim=dim, chunk_size=chunk_size, **option)
    x, x0 = random_inputs(2, 4 * chunk_size + 1, dim)
    torch.testing.assert_close(stream(layer, x, x0, [1]), reference_for_layer(layer, x, x0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("p", [1, C, 2 * C + 2])
def test_parallel_is_causal(make_layer, option, p):
    layer = make_layer(chunk_size=C, kernel_size=3, **option)
    assert_causal(layer, 5 * C, p)


def test_the_gate_reads_only_its_own_chunk(make_layer):
    """Chunk i's decay comes from chunk i's inputs and acts from chunk i+1 on."""
    layer = make_layer(chunk_size=C, forget=FORGET, gate="decay_write")
    x, x0 = random_inputs(1, 4 * C, layer.dim)
    x2 = x.clone()
    x2[:, C + 1] += 1.0
    decay, write = layer.ttt_gate(x, C)
    decay2, write2 = layer.ttt_gate(x2, C)
    changed = [i for i in range(4) if not torch.equal(decay[:, i], decay2[:, i])]
    assert changed == [1] and not torch.equal(write[:, 1], write2[:, 1])


@pytest.mark.parametrize("reset_at", [C + 2, 2 * C])
def test_reset_one_sample(make_layer, option, reset_at):
    layer = make_layer(chunk_size=C, kernel_size=3, **option)
    assert_reset_one_sample(layer, 5 * C, reset_at)


@pytest.mark.parametrize("skip", [[1, 1, 1], [2 * C + 3]], ids=["steps", "whole-chunks"])
def test_exec_mask_freezes_a_sample(make_layer, option, skip):
    layer = make_layer(chunk_size=C, **option)
    x, x0 = random_inputs(2, 5 * C, layer.dim)
    junk, junk0 = random_inputs(2, sum(skip), layer.dim, seed=3)
    expected = stream(layer, x, x0, [1])
    with layer.streaming(2):
        head = layer(x[:, :C + 1], x0[:, :C + 1])
        layer.set_exec_mask(torch.tensor([False, True]))
        t = 0
        for size in skip:
            layer(junk[:, t:t + size], junk0[:, t:t + size])
            t += size
        layer.set_exec_mask(torch.tensor([True, True]))
        tail = torch.cat([layer(x[:, t:t + 1], x0[:, t:t + 1]) for t in range(C + 1, x.shape[1])], dim=1)
    torch.testing.assert_close(torch.cat([head[:1], tail[:1]], dim=1), expected[:1], rtol=1e-12, atol=1e-12)


def test_samples_have_their_own_fast_weights(make_layer, option):
    layer = make_layer(chunk_size=C, **option)
    x, x0 = random_inputs(3, 4 * C + 1, layer.dim)
    batched = stream(layer, x, x0, [1])
    for b in range(3):
        torch.testing.assert_close(batched[b:b + 1], stream(layer, x[b:b + 1], x0[b:b + 1], [1]),
                                   rtol=1e-12, atol=1e-12)


def test_packed_documents_share_no_fast_weights(make_layer, option):
    layer = make_layer(chunk_size=C, **option)
    lengths = [2 * C + 1, 3 * C + 2]
    x, x0 = random_inputs(1, sum(lengths), layer.dim)
    segments = torch.repeat_interleave(torch.tensor([0, 1]), torch.tensor(lengths))[None]
    packed = layer(x, x0, segments)
    start = 0
    for n in lengths:
        alone = reference_for_layer(layer, x[:, start:start + n], x0[:, start:start + n])
        torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-10, atol=1e-10)
        start += n


@pytest.mark.parametrize("length", [2 * C + 1, 3 * C])
def test_gradcheck_every_parameter(make_layer, option, length):
    layer = make_layer(dim=4, hidden=6, chunk_size=C, scan_block=C, **option)
    names = gradcheck_layer(layer, length)
    assert any(n.startswith("ttt_gate.") for n in names) == (option["gate"] != "none")


def test_a_one_chunk_document_still_gives_every_parameter_a_gradient(make_layer, option):
    """FSDP reduces the gradients of every parameter with one: a process whose documents all fit
    in one chunk (whose update and factors nothing reads) must have them too, zero."""
    layer = make_layer(dim=4, hidden=6, chunk_size=C, **option)
    x, x0 = random_inputs(2, C, 4)
    layer(x, x0).sum().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None]
    assert not missing
    assert all(p.grad.abs().max() == 0 for n, p in layer.named_parameters() if n.startswith(("ttt_gate.", "ttt_target.")))


def test_writing_the_same_chunk_again_converges_to_its_targets():
    """The delta rule moves the fast part to the chunk's targets and stops there; the additive
    rule keeps adding the same update."""
    torch.manual_seed(0)
    h, d, n = 12, 5, 300
    z_chunk, v_chunk = torch.randn(1, C, h, dtype=torch.float64), torch.randn(1, C, d, dtype=torch.float64)
    z, v = z_chunk.repeat(1, n, 1), v_chunk.repeat(1, n, 1)
    eta = 1.0
    l2_term, l2_state = chunk_recurrence(z, v, C, eta, "l2", write=l2_step_scales(z, C, eta))
    dot_term, dot_state = chunk_recurrence(z, v, C, eta, "dot")
    errors = (l2_term - v).view(n, C, d).flatten(1).norm(dim=1)
    assert (errors[1:] <= errors[:-1] + 1e-12).all() and errors[-1] < 1e-8 * errors[0]
    norms = recurrence_trace(z, v, C, eta, "l2", write=l2_step_scales(z, C, eta)).state_norms[0]
    assert norms[-1] - norms[-2] < 1e-8 * norms[-1]
    assert eta * dot_state.norm() > 0.9 * n * eta * (v_chunk[0].T @ z_chunk[0]).norm()  # grows with n


def test_a_key_written_twice_reads_the_second_value():
    """A chunk writes key k with value v1, a later chunk k with v2: the delta rule reads v2,
    the additive rule v1 + v2 (both kept)."""
    torch.manual_seed(0)
    h, d = 12, 5
    key = torch.randn(h, dtype=torch.float64)
    key = 2 * key / key.norm()
    v1, v2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    z = torch.zeros(1, 3, h, dtype=torch.float64)
    z[0, :] = key
    v = torch.stack([v1, v2, torch.zeros(d, dtype=torch.float64)])[None]
    eta = 0.5
    l2_term, _ = chunk_recurrence(z, v, 1, eta, "l2", write=l2_step_scales(z, 1, eta))
    torch.testing.assert_close(l2_term[0, 1], v1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l2_term[0, 2], v2, rtol=1e-12, atol=1e-12)
    dot_term, _ = chunk_recurrence(z, v, 1, eta, "dot")
    torch.testing.assert_close(dot_term[0, 2], eta * key.square().sum() * (v1 + v2), rtol=1e-12, atol=1e-12)


def test_the_step_bound_keeps_the_delta_rule_stable():
    """Rows alike in a chunk (lambda_max = C ||z||^2) and a large eta: unbounded, the step
    overshoots and the fast weights blow up; bounded, they settle."""
    torch.manual_seed(0)
    h, d, n = 12, 5, 30
    row = torch.randn(1, 1, h, dtype=torch.float64)
    z = row.repeat(1, n * C, 1) + 0.01 * torch.randn(1, n * C, h, dtype=torch.float64)
    v = torch.randn(1, n * C, d, dtype=torch.float64)
    eta = 4.0
    bounded = chunk_recurrence(z, v, C, eta, "l2", write=l2_step_scales(z, C, eta))[1]
    free = chunk_recurrence(z, v, C, eta, "l2")[1]
    assert torch.isfinite(bounded).all() and eta * bounded.norm() < 100 * v.norm()
    assert not (free.norm() < 1e20)


def test_forward_keeps_a_state_per_block_not_per_chunk(make_layer):
    """Checkpointed blocks: autograd keeps about one d x h state per block of chunks."""
    dim, hidden, n = 10, 48, 16
    layer = make_layer(dim=dim, hidden=hidden, chunk_size=C, objective="l2", scan_block=4 * C)
    states = []

    def pack(t):
        if t.dim() == 3 and t.shape[1:] == (dim, hidden):
            states.append(t)
        return t

    x, x0 = random_inputs(1, n * C, dim)
    x.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, x0)
    assert len({id(t) for t in states}) == n // 4 - 1  # the first block starts from no state
    out.sum().backward()


DIM, HIDDEN, T = 16, 40, 48


@pytest.mark.parametrize("objective,gate", [("dot", "decay"), ("l2", "none"), ("l2", "decay_write")])
@pytest.mark.parametrize("block", [C, 2 * C, T])
def test_the_recurrence_products(make_layer, objective, gate, block):
    """With n = T / C chunks, the recurrence's products in forward, replay and backward are
    (8n - 6) C x h x d ones (every chunk's update, every chunk's read but the first, twice,
    and their two gradients each, but the last update's): 16 T d h - 12 C d h FLOPs, beside
    the plain MLP's 18 T d h and the target generator's 6 T d^2; the delta rule's step bound
    adds 6 T C h (each chunk's Gram matrix and its gradient), a gate 6 (T / C) d per read-out.
    (Counted without the checkpoint's early stop, which skips the replay of what the backward
    does not need.)"""
    layer = make_layer(dim=DIM, hidden=HIDDEN, chunk_size=C, objective=objective, gate=gate, forget=FORGET,
                       scan_block=block, dtype=torch.float32).train()
    x, x0 = random_inputs(1, T, DIM, dtype=torch.float32)
    x.requires_grad_(True)
    with set_checkpoint_early_stop(False):
        counted = matmul_flops(lambda: layer(x, x0).backward(torch.ones(1, T, DIM)))
    expected = 18 * T * DIM * HIDDEN + 6 * T * DIM * DIM + (16 * T - 12 * C) * DIM * HIDDEN
    expected += 6 * T * C * HIDDEN if objective == "l2" else 0
    expected += 6 * (T // C) * DIM * {"none": 0, "decay": 1, "decay_write": 2}[gate]
    assert counted == expected


def test_bad_options_are_refused():
    from moshi_ttt import TTTConfig
    with pytest.raises(ValueError, match=r"objective='mse': expected one of \('dot', 'l2'\)"):
        InPlaceTTTGating(8, 12, F.silu, objective="mse")
    with pytest.raises(ValueError, match=r"gate='on': expected one of \('none', 'decay', 'decay_write'\)"):
        InPlaceTTTGating(8, 12, F.silu, gate="on", forget=0.9)
    with pytest.raises(ValueError, match="the clip is for the additive update without a gate"):
        InPlaceTTTGating(8, 12, F.silu, objective="l2", clip_tau=0.1)
    with pytest.raises(ValueError, match=r"forget=1.0: a decay gate starts at the forgetting factor"):
        InPlaceTTTGating(8, 12, F.silu, gate="decay")
    with pytest.raises(ValueError, match=r"ttt.objective='mse'"):
        TTTConfig(objective="mse")
    with pytest.raises(ValueError, match=r"ttt.gate='decay' starts"):
        TTTConfig(gate="decay")
    with pytest.raises(ValueError, match=r"decay has shape \(2, 3\): expected one factor per sample and chunk"):
        chunk_recurrence(torch.zeros(2, 4 * C, 6), torch.zeros(2, 4 * C, 5), C, 0.5, decay=torch.ones(2, 3))
    assert math.isclose(torch.sigmoid(InPlaceTTTGating(8, 12, F.silu, gate="decay", forget=0.9)
                                      .ttt_gate.decay.bias).item(), 0.9, rel_tol=1e-6)
