"""FSDP2 under torchrun (two CPU processes, gloo): the same steps as one process, exact
resume from sharded checkpoints, a consolidated final model, validation across shards."""

import copy
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from moshi.models import loaders
from safetensors.torch import load_file

from moshi_ttt import TTTConfig, build_lm, load_ttt_lm, tiny_lm_config
from moshi_ttt.train import TrainConfig, train
from moshi_ttt.train import checkpointing, trainer
from moshi_ttt.train.fsdp import SHARDED_DIR

from helpers import torchrun_train
from test_train import config

# Each run: what it changes in test_train's SMALL config. The two-process runs take half
# the rows per process, so their global batch is the single run's.
RUNS = {
    # held-out code files of 5 rows: the two processes score 3 and 2 (one padded forward)
    "ttt_layers": {"mode": "ttt_layers", "eval_freq": 2, "seq_frames": 64},
    # micro-batches (FSDP reduces each one's gradients), activation checkpointing, the recall probe
    "lora": {"mode": "lora", "lora": {"rank": 4}, "save_adapters": True, "num_microbatches": 2,
             "gradient_checkpointing": True, "eval_freq": 3, "max_steps": 6},
    "ttt_mlp": {"mode": "ttt", "ttt": {"method": "ttt_mlp", "layers": [1], "mini_batch": 16}, "do_eval": False},
    "full": {"mode": "full", "do_eval": False},
}
MAX_STEPS = 4


def write_codes(directory: Path, documents: int, frames: int, seed: int) -> Path:
    """Random code files for the tiny model: documents of `frames` frames."""
    lm = build_lm(tiny_lm_config())
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    for i in range(documents):
        codes = rng.integers(0, min(lm.card, lm.text_card), size=(lm.num_codebooks, frames))
        np.save(directory / f"doc_{i:02d}.npy", codes.astype(np.int64))
    return directory


def run_config(root: Path, name: str, run: str, **overrides) -> TrainConfig:
    settings = {"max_steps": MAX_STEPS, "ckpt_freq": 2, "keep_last": 10, "eval_stream_documents": 0,
                **RUNS[run], **overrides}
    if run == "ttt_layers":
        settings["data"] = {"source": "codes", "train_data": str(root / "codes" / "train"),
                            "eval_data": str(root / "codes" / "held_out")}
    return config(root, name, **settings)


