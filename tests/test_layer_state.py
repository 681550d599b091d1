"""Causality, per-sample fast weights, reset, exec_mask, and what is stored."""

import pytest
import torch

from helpers import assert_reset_one_sample, random_inputs, stream

C = 4


@pytest.mark.parametrize("p", [1, C - 1, C, 2 * C + 2])
@pytest.mark.parametrize("which", ["hidden", "embeddings", "both"])
@pytest.mark.parametrize("kernel_size,kernel_past", [(3, 0), (5, 2)])
def test_parallel_is_causal(make_layer, p, which, kernel_size, kernel_past):
    layer = make_layer(chunk_size=C, kernel_size=kernel_size, kernel_past=kernel_past, clip_tau=0.05)
    x, x0 = random_inputs(2, 4 * C, layer.dim)
    base = layer(x, x0)
    x2, x02 = x.clone(), x0.clone()
    if which in ("hidden", "both"):
        x2[:, p:] += torch.randn_like(x2[:, p:])
    if which in ("embeddings", "both"):
        x02[:, p:] += torch.randn_like(x02[:, p:])
    moved = layer(x2, x02)
    assert torch.equal(moved[:, :p], base[:, :p])
    assert not torch.allclose(moved[:, p:], base[:, p:])


def test_a_conv_on_the_past_reads_nothing_before_its_chunk(make_layer):
    """With taps on the past, the embeddings of one chunk never reach another chunk's update."""
    layer = make_layer(chunk_size=C, kernel_size=5, kernel_past=2)
    x, x0 = random_inputs(1, 3 * C, layer.dim)
    v = layer.ttt_target(x0, C)
    x02 = x0.clone()
    x02[:, :C] += 1.0  # the first chunk only
    v2 = layer.ttt_target(x02, C)
    assert torch.equal(v2[:, C:], v[:, C:]) and not torch.allclose(v2[:, :C], v[:, :C])


def test_embedding_change_reaches_only_later_chunks(make_layer):
    """x0 at p feeds the target of p-1, whose update acts from the next chunk on."""
    layer = make_layer(chunk_size=C)
    x, x0 = random_inputs(1, 3 * C, layer.dim)
    base = layer(x, x0)
    x02 = x0.clone()
    x02[:, C + 1] += 1.0
    moved = layer(x, x02)
    assert torch.equal(moved[:, :2 * C], base[:, :2 * C])
    assert not torch.allclose(moved[:, 2 * C:], base[:, 2 * C:])


def test_samples_have_their_own_fast_weights(make_layer):
    layer = make_layer(chunk_size=C, clip_tau=0.05)
    x, x0 = random_inputs(3, 4 * C + 1, layer.dim)
    batched = stream(layer, x, x0, [1])
    for b in range(3):
        alone = stream(layer, x[b:b + 1], x0[b:b + 1], [1])
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reset_at", [C + 2, 2 * C])
@pytest.mark.parametrize("forget", [1.0, 0.6])
def test_reset_one_sample(make_layer, reset_at, forget):
    layer = make_layer(chunk_size=C, kernel_size=3, clip_tau=0.05, forget=forget)
    assert_reset_one_sample(layer, 5 * C, reset_at)


