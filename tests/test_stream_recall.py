"""Recall over a stream of documents without a reset: scores against the whole-stream forward,
the first document against the document alone, and the summaries and files."""

import json

import numpy as np
import pytest
import torch

from moshi_ttt import TTTConfig, build_lm, tiny_lm_config
from moshi_ttt.eval.recall import _score, answer_questions, synthetic_recall_set
from moshi_ttt.eval.stream_recall import (score_streams, stream_documents, summarize_streams, text_loss_excess,
                                          write_stream_recall)

FRAMES, PAIRS, SPACING = 40, 3, 4


@pytest.fixture(scope="module")
def lm():
    config = tiny_lm_config()
    config["context"] = 8
    ttt = TTTConfig(layers=[0], chunk_size=8, eta=2.0, init="normal", init_std=0.5, x0_source="text", forget=0.7)
    return build_lm(config, ttt, seed=0).eval()


def streams_of(lm, count=2, per_stream=3):
    source = synthetic_recall_set(lm, documents=count * per_stream, frames=FRAMES, pairs=PAIRS, spacing=SPACING)
    return stream_documents(source, per_stream)


@pytest.mark.parametrize("window", [1, 8])
def test_stream_scores_equal_the_whole_stream_forward(lm, window):
    """Each document's scores, read window by window with the state carried on, equal those of
    one forward over the whole concatenated stream, sliced at the document."""
    streams = streams_of(lm)
    scores = score_streams(lm, streams, window=window)
    with torch.no_grad():
        codes = torch.stack([torch.cat(s.documents, dim=1) for s in streams])
        log_p = lm(codes).text_logits[:, 0].float().log_softmax(-1)
    for k in range(3):
        piece = log_p[:, k * FRAMES:(k + 1) * FRAMES]
        expected = [a for s, stream in enumerate(streams) for a in _score(piece[s], stream.facts[k], stream.name)]
        got = scores.answers[k]
        assert [a.correct for a in got] == [a.correct for a in expected]
        np.testing.assert_allclose([a.cross_entropy for a in got], [a.cross_entropy for a in expected],
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose([a.p_other for a in got], [a.p_other for a in expected], rtol=1e-4, atol=1e-6)
    truth = codes[:, 0]
    text_ce = -log_p.gather(-1, truth[..., None])[..., 0].mean(0)
    np.testing.assert_allclose(scores.text_loss, text_ce.numpy(), rtol=1e-4, atol=1e-4)


def test_stream_scores_equal_documents_scored_one_by_one_by_hand(lm):
    """Each document fed whole, in order, into one streaming state kept open by hand, scored on
    its own: the same answers as score_streams with 7-frame windows (which cut documents)."""
    from moshi_ttt.eval.teacher_forcing import delayed_inputs, widen_kv_caches
    streams = streams_of(lm)
    scores = score_streams(lm, streams, window=7)
    codes = torch.stack([torch.cat(s.documents, dim=1) for s in streams])
    inputs, _ = delayed_inputs(lm, codes)
    with torch.no_grad(), lm.streaming(len(streams)):
        widen_kv_caches(lm, FRAMES)
        for k in range(3):
            _, logits = lm.forward_text(inputs[:, :, k * FRAMES:(k + 1) * FRAMES])
            log_p = logits[:, 0].float().log_softmax(-1)
            by_hand = [a for s, stream in enumerate(streams) for a in _score(log_p[s], stream.facts[k], stream.name)]
            np.testing.assert_allclose([a.cross_entropy for a in scores.answers[k]],
                                       [a.cross_entropy for a in by_hand], rtol=1e-4, atol=1e-4)
            assert [a.correct for a in scores.answers[k]] == [a.correct for a in by_hand]


def test_documents_carry_the_state_on(lm):
    """The first document scores as alone (fresh memory); a later one differs from itself alone."""
    streams = streams_of(lm, count=1)
    scores = score_streams(lm, streams, window=8)
    alone = [answer_questions(lm, type(streams[0])(streams[0].name, [d], [f], streams[0].num_values))
             for d, f in zip(streams[0].documents, streams[0].facts)]
    np.testing.assert_allclose([a.cross_entropy for a in scores.answers[0]],
                               [a.cross_entropy for a in alone[0]], rtol=1e-4, atol=1e-4)
    later = np.array([a.cross_entropy for a in scores.answers[2]])
    assert np.abs(later - np.array([a.cross_entropy for a in alone[2]])).max() > 1e-3


def test_streams_of_documents_of_any_length_score_as_each_stream_alone(lm):
    """Streams whose documents differ in length (and in number of frames): read together, each
    scores as it does alone, its documents' text loss and fast-weight norms included."""
    source = synthetic_recall_set(lm, documents=6, frames=FRAMES, pairs=PAIRS, spacing=SPACING,
                                  max_frames=2 * FRAMES)
    streams = stream_documents(source, 3)
    assert [d.shape[1] for d in streams[0].documents] != [d.shape[1] for d in streams[1].documents]
    together = summarize_streams(score_streams(lm, streams, window=8), num_values=source.num_values, streams=2)
    alone = [summarize_streams(score_streams(lm, [s], window=8), num_values=source.num_values, streams=1)
             for s in streams]
    for k in range(3):
        got = together["per_document"][k]
        assert got["questions"] == 2 * PAIRS
        np.testing.assert_allclose(got["cross_entropy"], np.mean([a["per_document"][k]["cross_entropy"]
                                                                  for a in alone]), rtol=1e-4)
        np.testing.assert_allclose(got["text_loss"], np.mean([a["per_document"][k]["text_loss"] for a in alone]),
                                   rtol=1e-4)
    name = "transformer.layers.0.gating"
    np.testing.assert_allclose(together["fast_weight_norms"][name],
                               np.maximum(*[a["fast_weight_norms"][name] for a in alone]), rtol=1e-4)
    assert together["frames"] == max(a["frames"] for a in alone)


def test_streams_need_as_many_documents(lm):
    streams = streams_of(lm)
    streams[1].documents.pop()
    streams[1].facts.pop()
    with pytest.raises(ValueError, match=r"the streams hold \[2, 3\] documents"):
        score_streams(lm, streams, window=4)
    with pytest.raises(ValueError, match="documents_per_stream=7: expected 1 .. 6"):
        stream_documents(synthetic_recall_set(lm, documents=6, frames=FRAMES, pairs=PAIRS, spacing=SPACING), 7)


def test_summary_and_files(lm, tmp_path):
    streams = streams_of(lm, count=2, per_stream=4)
    summary = summarize_streams(score_streams(lm, streams, window=8), num_values=streams[0].num_values, streams=2)
    assert summary["documents_per_stream"] == 4 and summary["frames"] == 4 * FRAMES
    norms = summary["fast_weight_norms"]["transformer.layers.0.gating"]
    assert len(norms) == 4 and all(n > 0 for n in norms)
    assert [d["start_frame"] for d in summary["per_document"]] == [0, 40, 80, 120]
    assert all(d["questions"] == 2 * PAIRS for d in summary["per_document"])
    assert summary["last_document"] == {k: v for k, v in summary["per_document"][-1].items()
                                        if k not in ("index", "start_frame", "text_loss")}
    np.testing.assert_allclose(summary["per_document"][1]["text_loss"], np.mean(summary["text_loss"][40:80]),
                               rtol=1e-4)
    other = dict(summary, text_loss=[v - 0.5 if 80 <= i < 120 else v for i, v in enumerate(summary["text_loss"])])
    excess = text_loss_excess({"a": summary, "b": other}, "a", "b", span=40)
    assert excess["at_frame"] == 80 and excess["max_excess"] == pytest.approx(0.5, abs=1e-4)
    paths = write_stream_recall({"a": summary, "b": other}, tmp_path)
    assert paths == [tmp_path / "recall_stream.png"] and paths[0].stat().st_size > 0
    assert json.loads((tmp_path / "recall_stream.json").read_text())["a"]["frames"] == 160
    rows = (tmp_path / "recall_stream.csv").read_text().splitlines()
    assert rows[0].startswith("model,document,start_frame") and len(rows) == 1 + 2 * 4
