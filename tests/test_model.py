"""A TTT-enabled Moshi: conversion, streaming, causality, per-conversation reset, LMGen."""

import copy

import pytest
import torch
from moshi.models.lm import LMGen

from moshi_ttt import TTTConfig, apply_ttt, build_lm, set_ttt_enabled, tiny_lm_config, ttt_layers

C = 8
ACTIVE = dict(every=2, chunk_size=C, init="normal", init_std=0.1, eta=0.1)


def random_codes(lm, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (batch, lm.num_codebooks, length), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (batch, length), generator=g)
    return codes


def logits_of(lm, codes):
    out = lm(codes)
    return out.text_logits.nan_to_num(), out.logits.nan_to_num()


def test_warm_start_gives_plain_logits():
    plain = build_lm(tiny_lm_config())
    ttt = build_lm(tiny_lm_config(), TTTConfig(every=1, chunk_size=C, eta=5.0, init="warm"))
    codes = random_codes(plain, 2, 5 * C)
    for a, b in zip(logits_of(plain, codes), logits_of(ttt, codes)):
        assert torch.equal(a, b)
    assert [n for n, _ in ttt_layers(ttt)] == [f"transformer.layers.{i}.gating" for i in range(4)]
    assert ttt_layers(ttt.depformer) == []


def test_active_ttt_changes_only_later_chunks_and_can_be_switched_off():
    plain = build_lm(tiny_lm_config())
    ttt = build_lm(tiny_lm_config(), TTTConfig(**ACTIVE))
    codes = random_codes(plain, 2, 4 * C)
    plain_text, _ = logits_of(plain, codes)
    ttt_text, _ = logits_of(ttt, codes)
    # The first chunk (plus the text delay of 0) has no earlier update to read.
    assert torch.equal(ttt_text[..., :C, :], plain_text[..., :C, :])
    assert not torch.allclose(ttt_text[..., C:, :], plain_text[..., C:, :])
    set_ttt_enabled(ttt, False)
    assert torch.equal(logits_of(ttt, codes)[0], plain_text)


@pytest.mark.parametrize("x0_source", ["input", "text", "user", "text_user", "hidden"])
def test_streaming_forward_text_matches_full_sequence(x0_source):
    lm = build_lm(tiny_lm_config(), TTTConfig(**ACTIVE, x0_source=x0_source))
    sequence = random_codes(lm, 2, 4 * C + 3)
    full, full_text = lm.forward_text(sequence)
    with lm.streaming(2):
        steps = [lm.forward_text(sequence[:, :, t:t + 1]) for t in range(sequence.shape[-1])]
    torch.testing.assert_close(torch.cat([s[0] for s in steps], dim=1), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([s[1] for s in steps], dim=2), full_text, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(full[0], full[1])


def test_x0_sources_differ():
    codes = random_codes(build_lm(tiny_lm_config()), 1, 3 * C)
    sources = ("input", "text", "user", "text_user", "hidden")
    outs = [build_lm(tiny_lm_config(), TTTConfig(**ACTIVE, x0_source=s)).forward_text(codes)[0] for s in sources]
    for i in range(len(outs)):
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j]), (sources[i], sources[j])


@pytest.mark.parametrize("x0_source,streams", [("text", [0]), ("user", [3, 4]), ("text_user", [0, 3, 4]),
                                               ("input", [0, 1, 2, 3, 4])])
def test_x0_is_the_sum_of_the_chosen_streams_embeddings(x0_source, streams):
    lm = build_lm(tiny_lm_config(), TTTConfig(**ACTIVE, x0_source=x0_source))
    codes = random_codes(lm, 2, 2 * C)
    seen = []
    _, layer = ttt_layers(lm)[0]
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    lm.forward_text(codes)
    hook.remove()
    embeddings = [lm.text_emb(codes[:, 0])] + [lm.emb[k](codes[:, 1 + k]) for k in range(lm.num_audio_codebooks)]
    torch.testing.assert_close(seen[0], sum(embeddings[s] for s in streams))


@pytest.mark.parametrize("p", [C - 1, 2 * C + 3])
def test_model_is_causal(p):
    lm = build_lm(tiny_lm_config(), TTTConfig(**ACTIVE, clip_tau=1.0))
    codes = random_codes(lm, 2, 4 * C)
    moved = codes.clone()
    moved[:, :, p:] = random_codes(lm, 2, 4 * C - p, seed=1)
    base_text, base_audio = logits_of(lm, codes)
    new_text, new_audio = logits_of(lm, moved)
    safe = p - max(lm.delays)
    assert torch.equal(new_text[..., :safe, :], base_text[..., :safe, :])
    assert torch.equal(new_audio[..., :safe, :], base_audio[..., :safe, :])
    assert not torch.allclose(new_text[..., p + 1:, :], base_text[..., p + 1:, :])


def stream_forward_text(lm, sequence, reset_at=None, reset_mask=None):
    outs = []
    with lm.streaming(sequence.shape[0]):
        for t in range(sequence.shape[-1]):
            if t == reset_at:
                lm.reset_streaming(reset_mask)
            outs.append(lm.forward_text(sequence[:, :, t:t + 1])[0])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("reset_at", [C + 3, 2 * C])
