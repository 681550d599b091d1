"""TTT-MLP blocks in a Moshi, alone and beside In-Place TTT layers: exact start, streaming,
causality, resets, checkpoints and training modes."""

import json

import pytest
import torch
from moshi.models.lm import LMGen

from moshi_ttt import (TTTConfig, apply_ttt, build_lm, document_segments, load_ttt_lm, save_moshi_lm,
                       save_ttt_lm, set_ttt_enabled, tiny_lm_config, ttt_layers)
from moshi_ttt.models.checkpoints import ttt_state_dict
from moshi_ttt.train.modes import apply_mode

B = 4  # mini-batch
MLP = dict(method="ttt_mlp", every=2, mini_batch=B, base_lr=1.0, gate_init=0.5, conv_kernel=4)
MIXED = [TTTConfig(layers=[0, 2], chunk_size=8, init="normal", init_std=0.1, eta=0.1),
         TTTConfig(method="ttt_mlp", layers=[1, 3], mini_batch=B, base_lr=1.0, gate_init=0.5)]


def random_codes(lm, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (batch, lm.num_codebooks, length), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (batch, length), generator=g)
    return codes


def text_logits(lm, codes):
    return lm(codes).text_logits.nan_to_num()


def stream_text(lm, codes, reset_at=None, reset_mask=None):
    outs = []
    with lm.streaming(codes.shape[0]):
        for t in range(codes.shape[-1]):
            if t == reset_at:
                lm.reset_streaming(reset_mask)
            outs.append(lm.forward_text(codes[:, :, t:t + 1])[0])
    return torch.cat(outs, dim=1)


def test_gate_at_zero_gives_the_plain_logits_and_only_new_keys():
    plain = build_lm(tiny_lm_config())
    converted = build_lm(tiny_lm_config(), TTTConfig(**{**MLP, "gate_init": 0.0}))
    codes = random_codes(plain, 2, 13)
    assert torch.equal(text_logits(converted, codes), text_logits(plain, codes))
    assert torch.equal(converted(codes).logits.nan_to_num(), plain(codes).logits.nan_to_num())
    assert [n for n, _ in ttt_layers(converted)] == ["transformer.layers.0.ttt_mlp", "transformer.layers.2.ttt_mlp"]
    new = set(converted.state_dict()) - set(plain.state_dict())
    assert new == set(ttt_state_dict(converted)) and all(".ttt_mlp." in k for k in new)
    assert set(plain.state_dict()) <= set(converted.state_dict())
    assert ttt_layers(converted.depformer) == []


@pytest.mark.parametrize("configs", [[TTTConfig(**MLP)], MIXED], ids=["ttt_mlp", "mixed"])
def test_streaming_equals_parallel(configs):
    lm = build_lm(tiny_lm_config(), configs)
    codes = random_codes(lm, 2, 3 * B + 3)
    full, _ = lm.forward_text(codes)
    torch.testing.assert_close(stream_text(lm, codes), full, rtol=1e-4, atol=1e-4)
    plain = build_lm(tiny_lm_config())
    assert not torch.allclose(full, plain.forward_text(codes)[0], atol=1e-3)
    with lm.streaming(2):  # steps of b + 1 frames
        steps = [lm.forward_text(codes[:, :, t:t + B + 1])[0] for t in range(0, codes.shape[-1], B + 1)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p", [3, 9])
def test_model_is_causal(p):
    lm = build_lm(tiny_lm_config(), MIXED)
    codes = random_codes(lm, 2, 16)
    moved = codes.clone()
    moved[:, :, p:] = random_codes(lm, 2, 16 - p, seed=1)
    safe = p - max(lm.delays)
    assert torch.equal(text_logits(lm, moved)[..., :safe, :], text_logits(lm, codes)[..., :safe, :])
    assert not torch.allclose(text_logits(lm, moved)[..., p + 1:, :], text_logits(lm, codes)[..., p + 1:, :])


def test_reset_one_conversation():
    lm = build_lm(tiny_lm_config(), MIXED)
    codes = random_codes(lm, 2, 20)
    untouched = stream_text(lm, codes)
    reset = stream_text(lm, codes, 9, torch.tensor([False, True]))
    fresh = stream_text(lm, codes[1:, :, 9:])
    assert torch.equal(reset[0], untouched[0])
    torch.testing.assert_close(reset[1, 9:], fresh[0], rtol=1e-5, atol=1e-5)


def test_packed_documents_and_ttt_off():
    lm = build_lm(tiny_lm_config(), TTTConfig(**MLP))
    codes = random_codes(lm, 1, 18)
    segments = (torch.arange(18) >= 7).long()[None]
    seen = []
    block = lm.transformer.layers[0].ttt_mlp
    hook = block.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    with document_segments(lm, segments):
        lm(codes)
    hook.remove()
    (x, given), out = seen[0]
    assert torch.equal(given, segments)  # the block got the document ids: the second document starts fresh
    torch.testing.assert_close(out[:, 7:], block(x[:, 7:]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, 7:], block(x)[:, 7:], atol=1e-4)
    set_ttt_enabled(lm, False)
    with lm.streaming(1):
        lm.forward_text(codes[:, :, :9])
        assert all(layer.fast_weight_change_norms().max() == 0 for _, layer in ttt_layers(lm))


def test_mixed_model_round_trips_and_plain_checkpoint_converts(tmp_path):
    lm = build_lm(tiny_lm_config(), MIXED)
    with torch.no_grad():
        for name, param in ttt_state_dict(lm).items():
            param.add_(0.01 * torch.randn_like(param))
    save_ttt_lm(lm, tmp_path / "mixed")
    loaded = load_ttt_lm(tmp_path / "mixed", dtype=torch.float32)
    assert [c.method for c in loaded.ttt_configs] == ["inplace", "ttt_mlp"]
    codes = random_codes(lm, 1, 12)
    assert torch.equal(text_logits(loaded, codes), text_logits(lm, codes))
    plain = build_lm(tiny_lm_config())
    save_moshi_lm(plain, tmp_path / "plain")
    converted = load_ttt_lm(tmp_path / "plain", TTTConfig(**MLP), dtype=torch.float32)
    for key, value in plain.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value)


