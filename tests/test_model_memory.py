"""bench/model_memory.py's memory plan: what it counts, measured on a tiny model on the meta device."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moshi_ttt import TTTConfig, build_lm, tiny_lm_config
from moshi_ttt.train.modes import apply_mode
from moshi_ttt.train.trainer import set_gradient_checkpointing

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import model_memory  # noqa: E402


def tiny_on_meta(mode: str):
    lm = build_lm(tiny_lm_config(), TTTConfig(layers=[0], chunk_size=8), device="meta", dtype=torch.bfloat16)
    apply_mode(lm, mode, lora_rank=4)
    return lm.train()


def test_the_static_counts_cover_every_parameter_once():
    lm = tiny_on_meta("ttt_layers")
    counts = model_memory.static_counts(lm)
    assert counts["frozen"] + counts["trained"] == sum(p.numel() for p in lm.parameters())
    assert counts["trained"] == sum(p.numel() for p in lm.transformer.layers[0].parameters())
    layers = list(lm.transformer.layers) + list(lm.depformer.layers)
    assert counts["unit"] == max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    assert counts["root"] == sum(p.numel() for p in lm.parameters()) - sum(
        p.numel() for layer in layers for p in layer.parameters())


def test_activations_grow_with_the_row_and_shrink_with_checkpointing():
    lm = tiny_on_meta("full")
    short, long = model_memory.activation_gib(lm, 64), model_memory.activation_gib(lm, 256)
    set_gradient_checkpointing(lm, True)
    recomputed = model_memory.activation_gib(lm, 256)
    assert 0 < short < long and 0 < recomputed < long / 2
    assert all(p.grad is not None for p in lm.parameters())  # the step's backward reached every parameter


def test_the_per_gpu_formula():
    counts = {"frozen": 10 * 2**30, "trained": 2**30, "unit": 2**29, "unit_trained": 2**27,
              "root": 2**28, "root_trained": 0}
    # DDP: 2 bytes a frozen parameter; 4 master + 4 gradient + 8 Adam + 2 autocast copy a trained one,
    # + 4 for the gradient bucket on many GPUs.
    assert model_memory.per_gpu_gib(counts, 3.0, 2, "ddp", 1) == pytest.approx(20 + 18 + 2 * 3.0)
    assert model_memory.per_gpu_gib(counts, 3.0, 2, "ddp", 8) == pytest.approx(20 + 22 + 2 * 3.0)
    # FSDP: everything / N, plus the root and two layer units gathered in bf16 with 6 bytes a trained gradient.
    gathered = 2 * (0.25 + 2 * 0.5) + 6 * (2 * 0.125)
    assert model_memory.per_gpu_gib(counts, 3.0, 2, "fsdp", 8) == pytest.approx((20 + 16) / 8 + gathered + 2 * 3.0)


def test_a_plan_from_saved_measurements(tmp_path):
    entry = {"frozen": 7e9, "trained": 1e8, "unit": 2e8, "unit_trained": 1e7, "root": 4e8, "root_trained": 0}
    measured = [{"model": "ttt", "mode": mode, "checkpointing": ckpt, "T": T, "activations_gib": 1.0, **entry}
                for mode in model_memory.MODES for ckpt in (False, True) for T in (1250, 3072)]
    (tmp_path / "in.json").write_text(json.dumps({"measured": measured}))
    out = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, str(BENCH / "model_memory.py"), "--measured", str(tmp_path / "in.json"),
                           "--gpus", "1", "4", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(out.read_text())["plan"]
    assert len(plan) == len(measured) * 3  # one GPU, 4 with DDP, 4 with FSDP
    assert out.with_suffix(".png").is_file()
    at_1250 = [p for p in plan if p["T"] == 1250 and p["gpus"] == 4]
    assert {p["rows_per_gpu"] for p in at_1250} == {4}
    assert "| 1250 | 16 / GPUs | full | no |" in done.stdout