def torchrun(root: Path, run_config: TrainConfig, *arguments: str, check: bool = True
             ) -> subprocess.CompletedProcess:
    path = root / f"{Path(run_config.run_dir).name}.yaml"
    path.write_text(run_config.to_yaml())
    return torchrun_train(path, *arguments, check=check)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every run of RUNS on one process and on two with FSDP; and lora on two stopped at step
    3, then resumed with FSDP (keeping 2 checkpoints) and, from a copy, with DDP."""
    root = tmp_path_factory.mktemp("fsdp")
    write_codes(root / "codes" / "train", documents=8, frames=160, seed=0)
    write_codes(root / "codes" / "held_out", documents=1, frames=5 * 64, seed=1)
    for run in RUNS:
        train(run_config(root, f"{run}-single", run))
        torchrun(root, run_config(root, f"{run}-fsdp", run, batch_size=1, device="cpu"))
    split = run_config(root, "lora-split", "lora", batch_size=1, device="cpu", keep_last=2)
    torchrun(root, split, "--stop-after", "3")
    shutil.copytree(split.run_dir, root / "lora-ddp")
    torchrun(root, split, "--resume")
    torchrun(root, run_config(root, "lora-ddp", "lora", batch_size=1, device="cpu", keep_last=2,
                              distributed="ddp"), "--resume")
    return root


def logged(run_dir: Path) -> dict[int, dict[str, float]]:
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def trained(checkpoint: Path, run: TrainConfig) -> dict[str, torch.Tensor]:
    """What trained, from a checkpoint of either kind (a sharded one read on this one process)."""
    lm, _ = trainer.prepare_model(run, torch.device("cpu"))
    checkpointing.load_checkpoint(checkpoint, lm)
    return {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("run", list(RUNS))
def test_two_sharded_processes_take_the_same_steps_as_one(runs, run):
    one, two = logged(runs / f"{run}-single"), logged(runs / f"{run}-fsdp")
    assert one.keys() == two.keys()
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5)
        # The norms of the whole gradients, not of one process's shards; above max_norm, so clipped.
        norms = {k for k in one[step] if k.startswith("grad_norm/")}
        assert norms and norms == {k for k in two[step] if k.startswith("grad_norm/")}
        for name in norms:
            assert two[step][name] == pytest.approx(one[step][name], rel=1e-4)
        assert sum(one[step][n] ** 2 for n in norms) > 1.0
    config_one = TrainConfig.load(runs / f"{run}-single" / "config.yaml")
    checkpoints = runs / f"{run}-fsdp" / "checkpoints"
    steps = [p.name for p in checkpointing.list_checkpoints(runs / f"{run}-fsdp")]
    last = steps[-1]
    assert (checkpoints / last / SHARDED_DIR).is_dir() and not (checkpoints / last / "trainable.safetensors").exists()
    a = trained(runs / f"{run}-single" / "checkpoints" / last, config_one)
    b = trained(checkpoints / last, config_one)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=5e-5)  # Adam, lr 1e-3


def test_validation_across_shards_equals_one_process(runs):
    one, two = logged(runs / "ttt_layers-single"), logged(runs / "ttt_layers-fsdp")
    evaluated = [step for step in one if "eval/loss" in one[step]]
    assert evaluated == [2, 4] and [step for step in two if "eval/loss" in two[step]] == evaluated
    for step in evaluated:
        for name in ("eval/loss", "eval/text_loss", "eval/audio_loss", "eval_ttt_off/loss"):
            assert two[step][name] == pytest.approx(one[step][name], rel=1e-5)


def test_the_recall_probe_runs_on_every_shard(runs):
    one, two = logged(runs / "lora-single"), logged(runs / "lora-fsdp")
    assert [s for s in two if "recall/accuracy" in two[s]] == [3, 6]
    for step in (3, 6):
        assert two[step]["recall/cross_entropy"] == pytest.approx(one[step]["recall/cross_entropy"], rel=1e-4)


def test_resume_under_fsdp_reproduces_the_uninterrupted_run(runs):
    whole, split = logged(runs / "lora-fsdp"), logged(runs / "lora-split")
    assert sorted(whole) == sorted(split) == list(range(1, 7))
    assert [whole[s]["loss"] for s in sorted(whole)] == [split[s]["loss"] for s in sorted(split)]
    run = TrainConfig.load(runs / "lora-fsdp" / "config.yaml")
    a = trained(runs / "lora-fsdp" / "checkpoints" / "step_000006", run)
    b = trained(runs / "lora-split" / "checkpoints" / "step_000006", run)
    assert a and a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # keep_last 2 pruned the sharded checkpoints; no temporary directory stayed behind.
    assert sorted(p.name for p in (runs / "lora-split" / "checkpoints").iterdir()) == ["step_000004", "step_000006"]


def test_a_sharded_checkpoint_resumes_under_ddp(runs):
    """The model's and the optimizer's shards load into whole copies."""
    whole, resumed = logged(runs / "lora-fsdp"), logged(runs / "lora-ddp")
    assert sorted(whole) == sorted(resumed) == list(range(1, 7))
    for step in whole:
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-5)
    assert (runs / "lora-ddp" / "checkpoints" / "step_000006" / "trainable.safetensors").is_file()


@pytest.mark.parametrize("run", ["ttt_layers", "ttt_mlp", "full"])
def test_the_consolidated_final_model_is_the_trained_one(runs, run):
    final = runs / f"{run}-fsdp" / "final"
    config_two = TrainConfig.load(runs / f"{run}-fsdp" / "config.yaml")
    lm = load_ttt_lm(final, dtype=torch.float32)
    params = dict(lm.named_parameters())
    last = checkpointing.list_checkpoints(runs / f"{run}-fsdp")[-1]
    for name, value in trained(last, config_two).items():
        assert torch.equal(params[name], value), name
    start, _ = trainer.prepare_model(config_two, torch.device("cpu"))
    for name, value in start.named_parameters():
        if not value.requires_grad:
            assert torch.equal(params[name], value), name
    # moshi's own loader reads the plain weights (TTT's own parameters are in ttt.safetensors).
    plain = loaders.get_moshi_lm(str(final / "model.safetensors"), lm_kwargs=tiny_lm_config(),
                                 device="cpu", dtype=torch.float32)
    for name, value in plain.state_dict().items():
        assert torch.equal(lm.state_dict()[name], value), name


def test_the_consolidated_adapters_are_the_trained_ones(runs):
    adapters = load_file(str(runs / "lora-fsdp" / "final" / "lora.safetensors"))
    run = TrainConfig.load(runs / "lora-fsdp" / "config.yaml")
    last = trained(runs / "lora-fsdp" / "checkpoints" / "step_000006", run)
    assert adapters.keys() == last.keys()
    assert all(torch.equal(adapters[n], last[n].to(adapters[n].dtype)) for n in last)  # in the param dtype


def test_a_ddp_run_resumes_under_ddp_and_not_under_fsdp(runs, tmp_path):
    """`auto` keeps the strategy a resumed run's checkpoints were written with."""
    ddp = run_config(tmp_path, "ddp", "ttt_mlp", batch_size=1, device="cpu", distributed="ddp")
    torchrun(tmp_path, ddp, "--stop-after", "2")
    assert (Path(ddp.run_dir) / "checkpoints" / "step_000002" / "trainable.safetensors").is_file()
    refused = torchrun(tmp_path, run_config(tmp_path, "ddp", "ttt_mlp", batch_size=1, device="cpu",
                                            distributed="fsdp"), "--resume", check=False)
    assert refused.returncode != 0
    assert "written by a run without FSDP (trainable.safetensors); resume it with distributed: ddp" in refused.stderr
    torchrun(tmp_path, run_config(tmp_path, "ddp", "ttt_mlp", batch_size=1, device="cpu"), "--resume")
    one, resumed = logged(runs / "ttt_mlp-single"), logged(Path(ddp.run_dir))
    assert sorted(one) == sorted(resumed)
    for step in one:
        assert resumed[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5)


