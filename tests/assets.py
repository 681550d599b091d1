"""Files the tests make instead of downloading: checkpoints in moshi's format, a tokenizer, conversations."""

import io
import json
import random
from pathlib import Path

import numpy as np
import sentencepiece as spm
import sphn
import torch
from moshi.models import loaders
from safetensors.torch import save_file

from moshi_ttt import build_lm, tiny_lm_config, tiny_mimi_config


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """A BPE sentencepiece model trained on made-up words."""
    rng = random.Random(0)
    syllables = "ka lo mi ne su ta ri po de fu ga hi jo be zu wa ye qu xo vi".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def random_mimi(card: int, seed: int = 0):
    """A tiny Mimi with random weights and random codebooks (so its codes vary)."""
    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, tiny_mimi_config(card))
    with torch.no_grad():
        for module in mimi.modules():
            if hasattr(module, "embedding_sum"):
                module.embedding_sum.normal_(std=0.02)  # the scale of its latents
                module._initialized.fill_(1)
    return mimi


def write_plain_checkpoint(directory: Path, seed: int = 0, with_assets: bool = False,
                           **config_overrides) -> Path:
    """A random-weight Moshi checkpoint directory as moshi's loaders read it."""
    directory.mkdir(parents=True, exist_ok=True)
    lm_config = tiny_lm_config()
    lm = build_lm(lm_config, seed=seed)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(directory / loaders.MOSHI_NAME))
    config = dict(lm_config, **config_overrides)
    if with_assets:
        mimi = random_mimi(lm_config["card"], seed)
        save_file(mimi.state_dict(), str(directory / "mimi.safetensors"))
        (directory / "mimi_config.json").write_text(json.dumps(tiny_mimi_config(lm_config["card"])))
        write_tokenizer(directory / "tokenizer.model", lm_config["text_card"])
        config.update(mimi_name="mimi.safetensors", mimi_config_name="mimi_config.json",
                      tokenizer_name="tokenizer.model")
    (directory / "config.json").write_text(json.dumps(config))
    return directory


SR = 24000


def tone(seconds: float, freq: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).normal(size=t.shape) * 0.05
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_conversation(directory, name, seconds, words, channels=2):
    """Left: a tone (the model); right: loud noise (the user), which a random Mimi tells apart."""
    audio = np.stack([tone(seconds, 220, 0), np.random.default_rng(1).normal(size=int(seconds * SR)) * 0.5])
    audio = audio[:channels].astype(np.float32)
    sphn.write_wav(str(directory / f"{name}.wav"), audio, SR)
    (directory / f"{name}.json").write_text(json.dumps({"alignments": words}))
    return {"path": f"{name}.wav", "duration": seconds}


def write_finetune_data(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny checkpoint (with Mimi and a tokenizer) and two moshi-finetune conversations (data/train.jsonl)."""
    model = write_plain_checkpoint(tmp_path / "model", with_assets=True)
    data = tmp_path / "data"
    data.mkdir()
    main, other = "SPEAKER_MAIN", "SPEAKER_OTHER"
    entries = [
        write_conversation(data, "a", 4.0, [["kalo", [0.5, 0.9], main], ["mine", [1.2, 1.5], other],
                                            ["suta", [2.0, 2.4], main]]),
        write_conversation(data, "b", 3.0, [["ripo", [0.3, 0.6], main]]),
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return model, data
