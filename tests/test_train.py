"""`moshi-ttt train`: learning, exact resume, torchrun, modes, checkpoints."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import torchrun_train
from moshi_ttt import TTTConfig, build_lm, tiny_lm_config, ttt_layers
from moshi_ttt.train import TrainConfig, train
from moshi_ttt.train import checkpointing, trainer
from moshi_ttt.train.modes import apply_mode, parameter_group

SMALL = {"max_steps": 8, "batch_size": 2, "seq_frames": 96, "log_freq": 1, "ckpt_freq": 4,
         "mode": "ttt_layers", "optim": {"lr": 1e-3},
         "ttt": {"every": 2, "chunk_size": 32, "init": "normal", "init_std": 0.05, "eta": 0.05},
         "eval_documents": 4, "eval_stream_documents": 0, "reset_fast_weights": "document", "stream_from_step": 0,
         "data": {"synthetic": {"num_documents": 16, "frames": 64, "pairs": 3, "spacing": 8}}}


def config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    data = yaml.safe_load(yaml.safe_dump(SMALL))
    data.update(overrides)
    data["run_dir"] = str(tmp_path / name)
    return TrainConfig.from_dict(data)


def logged_losses(run_dir: Path) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def test_loss_goes_down_on_synthetic_data(tmp_path):
    result = train(config(tmp_path, max_steps=40, ckpt_freq=40, optim={"lr": 3e-3}))
    losses = result["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0, losses
    assert (tmp_path / "run" / "final" / "ttt.safetensors").is_file()
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["grad_norm/ttt_target"] > 0
    assert any(k.startswith("fast_weight_update/transformer.layers.") for k in logged)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, capsys):
    whole = train(config(tmp_path, "whole", ckpt_freq=3))["losses"]
    capsys.readouterr()
    first = train(config(tmp_path, "split", ckpt_freq=3), stop_after=4)["losses"]
    out = capsys.readouterr().out
    assert "--stop-after 4: stopped after step 4 of 8; continue with the same command and --resume." in out
    assert (tmp_path / "split" / "losses.png").is_file() and "about " in out and " s of training left" in out
    # A checkpoint every 3 steps, and one where the run stopped.
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "split")] == ["step_000003", "step_000004"]
    rest = train(config(tmp_path, "split", ckpt_freq=3), resume=True)["losses"]
    assert first + rest == whole
    assert logged_losses(tmp_path / "split") == logged_losses(tmp_path / "whole")
    final_whole = load_file(str(tmp_path / "whole" / "checkpoints" / "step_000008" / "trainable.safetensors"))
    final_split = load_file(str(tmp_path / "split" / "checkpoints" / "step_000008" / "trainable.safetensors"))
    assert final_whole.keys() == final_split.keys()
    assert all(torch.equal(final_whole[k], final_split[k]) for k in final_whole)


def test_two_ddp_processes_take_the_same_steps_as_one(tmp_path):
    single = config(tmp_path, "single", max_steps=3, ckpt_freq=3)
    train(single)
    double = config(tmp_path, "double", max_steps=3, ckpt_freq=3, batch_size=1, device="cpu", distributed="ddp")
    (tmp_path / "double.yaml").write_text(double.to_yaml())
    torchrun_train(tmp_path / "double.yaml")
    one, two = logged_losses(tmp_path / "single"), logged_losses(tmp_path / "double")
    assert one.keys() == two.keys() == {1, 2, 3}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    a = load_file(str(tmp_path / "single" / "checkpoints" / "step_000003" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "double" / "checkpoints" / "step_000003" / "trainable.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["ttt", "ttt_layers", "lora", "full"])
def test_each_mode_trains_exactly_what_it_names(tmp_path, mode):
    lm = build_lm(tiny_lm_config(), TTTConfig(every=2, chunk_size=32, gate="decay_write", forget=0.9))
    counts = apply_mode(lm, mode, lora_rank=4)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    everything = {n for n, _ in lm.named_parameters()}
    ttt = {n for n in everything if ".ttt_target." in n or ".ttt_gate." in n}
    assert any(".ttt_gate." in n for n in ttt)
    if mode == "ttt":
        assert trainable == ttt
    elif mode == "ttt_layers":
        assert trainable == {n for n in everything if n.startswith(("transformer.layers.0.", "transformer.layers.2."))}
        assert ttt < trainable and "transformer.layers.1.gating.linear_in.weight" not in trainable
    elif mode == "lora":
        lora = {n for n in everything if ".lora_A." in n or ".lora_B." in n}
        assert lora and trainable == lora | ttt
        assert not any(".ttt_target.proj.lora" in n for n in everything)
    else:
        assert trainable == everything
    assert sum(counts.values()) == sum(p.numel() for p in lm.parameters() if p.requires_grad)

    run = config(tmp_path, mode=mode, max_steps=1, ckpt_freq=1, lora={"rank": 4},
                 ttt=dict(SMALL["ttt"], gate="decay_write", forget=0.9, chunk_size=16))  # a decay is read from
    # the third chunk of a document on
    start = trainer.build_model(run, torch.device("cpu"))
    apply_mode(start, mode, lora_rank=4)
    before = {n: p.detach().clone() for n, p in start.named_parameters()}
    train(run)
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step_000001" / "trainable.safetensors"))
    assert set(saved) == trainable
    changed = {n for n in saved if not torch.equal(saved[n], before[n])}
    assert ttt <= changed <= trainable


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = config(tmp_path, max_steps=8, ckpt_freq=4)
    train(run, stop_after=4)
    previous = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints" / "step_000004").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        train(run, resume=True)
    checkpoints = checkpointing.list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == ["step_000004"]
    assert {p.name: p.read_bytes() for p in checkpoints[0].iterdir()} == previous
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("data,match", [
    ({"max_step": 3}, r"unknown config key\(s\) \['max_step'\]"),
    ({"optim": {"learning_rate": 1}}, r"unknown config key\(s\) \['optim.learning_rate'\]"),
    ({"batch_size": 0}, r"batch_size=0: expected an integer >= 1"),
    ({"optim": {"lr": -1.0}}, r"optim.lr=-1.0: expected a finite number > 0"),
    ({"mode": "partial"}, r"mode='partial': expected one of"),
    ({"data": {"source": "codes"}}, r"data.train_data is required for data.source='codes'"),
    ({"duration_sec": 10.0, "seq_frames": 96}, r"give at most one of the two"),
    ({"ttt": {"chunk_size": 0}}, r"ttt: ttt.chunk_size=0"),
    ({"data": {"synthetic": {"frames": 10}}}, None),
    ({"reset_fast_weights": "never"}, r"reset_fast_weights='never': expected one of \('document', 'row'\)"),
    ({"data": {"synthetic": {"max_frames": 100}}}, r"data.synthetic.max_frames=100: expected an integer >= 160"),
    ({"data": {"synthetic": {"documents_per_row": 0}}}, r"data.synthetic.documents_per_row=0: expected an integer"),
    ({"ttt": {"forget": 0}}, r"ttt.forget=0: expected a number in \(0, 1\]"),
])
def test_bad_config_names_the_field(data, match):
    if match is None:
        from moshi_ttt.data.synthetic import SyntheticDocuments
        with pytest.raises(ValueError, match=r"data.synthetic.frames=10: too short"):
            SyntheticDocuments(4, 10, 6, num_codebooks=5, dep_q=2, card=64, text_card=120, text_padding_id=3,
                               spacing=16)
        return
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(data)


def _every_key():
    """(dotted key, a value of the wrong type for it) for every key of every config section."""
    import types
    import typing as tp
    from moshi_ttt.models.tiny import tiny_lm_config
    from moshi_ttt.train.config import _nested_type

    def wrong(annotation):
        kinds = tp.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        return 5 if str in kinds else "abc"

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            nested = _nested_type(f.type)
            if nested is None or nested is TTTConfig:
                yield from (walk_ttt(prefix + f.name + ".") if nested is TTTConfig else
                            [(prefix + f.name, wrong(f.type))])
            else:
                yield from walk(nested, prefix + f.name + ".")

    def walk_ttt(prefix):
        return [(prefix + f.name, wrong(f.type)) for f in dataclasses.fields(TTTConfig)]
    tiny = [(f"tiny.{k}", wrong(type(v))) for k, v in tiny_lm_config().items() if v is not None]
    return list(walk(TrainConfig, "")) + tiny


def test_a_value_of_the_wrong_type_is_one_line_that_names_its_key():
    keys = _every_key()
    assert len(keys) > 100 and "max_steps" in dict(keys) and "tiny.context" in dict(keys)
    for key, value in keys:
        data = {}
        *parents, leaf = key.split(".")
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
        with pytest.raises(ValueError) as refused:
            TrainConfig.from_dict(data)
        assert leaf in str(refused.value) and "\n" not in str(refused.value), (key, str(refused.value))


@pytest.mark.parametrize("arguments,shown", [
    (["--set", "max_steps=abc"], "max_steps='abc': expected an integer"),
    (["--set", "tiny.context=abc"], "tiny.context='abc': expected an integer"),
    (["--set", "optim.lr=abc"], "optim.lr='abc': expected a number"),
    (["--set", "max_steps"], "--set 'max_steps': expected KEY=VALUE"),
    (["--set", "ttt={eta: 0.5"], "--set 'ttt={eta: 0.5': the value is not valid YAML"),
    (["--config", "nope.yaml"], "training config not found: nope.yaml"),
    (["--config", "bad.yaml"], "bad.yaml is not valid YAML: expected ',' or '}', but got '<stream end>' at line 2"),
    (["--with-baseline", "--stop-after", "5"], "--with-baseline trains both runs to the end"),
])
def test_a_bad_command_line_is_one_line_status_2_and_writes_nothing(tmp_path, arguments, shown):
    import subprocess
    import sys
    (tmp_path / "bad.yaml").write_text("ttt: {eta: 0.5\n")
    done = subprocess.run([sys.executable, "-m", "moshi_ttt.cli", "train", "--set", "run_dir=run", *arguments],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "NO_TORCH_COMPILE": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("moshi-ttt train: error: ")
    assert shown in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="training config not found"):
        TrainConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("max_steps: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        TrainConfig.load(tmp_path / "bad.yaml")
    run = config(tmp_path)
    (tmp_path / "good.yaml").write_text(run.to_yaml())
    assert TrainConfig.load(tmp_path / "good.yaml") == run


def test_a_partial_ttt_section_keeps_the_run_defaults():
    default = TrainConfig().ttt
    changed = TrainConfig.from_dict({"ttt": {"eta": 0.1}}).ttt
    assert changed.eta == 0.1
    assert {k: v for k, v in changed.to_dict().items() if k != "eta"} == \
        {k: v for k, v in default.to_dict().items() if k != "eta"}
    assert (changed.every, changed.chunk_size) == (default.every, default.chunk_size)
    every = TrainConfig.from_dict({"ttt": {"every": 2}}).ttt
    assert every.layers is None and every.layer_indices(4) == [0, 2] and every.eta == default.eta
    nested = TrainConfig.from_dict({"data": {"synthetic": {"pairs": 3}}})
    assert nested.data.synthetic.pairs == 3 and nested.data.synthetic.frames == TrainConfig().data.synthetic.frames


def test_the_command_line_reads_numbers_as_yaml_1_1_does_not(tmp_path, monkeypatch):
    from moshi_ttt.train import command
    seen = {}
    monkeypatch.setattr(trainer, "train", lambda config, **kwargs: seen.setdefault("config", config))
    (tmp_path / "run.yaml").write_text("optim:\n  lr: 2e-6\n")
    command.train_command(["--config", str(tmp_path / "run.yaml"), "--set", "ttt.eta=0.25",
                           "--set", "optim.weight_decay=1e-2"])
    config = seen["config"]
    assert config.optim.lr == 2e-6 and config.optim.weight_decay == 1e-2
    assert config.ttt.eta == 0.25 and config.ttt.chunk_size == TrainConfig().ttt.chunk_size
    with pytest.raises(ValueError, match=r"optim.lr='fast': expected a number"):
        TrainConfig.from_dict({"optim": {"lr": "fast"}})


def test_the_baseline_trains_the_same_run_without_ttt(tmp_path):
    run = config(tmp_path, "base", max_steps=2, ckpt_freq=2, baseline=True)
    lm = trainer.build_model(run, torch.device("cpu"))
    assert ttt_layers(lm) == [] and not any(".ttt_target." in n for n, _ in lm.named_parameters())
    apply_mode(lm, run.mode, layers=run.ttt.layer_indices(len(lm.transformer.layers)))
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    with_ttt = trainer.build_model(config(tmp_path, "ttt"), torch.device("cpu"))
    apply_mode(with_ttt, "ttt_layers")
    same = {n for n, p in with_ttt.named_parameters() if p.requires_grad and not parameter_group(n).startswith("ttt_")}
    assert trainable == same
    # The same initial weights as its TTT run.
    ttt_state = with_ttt.state_dict()
    assert all(torch.equal(v, ttt_state[k]) for k, v in lm.state_dict().items())
    result = train(run)
    assert set(result["recall"]) == {"baseline trained without TTT"}
    final = tmp_path / "base" / "final"
    assert not (final / "ttt.safetensors").exists()
    # A plain Moshi checkpoint: moshi's loader reads it, and load_ttt_lm converts it (the retrofit path).
    from moshi_ttt import load_ttt_lm
    from moshi_ttt.models import load_moshi_lm
    plain = load_moshi_lm(final, dtype=torch.float32)
    converted = load_ttt_lm(final, TTTConfig(every=2, chunk_size=32), dtype=torch.float32)
    assert len(ttt_layers(converted)) == 2 and not ttt_layers(plain)
    with pytest.raises(ValueError, match="baseline=true with mode='ttt'"):
        config(tmp_path, mode="ttt", baseline=True)


def test_with_baseline_compares_both_runs(tmp_path, capsys):
    run = config(tmp_path, max_steps=2, ckpt_freq=2, eval_freq=1, eval_documents=2, eval_stream_documents=3)
    result = trainer.train_with_baseline(run)
    assert set(result["recall"]) == {"TTT", "same weights, TTT off (diagnostic)", "baseline trained without TTT"}
    assert set(result["recall_stream"]) == set(result["recall"])
    assert all(s["documents_per_stream"] == 3 and s["streams"] == 4 for s in result["recall_stream"].values())
    assert (tmp_path / "run" / "recall" / "recall_stream.png").is_file()
    recall = json.loads((tmp_path / "run" / "recall" / "recall.json").read_text())
    assert set(recall) == set(result["recall"])
    assert (tmp_path / "run" / "recall" / "recall.png").is_file()
    assert (tmp_path / "run" / "baseline" / "final" / "model.safetensors").is_file()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "recall/accuracy" in e] == [1, 2]
    out = capsys.readouterr().out
    assert "baseline trained without TTT" in out and "chance 1/56" in out
    assert "recall over streams of 3 documents" in out and "worst mean over 64 frames" in out
    # Documents 1x, 2x and 4x as long, by distance, and the text loss on their filler.
    ttt = result["recall"]["TTT"]
    assert [(k, v["frames"]) for k, v in ttt["by_length"].items()] == [("1x", 64), ("2x", 128), ("4x", 256)]
    assert max(b["hi"] for b in ttt["by_distance_all_lengths"]) > 3 * 64
    assert set(ttt["filler_excess"]) == {"1x", "2x", "4x"} and all(
        e["span"] == 32 for e in ttt["filler_excess"].values())
    assert "held-out recall by distance, documents of every length" in out
    assert "text loss on filler against the baseline's, worst 32-frame window: 1x" in out
    # Streams of documents of 64 to 256 frames, as many frames as the fixed ones (3 x 64).
    varied = result["recall_stream_varied"]
    assert set(varied) == set(result["recall"]) and varied["TTT"]["documents_per_stream"] == 1
    assert (tmp_path / "run" / "recall" / "varied" / "recall_stream.png").is_file()
    assert "baseline trained without TTT" in varied["TTT"]["text_loss_excess"]
    # Resumed when both are finished: nothing trains or evaluates again, the comparison stands.
    capsys.readouterr()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = trainer.train_with_baseline(run, resume=True)
    out = capsys.readouterr().out
    assert out.count("is finished (step 2 of 2)") == 2 and "trained model saved" not in out
    assert_a_runnable_eval_hint(out)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert set(again["recall"]) == set(result["recall"])
    assert set(again["recall_stream"]) == set(result["recall_stream"])
    assert again["recall"]["TTT"]["accuracy"] == result["recall"]["TTT"]["accuracy"]
    with pytest.raises(ValueError, match=r"was started with other settings \(seed: 0 -> 1\)"):
        trainer.train_with_baseline(dataclasses.replace(run, seed=1), resume=True)


def test_eta_warms_up_then_stays(tmp_path):
    assert [trainer.eta_at(0.5, 4, s) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert trainer.eta_at(0.5, 0, 0) == 0.5
    run = config(tmp_path, max_steps=3, ckpt_freq=3, eta_warmup_steps=2)
    train(run)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.get("ttt_eta") for e in logged] == [0.025, 0.05, None]
    from moshi_ttt import load_ttt_lm
    saved = load_ttt_lm(tmp_path / "run" / "final", dtype=torch.float32)
    assert all(layer.eta == 0.05 for _, layer in ttt_layers(saved))


def test_rows_hold_one_synthetic_document_unless_told():
    assert TrainConfig().frames == 4 * TrainConfig().data.synthetic.frames  # the main job: four a row
    one = {"documents_per_row": 1}
    assert TrainConfig.from_dict({"data": {"synthetic": one}}).frames == TrainConfig().data.synthetic.frames
    assert TrainConfig.from_dict({"data": {"synthetic": {"frames": 300}}}).frames == 1200
    assert TrainConfig.from_dict({"data": {"synthetic": {"frames": 300, **one}}}).frames == 300
    assert TrainConfig.from_dict({"duration_sec": 100}).frames == 1250
    assert TrainConfig.from_dict({"seq_frames": 64}).frames == 64
    assert TrainConfig.from_dict({"data": {"source": "codes", "train_data": "x"}}).frames == 256


def test_the_tiny_model_settings_merge_and_stay_with_the_tiny_model():
    assert TrainConfig().tiny == {"context": 16}
    assert TrainConfig.from_dict({"tiny": {"num_layers": 2}}).tiny == {"context": 16, "num_layers": 2}
    assert TrainConfig.from_dict({"model": "runs/x/final"}).tiny == {}
    with pytest.raises(ValueError, match=r"tiny=\{'context': 8\} changes the built-in tiny model"):
        TrainConfig.from_dict({"model": "runs/x/final", "tiny": {"context": 8}})
    with pytest.raises(ValueError, match=r"unknown tiny model key\(s\) \['contxt'\]"):
        TrainConfig.from_dict({"tiny": {"contxt": 8}})


def test_a_checkpoint_starts_from_the_library_defaults_not_the_tiny_recipe():
    config = TrainConfig.from_dict({"model": "kyutai/moshiko-pytorch-bf16", "ttt": {"chunk_size": 256}})
    expected = TTTConfig(chunk_size=256)
    assert config.ttt == expected and config.mode == "ttt_layers" and config.optim.lr == 2e-6
    assert (config.reset_fast_weights, config.stream_from_step, config.frames) == ("document", 0, 160)
    assert TrainConfig.from_dict({"model": "kyutai/moshiko-pytorch-bf16", "mode": "lora"}).mode == "lora"
    tiny = TrainConfig.from_dict({"ttt": {"chunk_size": 16}})
    assert tiny.ttt.layers == TrainConfig().ttt.layers and tiny.mode == "full"


def test_resume_refuses_changed_settings(tmp_path):
    run = config(tmp_path, max_steps=4, ckpt_freq=2)
    train(run, stop_after=2)
    changed = config(tmp_path, max_steps=4, ckpt_freq=2, optim={"lr": 0.01})
    with pytest.raises(ValueError, match=r"--resume: the run in .* was started with other settings "
                                         r"\(optim.lr: 0.001 -> 0.01\)"):
        train(changed, resume=True)
    assert train(config(tmp_path, max_steps=4, ckpt_freq=1, log_freq=2), resume=True)["losses"]


def test_configs_round_trip_through_their_yaml():
    for data in ({}, {"model": "runs/x/final"}, {"model": "runs/x/final", "ttt": {"every": 3}},
                 {"ttt": {"layers": [1, 2]}}, {"tiny": {"num_layers": 2}}, {"optim": {"lr": "2e-4"}}):
        built = TrainConfig.from_dict(data)
        assert TrainConfig.from_dict(yaml.safe_load(built.to_yaml())) == built, data
    direct = TrainConfig(model="runs/x/final")
    assert direct.tiny == {} and TrainConfig.from_dict(yaml.safe_load(direct.to_yaml())).tiny == {}
    with pytest.raises(ValueError, match=r"ttt.layers=\[0\] with ttt.start=0, ttt.every=2"):
        TrainConfig.from_dict({"ttt": {"layers": [0], "every": 2}})
    with pytest.raises(ValueError, match=r"model=None: expected a string"):
        TrainConfig.from_dict({"model": None})


@pytest.fixture
def seen_segments(monkeypatch):
    """The document ids of every training forward, in order (a list the test may clear)."""
    seen = []
    real = trainer.document_segments

    def spy(lm, segments):
        seen.append(segments.clone())
        return real(lm, segments)
    monkeypatch.setattr(trainer, "document_segments", spy)
    return seen


def test_rows_without_reset_share_fast_weights(tmp_path, seen_segments):
    """reset_fast_weights=row: a row's documents reach the TTT layers as one segment; the
    default gives each its own."""
    seen = seen_segments
    for reset, from_step, expected in (("document", 0, [3, 3]), ("row", 0, [1, 1]), ("row", 1, [3, 1])):
        seen.clear()
        train(config(tmp_path, f"{reset}-{from_step}", max_steps=2, ckpt_freq=2, do_eval=False, seq_frames=160,
                     reset_fast_weights=reset, stream_from_step=from_step))
        # 160 frames a row: pieces of 64, 64 and 32 frames.
        assert [max(int(row.unique().numel()) for row in step) for step in seen] == expected


def test_documents_of_varied_length():
    from moshi_ttt.data.synthetic import SyntheticDocuments
    docs = SyntheticDocuments(32, 64, 3, num_codebooks=5, dep_q=2, card=64, text_card=120, text_padding_id=3,
                              spacing=8, max_frames=96)
    lengths = [docs.num_frames(i) for i in range(32)]
    assert min(lengths) >= 64 and max(lengths) <= 96 and len(set(lengths)) > 5
    for i in range(32):
        codes, facts = docs[i], docs.facts(i)
        assert codes.shape[1] == lengths[i]
        assert max(f.answer_frame for f in facts) == lengths[i] - 1  # the last answer is the last frame
        for f in facts:
            assert codes[0, f.answer_frame] == f.value and codes[0, f.answer_frame - 1] == f.key
    same = SyntheticDocuments(32, 64, 3, num_codebooks=5, dep_q=2, card=64, text_card=120, text_padding_id=3,
                              spacing=8)
    assert all(same.num_frames(i) == 64 for i in range(32))


def test_documents_of_varied_length_from_a_step_on_also_after_a_resume(tmp_path, seen_segments):
    """varied_from_step: the rows of earlier steps hold documents of `frames` only (whole, so a
    row of 96 frames is one of 64 and padding); from that step on, of 64..96 frames, as after
    a resume from a checkpoint before or after it."""
    seen = seen_segments
    synthetic = dict(SMALL["data"]["synthetic"], max_frames=96, varied_from_step=3)

    def first_pieces(step_segments):  # frames of each row's first document
        return [int((row == row[0]).sum()) for row in step_segments]
    run = config(tmp_path, max_steps=6, ckpt_freq=2, do_eval=False, data={"synthetic": synthetic})
    train(run)
    straight = [first_pieces(step) for step in seen]
    assert all(n == 64 for step in straight[:3] for n in step)
    assert any(n != 64 for step in straight[3:] for n in step)
    for stop in (2, 4):
        seen.clear()
        resumed = config(tmp_path, f"resumed-{stop}", max_steps=6, ckpt_freq=2, do_eval=False,
                         data={"synthetic": synthetic})
        train(resumed, stop_after=stop)
        train(resumed, resume=True)
        assert [first_pieces(step) for step in seen] == straight
    with pytest.raises(ValueError, match=r"data.synthetic.varied_from_step=-1: expected an integer >= 0"):
        config(tmp_path, data={"synthetic": dict(synthetic, varied_from_step=-1)})


def test_sigint_finishes_the_step_writes_a_checkpoint_and_resume_continues(tmp_path, monkeypatch, capsys):
    import signal
    whole = train(config(tmp_path, "whole", ckpt_freq=100))["losses"]
    real_step = trainer._train_step
    calls = []

    def interrupted_at_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step still ends
        return real_step(*args, **kwargs)
    monkeypatch.setattr(trainer, "_train_step", interrupted_at_three)
    with pytest.raises(SystemExit) as stopped:
        train(config(tmp_path, "split", ckpt_freq=100))
    assert stopped.value.code == 128 + signal.SIGINT
    assert "SIGINT: stopped after step 3 of 8" in capsys.readouterr().out
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "split")] == ["step_000003"]
    assert (tmp_path / "split" / "losses.png").is_file()
    monkeypatch.setattr(trainer, "_train_step", real_step)
    rest = train(config(tmp_path, "split", ckpt_freq=100), resume=True)["losses"]
    assert list(logged_losses(tmp_path / "split").values()) == whole and len(rest) == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_ctrl_c_in_the_final_evaluation_keeps_the_model_and_says_how_to_score_it(tmp_path, monkeypatch, capsys):
    import signal

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer.RecallProbe, "final", interrupted)
    with pytest.raises(SystemExit) as stopped:
        train(config(tmp_path, max_steps=2, ckpt_freq=2))
    assert stopped.value.code == 128 + signal.SIGINT
    out = capsys.readouterr().out
    assert f"SIGINT during the final evaluation: the trained model is in {tmp_path / 'run' / 'final'}" in out
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert_a_runnable_eval_hint(out)


def assert_a_runnable_eval_hint(printed: str) -> None:
    """The `moshi-ttt eval ...` the trainer suggests parses, and its --out can take the results."""
    import shlex
    from moshi_ttt.eval.command import _unusable_output, eval_parser
    hint = printed[printed.index("`moshi-ttt eval"):].split("`")[1]
    args = eval_parser().parse_args(shlex.split(hint)[2:])
    assert args.recall and Path(args.model[0]).is_dir() and _unusable_output(args.out, overwrite=False) is None


def test_a_used_run_dir_is_never_clobbered(tmp_path):
    import hashlib
    run = config(tmp_path, max_steps=2, ckpt_freq=1, keep_last=1)
    train(run)

    def hashes():
        return {str(p.relative_to(tmp_path)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}
    before = hashes()
    with pytest.raises(ValueError, match=r"run_dir=.* already holds a run .*continue it with --resume"):
        train(run)
    assert hashes() == before
    again = config(tmp_path, max_steps=1, ckpt_freq=1, overwrite_run_dir=True)
    train(again)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "run")] == ["step_000001"]


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    run_dir = tmp_path / "run"
    lm = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(lm.parameters())
    for step in (70, 60):  # an older run's later checkpoint is still there
        checkpointing.save_checkpoint(run_dir, step, lm, optimizer, {"step": step}, "", keep_last=2)
    checkpointing.save_checkpoint(run_dir, 10, lm, optimizer, {"step": 10}, "", keep_last=2)
    assert [p.name for p in checkpointing.list_checkpoints(run_dir)] == ["step_000010", "step_000070"]
    checkpointing.save_checkpoint(run_dir, 20, lm, optimizer, {"step": 20}, "", keep_last=1)
    assert [p.name for p in checkpointing.list_checkpoints(run_dir)] == ["step_000020"]


def test_a_trained_model_points_to_the_mimi_and_tokenizer_it_was_trained_with(tmp_path):
    """final/ of a run from a checkpoint with Mimi and a tokenizer serves and evaluates as it is."""
    from assets import write_plain_checkpoint
    from moshi_ttt.data.tokenize import AudioTokenizer
    from moshi_ttt.models import checkpoint_info
    source = write_plain_checkpoint(tmp_path / "plain", with_assets=True)
    run = config(tmp_path, model=str(source), mode="ttt", max_steps=1, ckpt_freq=1, tiny={})
    train(run)
    final = tmp_path / "run" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "ttt.safetensors"]
    info = checkpoint_info(final)
    assert info.mimi_weights == (source / "mimi.safetensors").absolute()
    assert info.tokenizer == (source / "tokenizer.model").absolute()
    tokenizer = AudioTokenizer.from_checkpoint_info(info, device="cpu")
    codes = tokenizer.encode(torch.zeros(1, 24000).numpy())
    assert codes.shape[0] == 5 and codes.shape[1] >= 12
    import numpy as np
    import sphn
    from moshi_ttt.eval.command import eval_command
    (tmp_path / "long").mkdir()
    sphn.write_wav(str(tmp_path / "long" / "a.wav"), np.random.default_rng(0).normal(0, 0.1, (1, 48000)).astype(
        np.float32), 24000)
    results = eval_command(["--model", str(final), "--long-audio", str(tmp_path / "long"), "--out",
                            str(tmp_path / "eval"), "--device", "cpu", "--dtype", "float32", "--no-ttt-off"])
    assert results["long_context"]["summary"]["ttt"]["documents"] == 1


def test_a_ttt_section_with_a_ttt_model_is_applied_or_refused(tmp_path):
    """Continuing a saved TTT model: its settings are the defaults, eta/forget/... apply, and a
    change of its structure is an error naming the field."""
    train(config(tmp_path, "first", max_steps=1, ckpt_freq=1))
    saved = tmp_path / "first" / "final"
    kept = TrainConfig.from_dict({"model": str(saved)})
    assert kept.ttt == TTTConfig.from_dict(json.loads((saved / "config.json").read_text())["ttt"])
    retuned = config(tmp_path, "second", model=str(saved), mode="ttt", max_steps=1, ckpt_freq=1, tiny={},
                     ttt={"eta": 0.2, "forget": 0.9})
    assert (retuned.ttt.eta, retuned.ttt.forget, retuned.ttt.every) == (0.2, 0.9, 2)
    train(retuned)
    written = json.loads((tmp_path / "second" / "final" / "config.json").read_text())["ttt"]
    assert (written["eta"], written["forget"], written["every"]) == (0.2, 0.9, 2)
    structural = config(tmp_path, "third", model=str(saved), mode="ttt", max_steps=1, ckpt_freq=1, tiny={},
                        ttt={"x0_source": "input"})
    with pytest.raises(ValueError, match=r"structure cannot change \(ttt.x0_source: 'text' -> 'input'\)"):
        train(structural)


def test_gradient_checkpointing_recomputes_the_depformer_too(tmp_path):
    """As moshi's LMModel(gradient_checkpointing=True): both transformers, the same gradients."""
    grads = []
    for enabled in (False, True):
        lm = trainer.build_model(config(tmp_path, gradient_checkpointing=enabled), torch.device("cpu"))
        assert lm.transformer.checkpointing is enabled and lm.depformer.checkpointing is enabled
        codes = torch.randint(0, 32, (2, lm.num_codebooks, 40))
        out = lm(codes)
        (out.logits.nan_to_num().square().mean() + out.text_logits.nan_to_num().square().mean()).backward()
        grads.append({n: p.grad for n, p in lm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("depformer.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