def test_training_modes_train_the_blocks():
    lm = build_lm(tiny_lm_config(), MIXED)
    counts = apply_mode(lm, "ttt")
    trains = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trains == set(ttt_state_dict(lm)) and counts["ttt_mlp"] > 0 and counts["ttt_target"] > 0
    lm = build_lm(tiny_lm_config(), MIXED)
    apply_mode(lm, "lora")
    block = lm.transformer.layers[1].ttt_mlp
    assert type(block.q_proj) is torch.nn.Linear and block.q_proj.weight.requires_grad
    lm = build_lm(tiny_lm_config(), MIXED).train()
    apply_mode(lm, "ttt_layers")
    lm(random_codes(lm, 2, 12)).text_logits.nan_to_num().square().mean().backward()
    params = dict(lm.named_parameters())
    for name in ttt_state_dict(lm):
        if ".ttt_mlp." in name:
            assert params[name].grad is not None and params[name].grad.abs().max() > 0, name


def test_lmgen_runs_and_resets():
    lm = build_lm(tiny_lm_config(), MIXED)
    gen = LMGen(lm, temp=0.8, temp_text=0.7)
    g = torch.Generator().manual_seed(0)
    user = torch.randint(0, lm.card, (2, lm.n_q - lm.dep_q, 40), generator=g)
    with gen.streaming(2):
        for t in range(40):
            gen.step(user[:, :, t:t + 1])
        blocks = [layer for _, layer in ttt_layers(lm) if layer.method == "ttt_mlp"]
        assert all(b.fast_weight_change_norms().min() > 0 for b in blocks)
        gen.reset_streaming(torch.tensor([True, False]))
        norms = [b.fast_weight_change_norms() for b in blocks]
        assert all(n[0] == 0 and n[1] > 0 for n in norms)


def test_config_errors():
    with pytest.raises(ValueError, match="ttt.method='ttt_mlp' does not read ttt.chunk_size"):
        TTTConfig(method="ttt_mlp", chunk_size=64)
    with pytest.raises(ValueError, match="ttt.method='inplace' does not read ttt.mini_batch"):
        TTTConfig(mini_batch=8)
    with pytest.raises(ValueError, match="ttt.method='linear'"):
        TTTConfig(method="linear")
    with pytest.raises(ValueError, match="transformer layer 2 is chosen by ttt config 0"):
        apply_ttt(build_lm(tiny_lm_config()), [TTTConfig(layers=[2]), TTTConfig(method="ttt_mlp", layers=[2])])


