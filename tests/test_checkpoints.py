"""Loading plain Moshi checkpoints into TTT models, saving and reloading TTT models."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from assets import write_plain_checkpoint
from moshi_ttt import (TTTConfig, build_lm, load_ttt_lm, load_ttt_weights, save_ttt_lm, save_ttt_weights,
                       tiny_lm_config)
from moshi_ttt.models import checkpoints

TTT = TTTConfig(every=2, chunk_size=8, init="normal", init_std=0.1, eta=0.1, clip_tau=1.0)


def codes_for(lm, length=30):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, lm.card, (2, lm.num_codebooks, length), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (2, length), generator=g)
    return codes


def outputs(lm, codes):
    out = lm(codes)
    return torch.cat([out.text_logits.nan_to_num().flatten(), out.logits.nan_to_num().flatten()])


def test_plain_checkpoint_loads_with_only_ttt_keys_new(tmp_path):
    directory = write_plain_checkpoint(tmp_path / "plain")
    plain_state = load_file(str(directory / "model.safetensors"))
    lm = load_ttt_lm(directory, TTT, dtype=torch.float32)
    state = lm.state_dict()
    new = sorted(set(state) - set(plain_state))
    assert set(plain_state) <= set(state)
    assert new == [f"transformer.layers.{i}.gating.ttt_target.{p}" for i in (0, 2) for p in ("conv", "proj.weight")]
    for key, value in plain_state.items():
        assert torch.equal(state[key], value), key
    assert lm.ttt_config == TTT


def test_save_and_load_model_directory(tmp_path):
    lm = load_ttt_lm(write_plain_checkpoint(tmp_path / "plain"), TTT, dtype=torch.float32)
    with torch.no_grad():  # make the TTT parameters differ from any init
        for name, p in lm.named_parameters():
            if "ttt_target" in name:
                p.add_(torch.randn_like(p) * 0.01)
    save_ttt_lm(lm, tmp_path / "ttt")
    files = sorted(p.name for p in (tmp_path / "ttt").iterdir())
    assert files == ["config.json", "model.safetensors", "ttt.safetensors"]
    config = json.loads((tmp_path / "ttt" / "config.json").read_text())
    assert TTTConfig.from_dict(config["ttt"]) == TTT
    reloaded = load_ttt_lm(tmp_path / "ttt", dtype=torch.float32)
    codes = codes_for(lm)
    assert torch.equal(outputs(reloaded, codes), outputs(lm, codes))
    assert reloaded.ttt_config == TTT
    # The plain part stays a Moshi checkpoint that moshi's own loader reads.
    plain = load_file(str(tmp_path / "ttt" / "model.safetensors"))
    assert not [k for k in plain if "ttt" in k]


def test_saving_again_replaces_the_directory(tmp_path):
    lm = build_lm(tiny_lm_config(), TTT)
    save_ttt_lm(lm, tmp_path / "ttt")
    (tmp_path / "ttt" / "stale.txt").write_text("from an earlier save")
    save_ttt_lm(lm, tmp_path / "ttt")
    assert not (tmp_path / "ttt" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ttt"]


def test_ttt_weights_alone_round_trip(tmp_path):
    source = build_lm(tiny_lm_config(), TTT, seed=1)
    target = build_lm(tiny_lm_config(), TTT, seed=2)
    save_ttt_weights(source, tmp_path / "ttt.safetensors")
    load_ttt_weights(target, tmp_path / "ttt.safetensors")
    for key, value in checkpoints.ttt_state_dict(source).items():
        assert torch.equal(target.state_dict()[key], value)


def test_missing_and_misshaped_keys(tmp_path):
    lm = build_lm(tiny_lm_config(), TTT)
    state = {k: v.contiguous() for k, v in checkpoints.ttt_state_dict(lm).items()}
    missing = dict(state)
    missing.pop("transformer.layers.2.gating.ttt_target.conv")
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['transformer.layers.2.gating.ttt_target.conv'\]"):
        load_ttt_weights(lm, tmp_path / "missing.safetensors")
    misshaped = dict(state)
    misshaped["transformer.layers.0.gating.ttt_target.conv"] = torch.zeros(64, 3)
    save_file(misshaped, str(tmp_path / "misshaped.safetensors"))
    with pytest.raises(ValueError, match=r"layers.0.gating.ttt_target.conv has shape \(64, 3\), "
                                         r"the model expects \(64, 2\)"):
        load_ttt_weights(lm, tmp_path / "misshaped.safetensors")
    with pytest.raises(FileNotFoundError, match="TTT weights not found"):
        load_ttt_weights(lm, tmp_path / "absent.safetensors")


def test_broken_plain_checkpoint_names_the_file(tmp_path):
    directory = write_plain_checkpoint(tmp_path / "plain")
    state = load_file(str(directory / "model.safetensors"))
    state.pop("text_linear.weight")
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)cannot load the Moshi weights .*model.safetensors.*text_linear.weight"):
        load_ttt_lm(directory, TTT, dtype=torch.float32)


def test_loading_asks_for_what_it_needs(tmp_path):
    directory = write_plain_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="plain Moshi checkpoint: pass the TTTConfig"):
        load_ttt_lm(directory, dtype=torch.float32)
    save_ttt_lm(build_lm(tiny_lm_config(), TTT), tmp_path / "ttt")
    with pytest.raises(ValueError, match="already a TTT model|belongs to a TTT model"):
        load_ttt_lm(tmp_path / "ttt", TTT, dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_ttt_lm(tmp_path, TTT)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_ttt_lm(tmp_path / "nowhere", TTT)


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    lm = build_lm(tiny_lm_config(), TTT)
    save_ttt_lm(lm, tmp_path / "ttt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ttt").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_ttt_weights", crash)
    with torch.no_grad():
        next(lm.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_ttt_lm(lm, tmp_path / "ttt")
    after = {p.name: p.read_bytes() for p in (tmp_path / "ttt").iterdir()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ttt"]


def test_a_mistyped_directory_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    from moshi_ttt.models import checkpoint_info
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for source in ("runs/nonexistent", str(tmp_path / "missing"), "missing", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
            checkpoint_info(source)


def test_a_repo_id_the_hub_cannot_give_is_one_line(tmp_path, monkeypatch):
    """"runs/x" on a fresh clone (no runs/) looks like a repo id: one quick question to the hub
    (not a minute of download retries), and one line whatever the network."""
    from moshi_ttt.models import checkpoint_info
    monkeypatch.chdir(tmp_path)
    expected = (r"^runs/x: no local directory runs/x, and (the Hugging Face Hub cannot be reached \(\w+\)"
                r"|no such repository on the Hugging Face Hub)$")
    with pytest.raises(FileNotFoundError, match=expected):
        checkpoint_info("runs/x")
