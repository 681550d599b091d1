"""moshi-finetune's data format: stereo conversations with word-aligned transcripts.

A .jsonl file lists `{"path": "a.wav", "duration": 24.5}` (paths relative to
the .jsonl). Left channel: the model's voice; right channel: the user's. Beside
each audio file, `a.json` holds `{"alignments": [[word, [start, end], speaker], ...]}`.

Tokenised as moshi-finetune does: Mimi codes of the left then the right channel;
the text stream at Mimi's frame rate holds the main speaker's words (speaker
"SPEAKER_MAIN"), one token per frame from each word's start, the end-of-padding
token on the frame before a word, and padding everywhere else.
"""

import functools
import json
import math
import typing as tp
from pathlib import Path

import numpy as np
import sentencepiece
import torch

from .audio import read_audio

MAIN_SPEAKER = "SPEAKER_MAIN"


def text_stream(words: list[tuple[list[int], float, float]], num_frames: int, frame_rate: float,
                padding_id: int, end_padding_id: int) -> list[int]:
    """Text tokens at the audio frame rate from (tokens, start s, end s) of words in time order.

    A word's tokens go out one per frame from the first frame whose start is
    past the word's start; a newer word replaces what is left of an older one.
    The frame before a word's first token, if padding, becomes `end_padding_id`.
    """
    stream = [padding_id] * num_frames
    pending: list[int] = []
    next_word = 0
    for t in range(num_frames):
        while next_word < len(words) and words[next_word][1] * frame_rate < t + 1:
            pending = list(words[next_word][0])
            next_word += 1
        if pending:
            if t > 0 and stream[t - 1] == padding_id:
                stream[t - 1] = end_padding_id
            stream[t] = pending.pop(0)
    return stream


class FinetuneConversations:
    """The documents of a moshi-finetune .jsonl, tokenised with Mimi and the text tokenizer."""

    def __init__(self, jsonl: str | Path, mimi, tokenizer: sentencepiece.SentencePieceProcessor, *,
                 padding_id: int, end_padding_id: int, dep_q: int, num_codebooks: int, cache_size: int = 4):
        self.jsonl = Path(jsonl)
        if not self.jsonl.is_file():
            raise FileNotFoundError(f"training data not found: {self.jsonl}")
        self.entries = _read_jsonl(self.jsonl)
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.padding_id = padding_id
        self.end_padding_id = end_padding_id
        self.dep_q = dep_q
        self.num_codebooks = num_codebooks
        self._load = functools.lru_cache(maxsize=cache_size)(self._tokenize)

    def __len__(self) -> int:
        return len(self.entries)

    def num_frames(self, index: int) -> int:
        return math.ceil(self.entries[index]["duration"] * self.mimi.frame_rate)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._load(index)

    def _tokenize(self, index: int) -> torch.Tensor:
        path = self.entries[index]["path"]
        audio = read_stereo(path, int(self.mimi.sample_rate))
        device = next(self.mimi.parameters()).device
        with torch.no_grad():
            audio_codes = self.mimi.encode(torch.from_numpy(audio).to(device)[:, None])  # [2, n_q, T]
        frames = self.num_frames(index)
        audio_codes = audio_codes[:, :self.dep_q, :frames].cpu()
        audio_codes = torch.nn.functional.pad(audio_codes, (0, frames - audio_codes.shape[-1]), value=-1)
        words = self._words(path, len(audio[0]) / self.mimi.sample_rate)
        text = text_stream(words, frames, self.mimi.frame_rate, self.padding_id, self.end_padding_id)
        codes = torch.cat([torch.tensor(text)[None], audio_codes.reshape(-1, frames)])
        return codes[:self.num_codebooks]

    def _words(self, audio_path: Path, duration: float) -> list[tuple[list[int], float, float]]:
        transcript = audio_path.with_suffix(".json")
        if not transcript.is_file():
            raise FileNotFoundError(f"transcript not found for {audio_path}: expected {transcript}")
        try:
            alignments = json.loads(transcript.read_text())["alignments"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{transcript}: expected {{\"alignments\": [[word, [start, end], speaker], ...]}}"
                             ) from error
        words = []
        for word, (start, end), speaker in sorted(alignments, key=lambda a: a[1][0]):
            if end > duration + 1e-3:
                raise ValueError(f"{transcript}: the word {word!r} ends at {end:.2f} s, past the end "
                                 f"of the audio ({duration:.2f} s)")
            if speaker == MAIN_SPEAKER and start < end:
                words.append((self.tokenizer.encode(word.strip()), float(start), float(end)))
        return words


def read_stereo(path: Path, sample_rate: int) -> np.ndarray:
    """[2, samples] float32 audio at `sample_rate`; a clear error for missing or mono files."""
    audio = read_audio(path, sample_rate)
    if audio.shape[0] != 2:
        raise ValueError(f"{path} has {audio.shape[0]} channel(s): moshi-finetune data is stereo "
                         "(left: the model, right: the user)")
    return audio


def _read_jsonl(jsonl: Path) -> list[dict[str, tp.Any]]:
    entries = []
    for number, line in enumerate(jsonl.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            path, duration = entry["path"], float(entry["duration"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{jsonl}:{number}: expected {{\"path\": ..., \"duration\": ...}}, "
                             f"got {line[:80]!r}") from error
        entries.append({"path": (jsonl.parent / path).resolve(), "duration": duration})
    if not entries:
        raise ValueError(f"{jsonl} lists no audio files")
    return entries
