"""The recall task and its evaluation: layout, held-out split, scores counted by hand, bins."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moshi_ttt import build_lm, tiny_lm_config
from moshi_ttt.data.synthetic import Fact, SyntheticDocuments
from moshi_ttt.eval.recall import (Answer, RecallSet, _score, answer_questions, summarize, synthetic_recall_set,
                                   verdict, write_recall)

LAYOUT = dict(num_codebooks=5, dep_q=2, card=64, text_card=120, text_padding_id=3)


def documents(**kwargs):
    settings = dict(num_documents=8, frames=200, pairs=6, spacing=16, seed=0)
    settings.update(kwargs)
    return SyntheticDocuments(settings.pop("num_documents"), settings.pop("frames"), settings.pop("pairs"),
                              **LAYOUT, **settings)


def test_text_documents_state_and_ask_every_fact():
    docs = documents()
    statements = [1 + 16 * i for i in range(6)]
    questions = [198 - 16 * (5 - j) for j in range(6)]
    assert docs.statement_frames() == statements and docs.question_frames() == questions
    for index in range(len(docs)):
        codes, facts = docs[index].numpy(), docs.facts(index)
        assert codes.shape == (5, 200)
        assert sorted(f.stated_frame for f in facts) == statements
        assert [f.answer_frame - 1 for f in facts] == questions
        values = [f.value for f in facts]
        assert len(set(values)) == 6 and len({f.key for f in facts}) == 6  # without replacement
        for fact in facts:
            assert codes[0, fact.stated_frame] == fact.key and codes[0, fact.stated_frame + 1] == fact.value
            assert codes[0, fact.answer_frame - 1] == fact.key and codes[0, fact.answer_frame] == fact.value
            assert fact.distance == fact.answer_frame - fact.stated_frame - 1
        said = set(statements) | {s + 1 for s in statements} | set(questions) | {q + 1 for q in questions}
        filler = [t for t in range(200) if t not in said]
        assert (codes[0, filler] == 3).all()  # the text says nothing else
    # Questions come in a random order, different between documents.
    orders = {tuple(f.stated_frame for f in docs.facts(i)) for i in range(len(docs))}
    assert len(orders) > 1


def test_user_documents_say_facts_in_the_user_stream():
    docs = documents(speaker="user")
    codes, facts = docs[0].numpy(), docs.facts(0)
    user = docs.user_stream
    assert user == 3
    for fact in facts:
        assert codes[user, fact.stated_frame] == fact.key and codes[user, fact.answer_frame - 1] == fact.key
        value_code = codes[user, fact.stated_frame + 1]
        # The value code maps to the text token the model answers with, one to one.
        assert docs.value_ids[list(docs.value_codes).index(value_code)] == fact.value
        assert codes[0, fact.answer_frame] == fact.value
        assert codes[0, fact.stated_frame + 1] == 3  # never in the text stream
    spoken = {f.stated_frame for f in facts} | {f.stated_frame + 1 for f in facts} | {f.answer_frame - 1 for f in facts}
    silent = [t for t in range(200) if t not in spoken]
    assert (codes[user, silent] == 0).all() and (codes[user + 1] == 0).all()


def test_held_out_split_and_seeds_give_other_documents():
    train, held_out = documents(), documents(split="eval")
    assert not torch.equal(train[0], held_out[0])
    assert torch.equal(train[3], documents()[3])
    assert not torch.equal(train[0], documents(seed=1)[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(frames=100), r"data.synthetic.frames=100: too short for 6 pairs spaced 16 frames apart \(needs >= 165\)"),
    (dict(spacing=1), r"data.synthetic.spacing=1: expected an integer >= 2"),
    (dict(speaker="robot"), r"speaker='robot': expected one of"),
    (dict(pairs=60, spacing=2, frames=300), r"pairs=60: the model's vocabulary leaves 56 key tokens"),
])
def test_bad_task_settings_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        documents(**kwargs)


class DesignedLogits(torch.nn.Module):
    """Stands in for a model: fixed text logits per document (looked up by its first code)."""

    def __init__(self, logits: dict[int, torch.Tensor]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.logits = logits

    def forward(self, codes):
        return SimpleNamespace(text_logits=torch.stack([self.logits[int(c[1, 0])] for c in codes])[:, None])


def test_scores_equal_counts_by_hand():
    vocabulary, frames = 10, 12
    # Facts given out of order: they are scored in the order they are asked (by answer frame).
    facts = [[Fact(0, 5, 3, 10), Fact(0, 4, 1, 8)], [Fact(0, 6, 1, 9), Fact(0, 7, 2, 10), Fact(0, 8, 3, 11)]]
    logits = {d: torch.zeros(frames, vocabulary) for d in range(2)}
    logits[0][8, 4] = 3.0   # right, and sure
    logits[0][10, 4] = 2.0  # wrong: a value already answered
    logits[1][9, 6] = 1.0   # right
    logits[1][10, 9] = 5.0  # wrong: a value never stated
    logits[1][11, 8] = 0.5  # right
    docs = [torch.full((2, frames), d) for d in range(2)]
    answers = answer_questions(DesignedLogits(logits), RecallSet("hand", docs, facts, num_values=5), batch_size=1)
    p = {d: logits[d].softmax(-1) for d in range(2)}
    assert [a.correct for a in answers] == [True, False, True, False, True]
    assert [a.distance for a in answers] == [6, 6, 7, 7, 7] and [a.facts for a in answers] == [2, 2, 3, 3, 3]
    assert [a.open_values for a in answers] == [2, 1, 3, 2, 1]
    expected_correct = [p[0][8, 4], p[0][10, 5], p[1][9, 6], p[1][10, 7], p[1][11, 8]]
    # The other values still open: stated, and not the answer of an earlier question.
    expected_other = [p[0][8, 5], None, (p[1][9, 7] + p[1][9, 8]) / 2, p[1][10, 8], None]
    for a, pc, po in zip(answers, expected_correct, expected_other):
        assert a.p_correct == pytest.approx(float(pc)) and a.cross_entropy == pytest.approx(-math.log(float(pc)))
        assert math.isnan(a.p_other) if po is None else a.p_other == pytest.approx(float(po))
    s = summarize(answers, num_values=5, context=4, receptive_field=8)
    assert s["accuracy"] == pytest.approx(3 / 5) and s["questions"] == 5
    assert s["p_correct"] == pytest.approx(float(np.mean(expected_correct)))
    paired = [0, 2, 3]  # the answers with other open values
    assert s["p_other"] == pytest.approx(float(np.mean([expected_other[i] for i in paired])))
    assert s["key_addressing_ratio"] == pytest.approx(
        float(np.mean([expected_correct[i] for i in paired]) / np.mean([expected_other[i] for i in paired])))
    assert s["chance"] == pytest.approx(1 / 5)
    assert s["bag_ceiling"] == pytest.approx((1 / 2 + 1 + 1 / 3 + 1 / 2 + 1) / 5)
    assert s["by_facts"]["2"]["accuracy"] == pytest.approx(1 / 2) and s["by_facts"]["3"]["accuracy"] == pytest.approx(2 / 3)
    table = verdict({"m": s}, "title").splitlines()
    assert table[3].split()[:2] == ["m", "60.0%"]
    assert "chance 1/5 = 20.0%; bag-of-values ceiling 66.7%" in table[4]


def test_a_bag_of_values_that_rules_out_answered_ones_stays_at_the_bag_ceiling():
    """A key-blind model that knows the stated values and drops those already answered."""
    lm = build_lm(tiny_lm_config(context=16)).eval()
    recall_set = synthetic_recall_set(lm, documents=64, frames=160, pairs=6, spacing=8)
    answers = []
    for facts in recall_set.facts:
        logits = torch.full((160, lm.text_card), -30.0)
        open_values = [f.value for f in sorted(facts, key=lambda f: f.answer_frame)]
        for fact in sorted(facts, key=lambda f: f.answer_frame):
            logits[fact.answer_frame, open_values] = 0.0  # uniform: the top-1 is the lowest open id
            open_values.remove(fact.value)
        answers += _score(logits.log_softmax(-1), facts, "bag")
    s = summarize(answers, num_values=56, context=16)
    assert s["bag_ceiling"] == pytest.approx(sum(1 / k for k in range(1, 7)) / 6)
    assert s["key_addressing_ratio"] == pytest.approx(1.0, abs=0.01)
    assert abs(s["accuracy"] - s["bag_ceiling"]) < 0.08


def test_distance_bins_are_in_attention_contexts():
    distances = [0, 9, 10, 25, 39, 40, 61, 200]
    answers = [Answer(i % 2 == 0, 1.0, 0.5, 0.1, d, 6, 3) for i, d in enumerate(distances)]
    bins = summarize(answers, num_values=56, context=10)["by_distance"]
    assert [(b["lo"], b["hi"], b["questions"]) for b in bins] == [
        (0, 10, 2), (10, 20, 1), (20, 30, 1), (30, 40, 1), (40, 60, 1), (60, 80, 1), (160, 240, 1)]
    assert [b["lo_contexts"] for b in bins] == [0, 1, 2, 3, 4, 6, 16]
    assert bins[0]["accuracy"] == 0.5 and bins[1]["accuracy"] == 1.0


def test_a_single_fact_has_no_ratio():
    answers = [Answer(True, 0.1, 0.9, float("nan"), 5, 1, 1)]
    s = summarize(answers, num_values=56, context=None)
    assert math.isnan(s["p_other"]) and math.isnan(s["key_addressing_ratio"]) and s["bag_ceiling"] == 1.0


def test_recall_of_a_model_on_held_out_documents(tmp_path):
    lm = build_lm(tiny_lm_config(context=16)).eval()
    recall_set = synthetic_recall_set(lm, documents=3, frames=60, pairs=3, spacing=4)
    answers = answer_questions(lm, recall_set, batch_size=2)
    assert len(answers) == 9 and recall_set.num_values == 56
    # The same answers document by document: batching changes nothing.
    one = answer_questions(lm, recall_set, batch_size=1)
    assert [a.p_correct for a in one] == pytest.approx([a.p_correct for a in answers], rel=1e-5)
    summary = summarize(answers, num_values=56, context=16, receptive_field=64)
    plots = write_recall({"random": summary}, tmp_path)
    assert plots[0].is_file() and (tmp_path / "recall.csv").read_text().startswith("model,")


def test_the_recall_benchmark_runs_and_resumes(tmp_path):
    """bench/recall.py end to end at a tiny size; a second run reads its runs back."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parent.parent / "bench" / "recall.py"
    command = [sys.executable, str(script), "--sections", "distance", "capacity", "position", "--steps", "2",
               "--documents", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    for _ in range(2):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "recall.json").read_text())
    assert set(results) >= {"main", "distance", "capacity", "position"}
    assert [v["frames"] for v in results["distance"].values()] == [160, 320, 640]
    assert list(results["capacity"]) == ["6", "12", "24", "48"]
    assert "trained model saved" not in done.stdout  # the second run trained nothing
    for name in ("recall.md", "recall_time.png", "recall_distance_capacity.png"):
        assert (tmp_path / "out" / name).is_file(), name
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused = subprocess.run(command[:-4] + ["--work", str(tmp_path / "mine"), "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "is not this benchmark's" in refused.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_annotated_code_files_score_as_the_synthetic_documents(tmp_path):
    from moshi_ttt.eval.recall import code_recall_set
    from moshi_ttt.data.code_files import write_codes
    lm = build_lm(tiny_lm_config(context=16)).eval()
    synthetic = synthetic_recall_set(lm, documents=3, frames=60, pairs=3, spacing=4)
    entries = {}
    for i, (codes, facts) in enumerate(zip(synthetic.documents, synthetic.facts)):
        write_codes(tmp_path / f"doc{i}.npy", codes)
        entries[f"doc{i}.npy"] = [dict(key=f.key, value=f.value, stated_frame=f.stated_frame,
                                       answer_frame=f.answer_frame) for f in facts]
    (tmp_path / "facts.json").write_text(json.dumps({"num_values": synthetic.num_values, "documents": entries}))
    from_files = code_recall_set(tmp_path, lm.num_codebooks)
    assert from_files.facts == synthetic.facts and from_files.num_values == 56
    assert [a.p_correct for a in answer_questions(lm, from_files)] == \
        pytest.approx([a.p_correct for a in answer_questions(lm, synthetic)])
    entries["doc0.npy"][0]["value"] += 1
    (tmp_path / "facts.json").write_text(json.dumps({"num_values": 56, "documents": entries}))
    with pytest.raises(ValueError, match=r"doc0.npy fact 0: the text token at frame \d+ is \d+, not the value"):
        code_recall_set(tmp_path, lm.num_codebooks)
    (tmp_path / "facts.json").write_text(json.dumps({"num_values": 56, "documents": {"other.npy": []}}))
    with pytest.raises(ValueError, match=r"names documents that .* does not hold: \['other.npy'\]"):
        code_recall_set(tmp_path, lm.num_codebooks)


def test_open_values_are_stated_before_the_answer_and_distinct():
    logits = torch.zeros(20, 10)
    logits[:, 4] = 2.0
    # Fact B (value 5) is stated only after A's answer; C repeats A's value 4.
    facts = [Fact(0, 4, 1, 6), Fact(0, 5, 8, 12), Fact(0, 4, 2, 14), Fact(0, 6, 3, 16)]
    answers = _score(logits.log_softmax(-1), facts, "g")
    assert [a.open_values for a in answers] == [2, 3, 2, 1]  # A: {4, 6}; B: {5, 4, 6}; C: {4, 6}; D: {6}
    p = logits.softmax(-1)[0]
    assert answers[0].p_other == pytest.approx(float(p[6]))  # not 5 (not stated yet), not 4 itself
    assert answers[2].p_other == pytest.approx(float(p[6]))