def test_diagnostics_of_both_methods():
    from moshi_ttt.eval import ttt_diagnostics
    lm = build_lm(tiny_lm_config(), MIXED).eval()
    results = ttt_diagnostics(lm, random_codes(lm, 2, 4 * B + 2))
    assert set(results) == {"transformer.layers.0.gating", "transformer.layers.1.ttt_mlp",
                            "transformer.layers.2.gating", "transformer.layers.3.ttt_mlp"}
    mlp = results["transformer.layers.1.ttt_mlp"]
    assert len(mlp["l0"]) == 4  # whole mini-batches
    assert mlp["l0"][0] == pytest.approx(mlp["lprev"][0])  # the first mini-batch reads the initial weights
    assert all(after != before for after, before in zip(mlp["lafter"], mlp["lprev"]))  # every update acts
    assert mlp["accumulated_norm"][0] == pytest.approx(mlp["update_norm"][0])


def test_eval_command_on_a_mixed_model(tmp_path):
    import shutil
    from assets import write_plain_checkpoint
    from test_eval import write_wav
    from moshi_ttt.eval.command import eval_command
    plain = write_plain_checkpoint(tmp_path / "plain", with_assets=True)
    save_ttt_lm(load_ttt_lm(plain, MIXED, dtype=torch.float32), tmp_path / "ttt")
    for name in ("mimi.safetensors", "mimi_config.json", "tokenizer.model"):
        shutil.copy(plain / name, tmp_path / "ttt" / name)
    for i in range(2):
        write_wav(tmp_path / "long" / f"book{i}.wav", 4.0 + i, 10 + i)
    results = eval_command(["--model", f"ttt={tmp_path / 'ttt'}", "--out", str(tmp_path / "out"),
                            "--long-audio", str(tmp_path / "long"), "--diagnostics-frames", "40",
                            "--device", "cpu", "--dtype", "float32"])
    assert results["activity"]["ttt"]["active"]
    assert set(results["activity"]["ttt"]["layers"]) == {"transformer.layers.0.gating", "transformer.layers.1.ttt_mlp",
                                                        "transformer.layers.2.gating", "transformer.layers.3.ttt_mlp"}
    assert set(results["diagnostics"]["ttt"]) == set(results["activity"]["ttt"]["layers"])
    assert (tmp_path / "out" / "diagnostics_ttt_transformer_layers_1_ttt_mlp.png").is_file()


def test_training_a_saved_mixed_model_keeps_or_retunes_its_settings(tmp_path):
    """From a saved model that mixes methods: no ttt section keeps every setting; a ttt section
    retunes the layers of its method (here the first config's); a structural change is an error."""
    from test_train import SMALL
    from moshi_ttt.train import TrainConfig, train

    def config(name, **overrides):
        data = {k: v for k, v in SMALL.items() if k != "ttt"}
        return TrainConfig.from_dict({**data, "model": str(tmp_path / "mixed"), "mode": "ttt", "max_steps": 1,
                                      "ckpt_freq": 1, "run_dir": str(tmp_path / name), **overrides})
    save_ttt_lm(build_lm(tiny_lm_config(context=16), MIXED), tmp_path / "mixed")
    kept = config("kept")
    train(kept)
    written = json.loads((tmp_path / "kept" / "final" / "config.json").read_text())["ttt"]
    assert written == [c.to_dict() for c in MIXED]
    retuned = config("retuned", ttt={"eta": 0.2})
    train(retuned)
    written = json.loads((tmp_path / "retuned" / "final" / "config.json").read_text())["ttt"]
    assert written[0]["eta"] == 0.2 and written[1] == MIXED[1].to_dict()
    moved = config("moved", ttt={"layers": [0, 1]})
    with pytest.raises(ValueError, match="structure cannot change"):
        train(moved)


def test_a_failing_config_leaves_the_model_unconverted():
    lm = build_lm(tiny_lm_config())
    with pytest.raises(ValueError, match="ttt.heads=3: the model dimension 64 of transformer layer 1"):
        apply_ttt(lm, [TTTConfig(layers=[0]), TTTConfig(method="ttt_mlp", layers=[1], heads=3)])
    assert ttt_layers(lm) == [] and getattr(lm, "ttt_config", None) is None
    apply_ttt(lm, MIXED)
    assert len(ttt_layers(lm)) == 4


def test_diagnostics_of_a_document_shorter_than_a_mini_batch():
    from moshi_ttt.eval import ttt_diagnostics
    lm = build_lm(tiny_lm_config(), TTTConfig(**MLP)).eval()
    results = ttt_diagnostics(lm, random_codes(lm, 1, B - 1))
    assert all(stats["l0"] == [] for stats in results.values())
