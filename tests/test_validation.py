"""The validation loss during training (data.eval_data) is the loss of the checkpoint's weights."""

import json

import torch
from safetensors.torch import load_file

from moshi_ttt.models import document_segments
from moshi_ttt.train import TrainConfig, train
from moshi_ttt.train.batches import SequenceBatcher
from moshi_ttt.train.loss import loss_weights, weighted_losses
from moshi_ttt.train.trainer import build_model, build_source


def test_validation_loss_equals_an_evaluation_of_the_checkpoint(finetune_data, tmp_path):
    model, data = finetune_data
    config = TrainConfig.from_dict({
        "model": str(model), "max_steps": 4, "batch_size": 2, "seq_frames": 30, "ckpt_freq": 2, "eval_freq": 2,
        "keep_last": 5, "log_freq": 1, "run_dir": str(tmp_path / "run"), "ttt": {"every": 2, "chunk_size": 8},
        "data": {"source": "finetune", "train_data": str(data / "train.jsonl"),
                 "eval_data": str(data / "train.jsonl")}})
    train(config)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = {m["step"]: m for m in map(json.loads, lines) if "eval/loss" in m}
    assert sorted(logged) == [2, 4]
    for step, metrics in logged.items():
        lm = build_model(config, torch.device("cpu"))
        trained = load_file(str(tmp_path / "run" / "checkpoints" / f"step_{step:06d}" / "trainable.safetensors"))
        assert not lm.load_state_dict(trained, strict=False).unexpected_keys
        lm.eval()
        source = build_source(config, lm, config.data.eval_data)
        batcher = SequenceBatcher(source, config.frames, shuffle=False)
        total_frames = sum(source.num_frames(i) for i in range(len(source)))
        rows = [batcher.load_row(batcher.plan_row()) for _ in range(total_frames // config.frames)]
        sums = torch.zeros(2)
        totals = torch.zeros(2)
        with torch.no_grad():
            for codes, segments in rows:  # one row at a time: the sums do not depend on the batching
                weights = loss_weights(lm, codes[None], config.first_codebook_weight_multiplier,
                                       config.text_padding_weight)
                with document_segments(lm, segments[None]):
                    sums += weighted_losses(lm(codes[None]), codes[None], weights)
                totals += weights.totals()
        text, audio = (sums / totals).tolist()
        assert abs(metrics["eval/text_loss"] - text) < 1e-4 and abs(metrics["eval/audio_loss"] - audio) < 1e-4
        assert abs(metrics["eval/loss"] - (text + audio)) < 1e-4
        assert metrics["eval_ttt_off/loss"] != metrics["eval/loss"]
    assert logged[4]["eval/loss"] != logged[2]["eval/loss"]


def test_eval_data_is_for_real_data_only():
    import pytest
    with pytest.raises(ValueError, match="data.eval_data='x.jsonl' with data.source='synthetic'"):
        TrainConfig.from_dict({"data": {"eval_data": "x.jsonl"}})


def test_a_validation_set_shorter_than_a_row_is_refused():
    import pytest
    from moshi_ttt.train.validation import ValidationSet

    class Short:
        def __len__(self):
            return 1

        def num_frames(self, index):
            return 20

        def __getitem__(self, index):
            return torch.zeros(3, 20, dtype=torch.long)
    with pytest.raises(ValueError, match="data.eval_data holds 20 frames, less than one row of 30"):
        ValidationSet(Short(), 30, max_rows=8)
    assert len(ValidationSet(Short(), 8, max_rows=8)) == 2 and len(ValidationSet(Short(), 8, max_rows=1)) == 1