def test_ttt_layers_keep_moshi_s_fsdp_contract():
    """moshi marks the modules that are FSDP units, or lie whole inside one, with `_fsdp_final`."""
    lm = build_lm(tiny_lm_config(), [TTTConfig(layers=[0]), TTTConfig(method="ttt_mlp", layers=[1])])
    assert lm.transformer.layers[0].gating._fsdp_final and lm.transformer.layers[1].ttt_mlp._fsdp_final
    assert lm.transformer.layers[2].gating._fsdp_final  # moshi's own


def test_moshi_modules_take_fsdp_classes_that_shadow_none_of_its_methods():
    """The class swap of `fsdp._allow_class_swap`: moshi's classes define none of FSDPModule's
    methods (they come first in the lookup), FSDPModule.__new__ finds the module's class at
    __mro__[2], and deepcopy is refused."""
    from moshi.models.lm import LMModel
    from moshi.modules.transformer import StreamingTransformerLayer
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fully_shard import cls_to_fsdp_cls
    from moshi_ttt.train.fsdp import _allow_class_swap
    for cls in (StreamingTransformerLayer, LMModel):
        _allow_class_swap(cls)
        swapped = cls_to_fsdp_cls[cls]
        assert swapped.__mro__[2] is cls
        for name, value in vars(FSDPModule).items():
            if callable(value) and name != "__new__":
                assert getattr(swapped, name) is value, (cls.__name__, name)
    layer = build_lm(tiny_lm_config()).transformer.layers[0]
    layer.__class__ = swapped  # what fully_shard does; CPython refuses torch's own class here
    assert isinstance(layer, FSDPModule)
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        copy.deepcopy(layer)


def test_a_failed_write_on_the_main_process_stops_every_process():
    """The others do not wait at a barrier for a checkpoint that will never come."""
    class OtherProcess:
        is_main, device = False, torch.device("cpu")

        def all_reduce_max(self, tensor):
            return tensor.fill_(1.0)  # what the main process reports after its error
    with pytest.raises(RuntimeError, match="the main process failed to write the checkpoint"):
        checkpointing._on_main_for_all(OtherProcess(), lambda: None)


def test_replacing_a_checkpoint_puts_the_old_one_back_when_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    from moshi_ttt.utils import atomic
    old, new = tmp_path / "step_000004", tmp_path / ".step_000004.tmp"
    for directory, text in ((old, "old"), (new, "new")):
        directory.mkdir()
        (directory / "trainable").write_text(text)
    real = atomic.os.replace

    def failing(source, destination):
        if Path(source) == new:
            raise OSError("no space left on device")
        real(source, destination)
    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError, match="no space left"):
        atomic.replace_dir(new, old)
    assert (old / "trainable").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_000004.tmp", "step_000004"]