@pytest.mark.parametrize("skip_sizes", [[1], [2 * C + 3, 2]], ids=["steps", "whole-chunks"])
def test_exec_mask_freezes_a_sample(make_layer, skip_sizes):
    """Steps fed while a sample's exec_mask is off leave no trace in its state."""
    layer = make_layer(chunk_size=C, kernel_size=2, clip_tau=0.05)
    x, x0 = random_inputs(2, 6 * C, layer.dim)
    junk_x, junk_x0 = random_inputs(2, sum(skip_sizes), layer.dim, seed=7)
    expected = stream(layer, x, x0, [1])
    split = C + 1
    outs = []
    with layer.streaming(2):
        for t in range(split):
            outs.append(layer(x[:, t:t + 1], x0[:, t:t + 1]))
        layer.set_exec_mask(torch.tensor([True, False]))
        t_junk = 0
        for size in skip_sizes:
            out = layer(torch.cat([x[:1, split:split + size], junk_x[1:, t_junk:t_junk + size]]),
                        torch.cat([x0[:1, split:split + size], junk_x0[1:, t_junk:t_junk + size]]))
            outs.append(torch.cat([out[:1], torch.full_like(out[1:], float("nan"))]))
            t_junk += size
            split += size
        layer.set_exec_mask(torch.tensor([True, True]))
        resumed = [layer(x[:, t:t + 1], x0[:, t:t + 1]) for t in range(split, x.shape[1])]
    outs = torch.cat(outs, dim=1)
    resumed = torch.cat(resumed, dim=1)
    torch.testing.assert_close(outs[0], expected[0, :split], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(resumed[0], expected[0, split:], rtol=1e-12, atol=1e-12)
    # Sample 1 skipped sum(skip_sizes) real tokens: it continues as if they never came.
    n_skip = sum(skip_sizes)
    keep = list(range(C + 1)) + list(range(C + 1 + n_skip, x.shape[1]))
    alone = stream(layer, x[1:, keep], x0[1:, keep], [1])
    torch.testing.assert_close(resumed[1], alone[0, C + 1:], rtol=1e-12, atol=1e-12)


def test_streaming_never_touches_parameters(make_layer):
    layer = make_layer(chunk_size=C)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x, x0 = random_inputs(2, 3 * C, layer.dim)
    with layer.streaming(2):
        layer(x, x0)
        assert layer._streaming_state.delta.abs().amax() > 0
    layer(x, x0)
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(not p.grad_fn for p in layer.parameters())


def saved_tensors(layer, length, dim):
    """(total bytes, largest numel) that autograd keeps between forward and backward."""
    sizes = []

    def pack(t):
        sizes.append((t.numel() * t.element_size(), t.numel()))
        return t

    x, x0 = random_inputs(1, length, dim)
    x.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, x0).sum().backward()
    return sum(b for b, _ in sizes), max(n for _, n in sizes)


@pytest.mark.parametrize("algorithm", ["dual", "scan"])
def test_saved_memory_does_not_grow_with_chunks(make_layer, algorithm):
    """Flat memory per token from 16 to 128 chunks, and no d x h weight per chunk: blocks
    (of 8 positions here) keep their scores, a whole-sequence dual block recomputes them."""
    dim, hidden = 32, 96
    layer = make_layer(dim=dim, hidden=hidden, chunk_size=4, clip_tau=0.05, algorithm=algorithm, kept_scores=16)
    short_bytes, _ = saved_tensors(layer, 64, dim)
    long_bytes, largest = saved_tensors(layer, 512, dim)
    assert long_bytes / 512 <= 1.05 * short_bytes / 64, (short_bytes, long_bytes)
    assert largest < (512 // 4) * dim * hidden / 2


@pytest.mark.parametrize("algorithm", ["dual", "scan"])
def test_packed_documents_share_no_fast_weights(make_layer, algorithm):
    """Row 0 packs three documents; each equals that document run on its own."""
    layer = make_layer(chunk_size=C, clip_tau=0.05, algorithm=algorithm)
    lengths = [2 * C + 1, 3 * C, C + 2]
    x, x0 = random_inputs(2, sum(lengths), layer.dim)
    segments = torch.zeros(2, sum(lengths), dtype=torch.long)
    segments[0] = torch.repeat_interleave(torch.tensor([4, 7, 5]), torch.tensor(lengths))
    packed = layer(x, x0, segments)
    start = 0
    for n in lengths:
        alone = layer(x[:1, start:start + n], x0[:1, start:start + n])
        torch.testing.assert_close(packed[:1, start:start + n], alone, rtol=1e-12, atol=1e-12)
        start += n
    torch.testing.assert_close(packed[1:], layer(x[1:], x0[1:]), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(packed[:1], layer(x[:1], x0[:1]))


def test_segments_must_match_and_are_not_for_streaming(make_layer):
    layer = make_layer(chunk_size=C)
    x, x0 = random_inputs(2, 9, layer.dim)
    with pytest.raises(ValueError, match=r"segments has shape \(2, 8\): expected \(2, 9\)"):
        layer(x, x0, torch.zeros(2, 8, dtype=torch.long))
    with layer.streaming(2), pytest.raises(ValueError, match="use reset_streaming"):
        layer(x, x0, torch.zeros(2, 9, dtype=torch.long))
