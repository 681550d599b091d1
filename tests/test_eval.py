"""`moshi-ttt eval`: engines that agree, benchmark scoring by hand, no leakage, clear errors."""

import csv
import json
import shutil

import numpy as np
import pytest
import sphn
import torch

from assets import write_plain_checkpoint
from moshi_ttt import TTTConfig, build_lm, load_ttt_lm, save_ttt_lm, tiny_lm_config, ttt_layers
from moshi_ttt.eval import (audio_log_likelihoods, evaluate_documents, position_losses, score_pairs,
                            storycloze_pairs, ttt_diagnostics, zerospeech_pairs)
from moshi_ttt.eval.command import eval_command
from moshi_ttt.eval.benchmarks import Pair, read_audio

C = 8
SR = 24000


def tiny(context=16, **ttt):
    settings = dict(every=2, chunk_size=C, init="normal", init_std=0.1, eta=0.1, clip_tau=1.0)
    settings.update(ttt)
    return build_lm(tiny_lm_config(context=context), TTTConfig(**settings)).eval()


def random_codes(lm, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (batch, lm.num_codebooks, length), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (batch, length), generator=g)
    return codes


def test_window_and_stream_engines_agree_past_the_context():
    lm = tiny(context=16)
    codes = random_codes(lm, 2, 70)
    codes[1, 1, 50:] = -1  # no tokens: not scored
    stream, fast_stream = position_losses(lm, codes, window=1)
    for window in (5, 8, 24):
        windowed, fast = position_losses(lm, codes, window=window)
        torch.testing.assert_close(windowed, stream, rtol=1e-5, atol=1e-5, equal_nan=True)
        for name in fast:
            torch.testing.assert_close(fast[name], fast_stream[name], rtol=1e-5, atol=1e-6)
    assert torch.isnan(stream[1, 1, 50:]).all() and not torch.isnan(stream[0, 1, 50:]).any()
    assert all((v > 0).all() for v in fast_stream.values())
    # Whole-sequence forward (the training path) gives the same losses.
    out = lm(codes)
    text = -out.text_logits[:, 0].float().log_softmax(-1).gather(-1, codes[:, :1].clamp(min=0).transpose(1, 2))[..., 0]
    torch.testing.assert_close(text, stream[:, 0], rtol=1e-5, atol=1e-5)


