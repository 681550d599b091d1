"""Audio to a Moshi stream layout [K, T] with Mimi, streaming, for files of any length."""

from pathlib import Path

import numpy as np
import torch
from moshi.models import loaders

from .audio import read_audio


class AudioTokenizer:
    """Mimi codes of the model's channel (and the user's), under a text stream of padding.

    user: "silence" encodes silence for a mono file's user stream, "none" leaves -1
    (no input); a stereo file's second channel is always the user. text: "pad" fills
    the text stream with the padding token, "none" with -1 (no token).
    """

    def __init__(self, mimi, *, dep_q: int, n_q: int, text_padding_id: int, user: str = "silence",
                 text: str = "pad", block_seconds: float = 20.0):
        if user not in ("silence", "none"):
            raise ValueError(f"user={user!r}: expected 'silence' or 'none'")
        if text not in ("pad", "none"):
            raise ValueError(f"text={text!r}: expected 'pad' or 'none'")
        self.mimi = mimi
        self.dep_q = dep_q
        self.n_q = n_q
        self.text_padding_id = text_padding_id
        self.user = user
        self.text = text
        frame = int(mimi.sample_rate / mimi.frame_rate)
        self.block = max(1, int(block_seconds * mimi.frame_rate)) * frame

    @classmethod
    def from_checkpoint_info(cls, info: loaders.CheckpointInfo, device: str = "cpu", **kwargs) -> "AudioTokenizer":
        if not Path(info.mimi_weights).is_file():
            raise FileNotFoundError(f"Mimi weights not found: {info.mimi_weights}")
        lm_config = info.lm_config or loaders._lm_kwargs
        mimi = info.get_mimi(device=device)
        return cls(mimi, dep_q=lm_config["dep_q"], n_q=lm_config["n_q"],
                   text_padding_id=lm_config.get("existing_text_padding_id", 3), **kwargs)

    def encode_file(self, path: Path) -> torch.Tensor:
        return self.encode(read_audio(path, int(self.mimi.sample_rate)))

    def encode(self, audio: np.ndarray) -> torch.Tensor:
        """audio [channels, samples] -> codes [1 + n_q, frames]."""
        model = self._mimi_codes(audio[0])
        if audio.shape[0] > 1:
            user = self._mimi_codes(audio[1])
        elif self.user == "silence":
            user = self._mimi_codes(np.zeros_like(audio[0]))
        else:
            user = torch.full_like(model, -1)
        text = torch.full((1, model.shape[1]), self.text_padding_id if self.text == "pad" else -1,
                          dtype=torch.long)
        codes = torch.cat([text, model, user])
        return codes[:1 + self.n_q]

    def _mimi_codes(self, channel: np.ndarray) -> torch.Tensor:
        device = next(self.mimi.parameters()).device
        pieces: list[torch.Tensor] = []
        frame = int(self.mimi.sample_rate / self.mimi.frame_rate)
        padded = np.pad(channel, (0, -len(channel) % frame)).astype(np.float32)
        with torch.no_grad(), self.mimi.streaming(1):
            for start in range(0, len(padded), self.block):
                block = torch.from_numpy(padded[start:start + self.block]).to(device)
                pieces.append(self.mimi.encode(block[None, None])[0, :self.dep_q].cpu())
        return torch.cat(pieces, dim=-1).long()

