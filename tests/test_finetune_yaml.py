"""moshi-finetune's own example YAML (tests/data/moshi_finetune_7B.yaml, from kyutai-labs/
moshi-finetune's example/moshi_7B.yaml, unchanged) reads as the run it describes there."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from moshi_ttt.train import TrainConfig, train

EXAMPLE = yaml.safe_load((Path(__file__).parent / "data" / "moshi_finetune_7B.yaml").read_text())


def filled(tmp_path, model, data, **change):
    """The example with its paths filled in, as its comments ask (`# Fill`), and `change` on top."""
    config = json.loads(json.dumps(EXAMPLE))
    config["data"]["train_data"] = str(data / "train.jsonl")
    config["run_dir"] = str(tmp_path / "run")
    config["moshi_paths"] = {"hf_repo_id": None, "moshi_path": str(model / "model.safetensors"),
                             "config_path": str(model / "config.json"),
                             "mimi_path": str(model / "mimi.safetensors"),
                             "tokenizer_path": str(model / "tokenizer.model")}
    for key, value in change.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def test_the_example_means_the_same_run(tmp_path, finetune_data):
    model, data = finetune_data
    config = TrainConfig.from_dict(filled(tmp_path, model, data))
    assert (config.model, config.moshi_weights, config.config_path) == (
        str(model), str(model / "model.safetensors"), str(model / "config.json"))
    assert (config.data.mimi_weights, config.data.tokenizer) == (
        str(model / "mimi.safetensors"), str(model / "tokenizer.model"))
    assert (config.data.source, config.data.train_data, config.data.shuffle) == (
        "finetune", str(data / "train.jsonl"), True)
    assert (config.mode, config.lora.rank, config.lora.scaling, config.lora.ft_embed) == ("lora", 128, 2.0, False)
    assert (config.first_codebook_weight_multiplier, config.text_padding_weight) == (100.0, 0.5)
    assert (config.duration_sec, config.frames, config.batch_size, config.max_steps) == (100, 1250, 16, 2000)
    assert config.gradient_checkpointing and config.bf16
    assert (config.optim.lr, config.optim.weight_decay, config.optim.pct_start) == (2e-6, 0.1, 0.05)
    assert (config.seed, config.log_freq, config.eval_freq, config.do_eval) == (0, 1, 100, False)
    assert (config.do_ckpt, config.ckpt_freq, config.keep_last, config.save_adapters) == (True, 100, 3, True)
    assert config.data.eval_data is None  # the example's '': no validation set
    unfilled = json.loads(json.dumps(EXAMPLE))
    unfilled["data"]["train_data"], unfilled["run_dir"] = "data.jsonl", "runs/x"
    assert TrainConfig.from_dict(unfilled).model == "kyutai/moshiko-pytorch-bf16"


def test_what_a_moshi_finetune_config_leaves_out_takes_its_defaults():
    config = TrainConfig.from_dict({"lora": {"enable": True}, "data": {"train_data": "d.jsonl"}, "run_dir": "r"})
    assert config.model == "kyutai/moshiko-pytorch-bf16" and config.mode == "lora"
    assert (config.lora.rank, config.optim.lr, config.max_steps, config.batch_size, config.duration_sec) == (
        64, 1e-4, 100, 1, 10)
    assert (config.ckpt_freq, config.keep_last, config.save_adapters, config.do_eval) == (10 ** 9, 3, True, False)
    assert (config.gradient_checkpointing, config.log_freq, config.data.shuffle) == (True, 1, False)
    assert config.first_codebook_weight_multiplier == 1.0
    ours = TrainConfig.from_dict({"model": "a/b", "mode": "ttt", "num_ckpt_keep": 2, "seq_frames": 64,
                                  "data": {"source": "codes", "train_data": "codes/"}})
    assert (ours.model, ours.mode, ours.keep_last, ours.seq_frames, ours.duration_sec) == ("a/b", "ttt", 2, 64, None)


def test_the_example_trains(tmp_path, finetune_data):
    """Two steps of it on a tiny checkpoint (its sizes made small); what trained saved alone beside the model."""
    model, data = finetune_data
    config = TrainConfig.from_dict(filled(tmp_path, model, data, duration_sec=2.4, batch_size=2, max_steps=2,
                                          ckpt_freq=0, ttt={"every": 2, "chunk_size": 8},
                                          lora={"rank": 4, "ft_embed": True}))
    assert (config.ckpt_freq, config.lora.ft_embed) == (10 ** 9, True)
    result = train(config)
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    assert result["trainable"]["other"] > 0  # the embeddings (ft_embed)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_000002"]  # ckpt_freq 0: only the last
    from safetensors.torch import load_file
    adapters = load_file(str(tmp_path / "run" / "final" / "lora.safetensors"))
    assert any(".lora_A." in k for k in adapters) and any(".ttt_target." in k for k in adapters)
    assert any(k.startswith("emb.") for k in adapters)  # what trained, unmerged: adapters, TTT, embeddings
    assert not any("frozen_W" in k for k in adapters)
    from moshi_ttt import load_ttt_lm
    load_ttt_lm(tmp_path / "run" / "final")


@pytest.mark.parametrize("change,match", [
    ({"full_finetuning": True}, "full_finetuning: true with lora.enable: true: choose one"),
    ({"lora": {"enable": False}}, "full_finetuning: false and lora.enable: false: nothing would train"),
    ({"mode": "ttt"}, "mode and full_finetuning / lora.enable both say what trains"),
    ({"model": "tiny"}, "model and moshi_paths both say which checkpoint"),
    ({"data": {"mimi_weights": "m.safetensors"}}, "moshi_paths.mimi_path and data.mimi_weights both name"),
    ({"wandb": {"project": ""}}, "wandb.project='': expected a project name"),
    ({"param_dtype": "float16"}, "param_dtype='float16': expected 'bfloat16'"),
    ({"run_dir": ""}, "run_dir is empty"),
    ({"moshi_paths": {"hf_repo": "x/y"}}, r"unknown moshi_paths key\(s\) \['hf_repo'\]"),
    ({"num_ckpt_keep": 2, "keep_last": 2}, "num_ckpt_keep and keep_last both"),
])
def test_what_cannot_apply_is_an_error(tmp_path, finetune_data, change, match):
    model, data = finetune_data
    config = filled(tmp_path, model, data)
    for key, value in change.items():
        replaces = key == "moshi_paths" or not isinstance(value, dict)
        config[key] = value if replaces else {**config.get(key, {}), **value}
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(config)


class FakeWandb:
    """What a run asks of the wandb module: login, init, log, finish (the real one is an extra)."""

    def __init__(self):
        self.calls = []

    def login(self, key):
        self.calls.append(("login", key))

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, metrics, step):
        self.calls.append(("log", step, dict(metrics)))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_as_moshi_finetune_configures_it(tmp_path, finetune_data, monkeypatch):
    import sys
    model, data = finetune_data
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = TrainConfig.from_dict(filled(tmp_path, model, data, duration_sec=2.4, batch_size=2, max_steps=2,
                                          ttt={"every": 2, "chunk_size": 8}, lora={"rank": 4},
                                          wandb={"project": "moshi", "run_name": "r", "key": "k", "offline": True}))
    train(config)
    assert fake.calls[0] == ("login", "k")
    name, init = fake.calls[1]
    assert (init["project"], init["name"], init["mode"], init["dir"]) == ("moshi", "r", "offline",
                                                                        str(tmp_path / "run"))
    assert init["config"]["mode"] == "lora"
    logged = [c for c in fake.calls if c[0] == "log"]
    assert [c[1] for c in logged] == [1, 2] and all("loss" in c[2] for c in logged)
    assert fake.calls[-1] == ("finish",)


def test_wandb_not_installed_is_said_before_the_model_loads(tmp_path, finetune_data, monkeypatch):
    import sys
    model, data = finetune_data
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    config = TrainConfig.from_dict(filled(tmp_path, model, data, wandb={"project": "moshi"}))
    with pytest.raises(ValueError, match=r"wandb is not installed: pip install 'moshi-ttt\[wandb\]'"):
        train(config)


def test_a_config_of_this_package_is_never_read_as_moshi_finetunes():
    from moshi_ttt.train.finetune_yaml import uses_finetune_vocabulary
    assert not uses_finetune_vocabulary(TrainConfig().to_dict())
    assert not uses_finetune_vocabulary(TrainConfig.from_dict({"model": "x/y", "save_adapters": True}).to_dict())


def test_local_weights_under_another_name(tmp_path, finetune_data):
    """moshi-finetune writes consolidated.safetensors: moshi_path names it, every loader reads it."""
    model, data = finetune_data
    (model / "model.safetensors").rename(model / "consolidated.safetensors")
    config = filled(tmp_path, model, data, duration_sec=2.4, batch_size=2, max_steps=1,
                    ttt={"every": 2, "chunk_size": 8}, lora={"rank": 4})
    config["moshi_paths"]["moshi_path"] = str(model / "consolidated.safetensors")
    assert len(train(TrainConfig.from_dict(config))["losses"]) == 1


def test_missing_data_is_named_before_the_model_loads(tmp_path, monkeypatch):
    """The example as given (the hub's 7B model) with a train_data that is not there: one line
    naming the data, before any download and with nothing written."""
    from moshi_ttt.train import trainer
    monkeypatch.setattr(trainer, "prepare_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = json.loads(json.dumps(EXAMPLE))
    config["data"]["train_data"] = str(tmp_path / "missing.jsonl")
    config["run_dir"] = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"data.train_data='.*missing.jsonl': expected a .jsonl file "
                                                r"\(data.source='finetune'\); not found"):
        train(TrainConfig.from_dict(config))
    assert not (tmp_path / "run").exists()