def test_loss_curves_average_documents_by_position():
    lm = tiny()
    docs = [random_codes(lm, 1, n, seed=n)[0] for n in (30, 50, 50)]
    curve = evaluate_documents(lm, docs, "m", window=8, batch_size=2)
    alone = [position_losses(lm, d[None], window=1)[0][0].numpy() for d in docs]
    assert curve.counts[0] == 3 and curve.counts[40] == 2
    expected = np.nanmean(np.stack([a[:, :30] for a in alone]), axis=0)
    np.testing.assert_allclose(curve.losses[:, :30], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(curve.losses[:, 40], np.nanmean([alone[1][:, 40], alone[2][:, 40]], axis=0),
                               rtol=1e-5, atol=1e-5)
    summary = curve.summary([10, 45, 500])
    assert set(summary["audio_loss_at"]) == {"10", "45"}


@pytest.mark.parametrize("ttt", [{}, {"clip_tau": None, "forget": 0.7},
                                 {"clip_tau": None, "objective": "l2", "gate": "decay_write", "forget": 0.7}],
                         ids=["clip", "forget", "l2-gate"])
def test_diagnostics_match_explicit_fast_weights(ttt):
    """Against the fast weights kept explicitly, chunk by chunk, with each chunk's recorded
    decay and write strength (the clip's factor, the gate's, the delta rule's step bound)."""
    lm = tiny(context=64, **ttt)
    codes = random_codes(lm, 2, 30)
    stats = ttt_diagnostics(lm, codes)
    name, layer = ttt_layers(lm)[0]
    layer.capture = []
    lm(codes)
    record = layer.capture[0]
    layer.capture = None
    z, v = record.z.double(), record.v.double()
    w0 = layer.linear_out.weight.double()
    l2 = layer.objective == "l2"
    expected = {k: [] for k in ("l0", "lprev", "lafter", "update_norm", "accumulated_norm")}
    for b in range(2):
        w = w0.clone()
        rows = {k: [] for k in expected}
        for i, start in enumerate(range(0, 30, C)):
            zi, vi = z[b, start:start + C], v[b, start:start + C]
            if l2:
                objective = lambda m: ((zi @ (m - w0).T - vi) ** 2).sum().item() / 2 / len(zi)  # noqa: E731
            else:
                objective = lambda m: -((zi @ m.T) * vi).sum().item() / len(zi)  # noqa: E731
            rows["l0"].append(objective(w0))
            rows["lprev"].append(objective(w))
            a = 1.0 if record.decay is None else record.decay[b, i].item()
            c = 1.0 if record.write is None else record.write[b, i].item()
            kept = a * (w - w0)
            target = vi - zi @ kept.T if l2 else vi
            delta = layer.eta * c * target.T @ zi
            if layer.clip_tau is not None:
                assert delta.norm() <= layer.clip_tau * (1 + 1e-6)
            w = w0 + kept + delta
            rows["lafter"].append(objective(w))
            rows["update_norm"].append(delta.norm().item())
            rows["accumulated_norm"].append((w - w0).norm().item())
        for k in expected:
            expected[k].append(rows[k])
    for k, per_sample in expected.items():
        np.testing.assert_allclose(stats[name][k], np.mean(per_sample, axis=0), rtol=1e-4, atol=1e-6)
    assert stats[name]["lafter"][0] < stats[name]["lprev"][0]  # the update lowers its own objective
    if "forget" in ttt:
        assert record.decay is not None and (record.decay < 1).all()


def write_wav(path, seconds, seed):
    audio = np.random.default_rng(seed).normal(size=(1, int(seconds * SR))).astype(np.float32) * 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    sphn.write_wav(str(path), audio, SR)
    return path


def write_zerospeech(root):
    """Two lexical ids in two voices (one out of vocabulary), two syntactic ids in one voice."""
    lexical = root / "lexical" / "dev"
    rows = []
    n = 0
    for item, (word, frequency) in enumerate([("kalo", 12), ("mipo", 0)]):
        for voice in ("v1", "v2"):
            for correct in (1, 0):
                name = f"lex{n}"
                write_wav(lexical / f"{name}.wav", 0.4 + 0.08 * n, n)
                rows.append({"id": str(item), "filename": name, "voice": voice, "frequency": frequency,
                             "word": word if correct else word[::-1], "phones": "k a", "length": 2,
                             "correct": correct})
                n += 1
    _write_csv(lexical / "gold.csv", rows)
    syntactic = root / "syntactic" / "dev"
    rows = []
    for item in range(2):
        for correct in (1, 0):
            name = f"syn{n}"
            write_wav(syntactic / f"{name}.wav", 0.5 + 0.1 * n, n)
            rows.append({"filename": name, "id": str(item), "voice": "v1", "type": "agreement", "subtype": "s",
                         "correct": correct, "transcription": "a b"})
            n += 1
    _write_csv(syntactic / "gold.csv", rows)


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def model_dir(tmp_path):
    plain = write_plain_checkpoint(tmp_path / "plain", with_assets=True)
    lm = load_ttt_lm(plain, TTTConfig(every=2, chunk_size=C, init="normal", init_std=0.1, eta=0.1),
                     dtype=torch.float32)
    save_ttt_lm(lm, tmp_path / "ttt")
    for name in ("mimi.safetensors", "mimi_config.json", "tokenizer.model"):
        shutil.copy(plain / name, tmp_path / "ttt" / name)
    return tmp_path / "ttt"


def encoder_for(model_dir):
    from moshi_ttt.data.tokenize import AudioTokenizer
    from moshi_ttt.models import checkpoint_info
    return AudioTokenizer.from_checkpoint_info(checkpoint_info(model_dir))


def test_benchmark_accuracy_matches_a_count_by_hand(model_dir, tmp_path):
    write_zerospeech(tmp_path / "zr")
    lm = load_ttt_lm(model_dir, dtype=torch.float32).eval()
    encoder = encoder_for(model_dir)
    for task in ("lexical", "syntactic"):
        pairs = zerospeech_pairs(tmp_path / "zr", task)
        result = score_pairs(lm, pairs, encoder.encode, batch_size=3)
        # By hand: each file alone, then the official rule (mean over voices per id, then over ids).
        scores = {}
        for pair in pairs:
            for path in (pair.positive, pair.negative):
                total, count = audio_log_likelihoods(lm, [encoder.encode(read_audio(path))], batch_size=1)
                scores[path] = (total[0], total[0] / count[0])
        for kind, k in (("sum", 0), ("mean", 1)):
            per_id = {}
            for pair in pairs:
                a, b = scores[pair.positive][k], scores[pair.negative][k]
                per_id.setdefault(pair.group, []).append(1.0 if a > b else 0.5 if a == b else 0.0)
            assert result[f"accuracy_{kind}"] == pytest.approx(np.mean([np.mean(v) for v in per_id.values()]))
        if task == "lexical":
            assert {"accuracy_sum/oov", "accuracy_sum/in-vocabulary"} <= set(result)
            assert [p.subset for p in pairs] == ["in-vocabulary", "in-vocabulary", "oov", "oov"]
    same = [Pair(pairs[0].positive, pairs[0].positive, "0")]
    assert score_pairs(lm, same, encoder.encode)["accuracy_sum"] == 0.5


def test_no_leakage_between_items_or_files(model_dir, tmp_path):
    lm = load_ttt_lm(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    codes = [torch.randint(0, lm.card, (lm.num_codebooks, n), generator=g) for n in (3 * C, 5 * C + 3, 4 * C)]
    alone = [audio_log_likelihoods(lm, [c], batch_size=1) for c in codes]
    together = audio_log_likelihoods(lm, codes, batch_size=3)
    reverse = audio_log_likelihoods(lm, codes[::-1], batch_size=2)
    for i in range(3):
        assert together[0][i] == pytest.approx(alone[i][0][0], rel=1e-5)
        assert reverse[0][2 - i] == pytest.approx(alone[i][0][0], rel=1e-5)
        assert together[1][i] == alone[i][1][0]
    # Long documents: each row's losses are its own, whatever shares its batch or came before.
    first = position_losses(lm, codes[1][None], window=C)[0][0]
    position_losses(lm, codes[0][None], window=C)
    batch = torch.full((2, lm.num_codebooks, codes[1].shape[1]), -1, dtype=torch.long)
    batch[0], batch[1, :, :codes[0].shape[1]] = codes[1], codes[0]
    together_losses, _ = position_losses(lm, batch, window=C)
    torch.testing.assert_close(together_losses[0], first, rtol=1e-5, atol=1e-5, equal_nan=True)
    # (The last frame of a delayed codebook has a target only in the padded row.)
    alone_losses = position_losses(lm, codes[0][None], window=C)[0][0]
    torch.testing.assert_close(together_losses[1, :, :3 * C - 1], alone_losses[:, :-1], rtol=1e-5, atol=1e-5,
                               equal_nan=True)


def test_storycloze_layout(tmp_path):
    for index in (2, 10):
        write_wav(tmp_path / "sSC" / "part" / f"{index}_correct.wav", 0.3, index)
        write_wav(tmp_path / "sSC" / "part" / f"{index}_incorrect.wav", 0.3, index + 1)
    pairs = storycloze_pairs(tmp_path / "sSC")
    assert [(p.positive.name, p.negative.name) for p in pairs] == [
        ("2_correct.wav", "2_incorrect.wav"), ("10_correct.wav", "10_incorrect.wav")]
    (tmp_path / "sSC" / "part" / "10_incorrect.wav").unlink()
    with pytest.raises(ValueError, match="index 10 lacks its negative recording"):
        storycloze_pairs(tmp_path / "sSC")
    write_wav(tmp_path / "sSC" / "11_ending.wav", 0.3, 1)
    with pytest.raises(ValueError, match="11_ending.wav: cannot tell the correct ending"):
        storycloze_pairs(tmp_path / "sSC")
    with pytest.raises(FileNotFoundError, match="StoryCloze directory not found"):
        storycloze_pairs(tmp_path / "none")


def test_bad_layouts_and_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lexical gold file not found: .*lexical/dev/gold.csv"):
        zerospeech_pairs(tmp_path, "lexical")
    write_zerospeech(tmp_path / "zr")
    gold = tmp_path / "zr" / "syntactic" / "dev" / "gold.csv"
    gold.write_text("filename,id\nx,1\n")
    with pytest.raises(ValueError, match=r"gold.csv: expected the columns"):
        zerospeech_pairs(tmp_path / "zr", "syntactic")
    lexical = tmp_path / "zr" / "lexical" / "dev" / "gold.csv"
    lines = lexical.read_text().splitlines()
    lexical.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"id '1' voice 'v2' lacks a correct or an incorrect file"):
        zerospeech_pairs(tmp_path / "zr", "lexical")
    with pytest.raises(FileNotFoundError, match=r"audio file not found: .*missing.wav"):
        read_audio(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_text("not audio")
    with pytest.raises(ValueError, match=r"cannot read audio file .*bad.wav"):
        read_audio(tmp_path / "bad.wav")


def test_eval_command_writes_results_and_a_report(model_dir, tmp_path):
    write_zerospeech(tmp_path / "zr")
    for index in (1, 2):
        write_wav(tmp_path / "tsc" / f"{index}_correct.wav", 0.4, index)
        write_wav(tmp_path / "tsc" / f"{index}_incorrect.wav", 0.4, index + 5)
    for i in range(2):
        write_wav(tmp_path / "long" / f"book{i}.wav", 4.0 + i, 10 + i)
    out, report = tmp_path / "out", tmp_path / "report"
    results = eval_command(["--model", str(model_dir), "--out", str(out), "--report", str(report),
                            "--long-audio", str(tmp_path / "long"), "--positions", "10", "40",
                            "--zerospeech", str(tmp_path / "zr"), "--tstorycloze", str(tmp_path / "tsc"),
                            "--diagnostics-frames", "40", "--device", "cpu", "--dtype", "float32"])
    assert set(results["models"]) == {"ttt", "ttt (TTT off, same weights)"}
    assert set(results["benchmarks"]["ttt"]) == {"sWUGGY", "sBLIMP", "tStoryCloze"}
    assert results["activity"]["ttt"]["active"]
    summary = results["long_context"]["summary"]
    assert set(summary) == {"ttt", "ttt (TTT off, same weights)"} and summary["ttt"]["documents"] == 2
    for name in ("loss_by_position.csv", "loss_by_position.json", "loss_by_position.png", "diagnostics.json",
                 "benchmarks.json", "results.json"):
        assert (out / name).is_file(), name
    text = (report / "report.md").read_text()
    for section in ("## Spoken-LM benchmarks", "## Loss against position", "## Fast-weight activity",
                    "## TTT diagnostics", "loss_by_position.png", "diagnostics_ttt_transformer_layers_0_gating.png"):
        assert section in text, section
    assert (report / "loss_by_position.png").is_file()
    curve = json.loads((out / "loss_by_position.json").read_text())["curves"]["ttt (TTT off, same weights)"]
    assert len(curve["audio_mean"]) == 63


def test_eval_command_scores_recall_against_a_baseline(model_dir, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report"
    plain = tmp_path / "plain"
    results = eval_command(["--model", str(model_dir), "--model", f"baseline={plain}", "--out", str(out),
                            "--report", str(report), "--recall", "--recall-facts", "2", "3",
                            "--recall-frames", "40", "60", "--recall-spacing", "4", "--recall-documents", "2",
                            "--device", "cpu", "--dtype", "float32"])
    recall = results["recall"]
    assert list(recall) == ["ttt", "ttt (TTT off, same weights)", "baseline"]
    for summary in recall.values():
        assert summary["questions"] == 2 * 2 * (2 + 3)
        assert set(summary["by_facts"]) == {"2", "3"} and len(summary["by_group"]) == 4
    for name in ("recall.json", "recall.csv", "recall.png", "results.json"):
        assert (out / name).is_file(), name
    text = (report / "report.md").read_text()
    assert "## Recall of facts" in text and "recall.png" in text and (report / "recall.png").is_file()


def test_eval_command_scores_recall_over_a_stream(model_dir, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report"
    results = eval_command(["--model", str(model_dir), "--model", f"baseline={tmp_path / 'plain'}",
                            "--out", str(out), "--report", str(report), "--recall-stream", "3",
                            "--recall-streams", "2", "--recall-frames", "40", "--recall-facts", "2",
                            "--recall-spacing", "4", "--recall-documents", "2", "--device", "cpu",
                            "--dtype", "float32"])
    stream = results["recall_stream"]
    assert list(stream) == ["ttt", "ttt (TTT off, same weights)", "baseline"]
    for model, summary in stream.items():
        assert summary["streams"] == 2 and summary["frames"] == 120 and len(summary["per_document"]) == 3
        assert set(summary["text_loss_excess"]) == set(stream) - {model}
    for name in ("recall_stream.json", "recall_stream.csv", "recall_stream.png"):
        assert (out / name).is_file(), name
    text = (report / "report.md").read_text()
    assert "## Recall over a long conversation" in text and (report / "recall_stream.png").is_file()
    with pytest.raises(ValueError, match="--recall-stream=-1: expected"):
        eval_command(["--model", str(model_dir), "--out", str(out), "--recall-stream", "-1"])


@pytest.mark.parametrize("arguments, shown", [
    (["--model", "x/final", "--model", "y/x/final", "--recall"], "both get the label 'x'"),
    (["--model", "{model}"], "nothing to evaluate"),
    (["--model", "{model}", "--recall-stream", "-1"], "--recall-stream=-1: expected"),
    (["--model", "{model}", "--model", "{tmp}/runs/missing", "--recall"], "runs/missing: no such checkpoint"),
    (["--model", "{model}", "--recall", "--out", "{tmp}/held"], "held: already holds results.json; give another "
                                                                "directory, or --overwrite"),
    (["--model", "{model}", "--recall", "--report", "{tmp}/held"], "--report {tmp}/held: already holds"),
    (["--model", "{model}", "--recall", "--out", "{tmp}/held/results.json", "--overwrite"], "is a file"),
])
def test_a_bad_eval_is_one_line_status_2_and_writes_nothing(model_dir, tmp_path, capsys, arguments, shown):
    from moshi_ttt.cli import main
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "results.json").write_text("earlier results")
    before = sorted(tmp_path.rglob("*"))
    argv = [a.format(model=model_dir, tmp=tmp_path) for a in arguments]
    argv += [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stopped:
        main(["eval", *argv])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and len(error.strip().splitlines()) == 1, error
    assert error.startswith("moshi-ttt eval: error: ") and shown.format(tmp=tmp_path) in error
    assert sorted(tmp_path.rglob("*")) == before
    assert (tmp_path / "held" / "results.json").read_text() == "earlier results"


def test_eval_says_what_it_measured_and_where_and_replaces_only_when_asked(model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    from moshi_ttt.eval import command
    out = tmp_path / "out"
    (out / "report").mkdir(parents=True)
    (out / "old.csv").write_text("earlier results")
    argv = ["--model", str(model_dir), "--out", str(out), "--report", str(out / "report"), "--recall",
            "--recall-frames", "40", "--recall-facts", "2", "--recall-spacing", "4", "--recall-documents", "2",
            "--no-ttt-off", "--overwrite", "--device", "cpu", "--dtype", "float32"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:  # an evaluation that stops half-way changes nothing
        patch.setattr(command, "_recall", interrupted)
        with pytest.raises(KeyboardInterrupt):
            eval_command(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain", "ttt"]
    assert sorted(p.name for p in out.iterdir()) == ["old.csv", "report"]
    capsys.readouterr()
    eval_command(argv)
    printed = capsys.readouterr().out
    assert "recall of facts on held-out documents" in printed and "{" not in printed
    assert f"results in {out}: recall.csv, recall.json, recall.png, report, results.json" in printed
    assert f"report: {out / 'report' / 'report.md'}" in printed
    assert (out / "report" / "report.md").is_file() and not (out / "old.csv").exists()


def test_an_unlabelled_model_is_named_by_what_it_holds(model_dir, tmp_path):
    from moshi_ttt.eval.command import model_labels
    ttt_config = (model_dir / "config.json").read_text()
    plain_config = json.loads(ttt_config)
    del plain_config["ttt"]
    for run, config, trained in (("train", ttt_config, None), ("train/baseline", json.dumps(plain_config), True),
                                 ("other", ttt_config, None), ("moshi", json.dumps(plain_config), None)):
        (tmp_path / run / "final").mkdir(parents=True)
        (tmp_path / run / "final" / "config.json").write_text(config)
        if trained is not None:
            (tmp_path / run / "config.yaml").write_text(f"baseline: {str(trained).lower()}\n")
    train, baseline, other, moshi = (str(tmp_path / run / "final") for run in ("train", "train/baseline",
                                                                                "other", "moshi"))
    assert model_labels([train, baseline]) == [("ttt", train), ("baseline", baseline)]
    assert model_labels([train, other, moshi]) == [("ttt (train)", train), ("ttt (other)", other),
                                                   ("moshi", moshi)]
    mlp = json.loads(ttt_config)
    mlp["ttt"] = [dict(mlp["ttt"], method="ttt_mlp"), mlp["ttt"]]
    (tmp_path / "other" / "final" / "config.json").write_text(json.dumps(mlp))
    assert model_labels([other]) == [("ttt+ttt-mlp", other)]


def test_model_labels(tmp_path):
    from moshi_ttt.eval.command import model_labels
    (tmp_path / "lr=3e-4" / "final").mkdir(parents=True)
    path = str(tmp_path / "lr=3e-4" / "final")
    assert model_labels([path, "base=runs/b/final", "runs/c"]) == [
        ("lr=3e-4", path), ("base", "runs/b/final"), ("c", "runs/c")]