def test_reset_one_conversation(reset_at):
    lm = build_lm(tiny_lm_config(), TTTConfig(**ACTIVE, clip_tau=1.0))
    sequence = random_codes(lm, 2, 4 * C)
    untouched = stream_forward_text(lm, sequence)
    reset = stream_forward_text(lm, sequence, reset_at, torch.tensor([False, True]))
    fresh = stream_forward_text(lm, sequence[1:, :, reset_at:])
    assert torch.equal(reset[0], untouched[0])
    torch.testing.assert_close(reset[1, reset_at:], fresh[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reset[1, reset_at:], untouched[1, reset_at:])


def test_lmgen_streams_like_the_parallel_path():
    """A few hundred LMGen steps; the transformer inputs it made, replayed in parallel, agree.

    X0 is the transformer's input here, so that the replay through the transformer alone has it."""
    lm = build_lm(tiny_lm_config(), TTTConfig(**ACTIVE, clip_tau=1.0, x0_source="input"))
    gen = LMGen(lm, temp=0.8, temp_text=0.7)
    recorded = []
    hook = lm.transformer.register_forward_hook(lambda m, a, out: recorded.append((a[0], out)))
    g = torch.Generator().manual_seed(0)
    user = torch.randint(0, lm.card, (2, lm.n_q - lm.dep_q, 300), generator=g)
    with gen.streaming(2):
        tokens = [gen.step(user[:, :, t:t + 1]) for t in range(300)]
        deltas = [layer._streaming_state.delta.abs().amax() for _, layer in ttt_layers(lm)]
        gen.reset_streaming(torch.tensor([True, False]))
        after_reset = [layer._streaming_state.delta for _, layer in ttt_layers(lm)]
        assert all(not d[0].any() and d[1].any() for d in after_reset)
    hook.remove()
    assert all(d > 0 for d in deltas)
    assert sum(t is not None for t in tokens) == 300 - max(lm.delays)
    inputs = torch.cat([x for x, _ in recorded], dim=1)
    streamed = torch.cat([y for _, y in recorded], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(lm.transformer(inputs), streamed, rtol=1e-4, atol=1e-4)


def test_deepcopy_keeps_embedding_routing():
    lm = build_lm(tiny_lm_config(), TTTConfig(**ACTIVE, x0_source="text"))
    twin = copy.deepcopy(lm)
    codes = random_codes(lm, 1, 3 * C)
    assert torch.equal(lm.forward_text(codes)[0], twin.forward_text(codes)[0])


def test_activation_checkpointing_gives_the_same_gradients():
    codes = random_codes(build_lm(tiny_lm_config()), 2, 3 * C)
    grads = []
    for checkpointing in (False, True):
        lm = build_lm(tiny_lm_config(), TTTConfig(**ACTIVE)).train()
        lm.transformer.checkpointing = checkpointing
        lm(codes).text_logits.nan_to_num().square().mean().backward()
        grads.append({n: p.grad for n, p in lm.named_parameters() if "ttt_target" in n})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
        assert grads[0][name].abs().amax() > 0, name


def test_conversion_errors():
    with pytest.raises(TypeError, match="expects a moshi LMModel, got Linear"):
        apply_ttt(torch.nn.Linear(2, 2), TTTConfig())
    lm = build_lm(tiny_lm_config())
    with pytest.raises(ValueError, match=r"ttt.layers=\[1, 7\]: \[7\] out of range .* 4 layers"):
        apply_ttt(lm, TTTConfig(layers=[1, 7]))
    apply_ttt(lm, TTTConfig(layers=[1]))
    with pytest.raises(ValueError, match="already has In-Place TTT layers"):
        apply_ttt(lm, TTTConfig(layers=[2]))


def test_converting_a_model_that_streamed_before():
    """moshi caches the streaming children of a model; conversion must refresh that."""
    plain = build_lm(tiny_lm_config())
    converted = build_lm(tiny_lm_config())
    sequence = random_codes(plain, 1, 3 * C)
    stream_forward_text(converted, sequence[:, :, :2])
    apply_ttt(converted, TTTConfig(**ACTIVE))
    assert not converted.transformer.layers[0].gating.training
    fresh = build_lm(tiny_lm_config(), TTTConfig(**ACTIVE))
    torch.testing.assert_close(stream_forward_text(converted, sequence),
                               stream_forward_text(fresh, sequence), rtol=0, atol=0)
    assert not torch.allclose(stream_forward_text(converted, sequence), stream_forward_text(plain, sequence))
    streaming = build_lm(tiny_lm_config())
    with streaming.streaming(1), pytest.raises(ValueError, match="before streaming"):
        apply_ttt(streaming, TTTConfig(**ACTIVE))


def test_packed_documents_in_the_model():
    """With document ids, the second document's TTT term ignores the first document."""
    from moshi_ttt import document_segments
    lm = build_lm(tiny_lm_config(), TTTConfig(**ACTIVE))
    codes = random_codes(lm, 1, 5 * C)
    split = 2 * C + 3
    segments = (torch.arange(5 * C) >= split).long()[None]
    joined_text, _ = logits_of(lm, codes)
    with document_segments(lm, segments):
        packed_text, _ = logits_of(lm, codes)
    torch.testing.assert_close(packed_text[..., :split, :], joined_text[..., :split, :], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed_text[..., split:, :], joined_text[..., split:, :])
    # Every TTT layer saw the document ids: none of the second document's chunks read the first's.
    records = []
    for _, layer in ttt_layers(lm):
        layer.register_forward_pre_hook(lambda m, args: records.append(args[2]))
    with document_segments(lm, segments):
        lm(codes)
    assert len(records) == len(ttt_layers(lm)) and all(torch.equal(r, segments) for r in records)
    lm(codes)
    assert records[-1] is None


def test_user_sources_need_a_user_stream():
    for source in ("user", "text_user"):
        with pytest.raises(ValueError, match=f"x0_source='{source}': this model has no user audio stream"):
            build_lm(tiny_lm_config(n_q=2, dep_q=2, delays=[0, 0, 1]), TTTConfig(**ACTIVE, x0_source=source))
