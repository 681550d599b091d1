"""Spoken-LM benchmarks: sWUGGY, sBLIMP (ZeroSpeech 2021), sStoryCloze and tStoryCloze.

Each item is a pair of recordings, one acceptable and one not; the model should
find the acceptable one more likely. A recording is scored as Moshi's own
stream (the user silent, the text stream padding) by the log-likelihood of its
audio codebooks, summed and divided by its number of tokens (both reported).
Every candidate is a sequence of its own in a whole-sequence forward: it starts
from W0, and nothing a candidate teaches the fast weights reaches another.

Layouts, as released:
- ZeroSpeech 2021: ROOT/lexical/{dev,test}/gold.csv (id, filename, voice,
  frequency, word, phones, length, correct) beside the .wav files, and
  ROOT/syntactic/{dev,test}/gold.csv (filename, id, voice, type, subtype,
  correct, transcription). A pair is the correct and the incorrect file of one
  id and voice; as in the official evaluation, pairs are averaged over voices
  per id, then over ids. sWUGGY is also split into in-vocabulary and
  out-of-vocabulary words (frequency 0).
- Spoken StoryCloze: a directory (or its subdirectories) of .wav files named
  `<index>_...wav`, two per index; the negative one is marked by "incorrect",
  "false" or "neg" in its name, the positive one by "correct", "true" or "pos".
"""

import csv
import re
import typing as tp
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.audio import read_audio as load_audio
from ..models.streams import scored_alone


@dataclass
class Pair:
    positive: Path
    negative: Path
    group: str  # items scored together (ZeroSpeech: one id over its voices)
    subset: str = "all"


def zerospeech_pairs(root: str | Path, task: str, split: str = "dev") -> list[Pair]:
    """Pairs of the ZeroSpeech 2021 lexical (sWUGGY) or syntactic (sBLIMP) task."""
    directory = Path(root) / task / split
    gold = directory / "gold.csv"
    if not gold.is_file():
        raise FileNotFoundError(f"{task} gold file not found: {gold} (expected the ZeroSpeech 2021 layout "
                                f"ROOT/{task}/{split}/gold.csv)")
    with open(gold, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"filename", "id", "voice", "correct"} | ({"frequency"} if task == "lexical" else set())
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"{gold}: expected the columns {sorted(needed)}, got {sorted(rows[0]) if rows else []}")
    by_key: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    subsets: dict[tuple[str, str], str] = {}
    for row in rows:
        key = (row["id"], row["voice"])
        label = "positive" if row["correct"].strip() == "1" else "negative"
        by_key[key][label] = row["filename"]
        if task == "lexical" and label == "positive":
            subsets[key] = "oov" if int(float(row["frequency"] or 0)) == 0 else "in-vocabulary"
    pairs = []
    for key, files in sorted(by_key.items()):
        if set(files) != {"positive", "negative"}:
            raise ValueError(f"{gold}: id {key[0]!r} voice {key[1]!r} lacks a correct or an incorrect file")
        pairs.append(Pair(_wav(directory, files["positive"]), _wav(directory, files["negative"]),
                          group=key[0], subset=subsets.get(key, "all")))
    return pairs


def storycloze_pairs(directory: str | Path) -> list[Pair]:
    """Pairs of a Spoken StoryCloze directory (sStoryCloze or tStoryCloze)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"StoryCloze directory not found: {directory}")
    groups: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in sorted(directory.rglob("*.wav")):
        match = re.match(r"^(\d+)_(.*)$", path.stem)
        if match is None:
            raise ValueError(f"{path}: expected a name '<index>_<label>.wav'")
        label = match.group(2).lower()
        if re.search(r"incorrect|false|neg", label):
            kind = "negative"
        elif re.search(r"correct|true|pos", label):
            kind = "positive"
        else:
            raise ValueError(f"{path}: cannot tell the correct ending from the incorrect one by the name "
                             "(expected 'correct'/'true'/'pos' or 'incorrect'/'false'/'neg')")
        if kind in groups[match.group(1)]:
            raise ValueError(f"{path}: a second {kind} recording for index {match.group(1)}")
        groups[match.group(1)][kind] = path
    if not groups:
        raise ValueError(f"no .wav files in {directory}")
    pairs = []
    for index, files in sorted(groups.items(), key=lambda item: int(item[0])):
        if set(files) != {"positive", "negative"}:
            missing = "negative" if "positive" in files else "positive"
            raise ValueError(f"{directory}: index {index} lacks its {missing} recording")
        pairs.append(Pair(files["positive"], files["negative"], group=index))
    return pairs


@torch.no_grad()
def audio_log_likelihoods(lm, codes: list[torch.Tensor], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probabilities, token count) of the model's audio codebooks for each codes [K, T]."""
    device = next(lm.parameters()).device
    totals, counts = np.zeros(len(codes)), np.zeros(len(codes))
    order = sorted(range(len(codes)), key=lambda i: codes[i].shape[1])
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        frames = max(codes[i].shape[1] for i in rows)
        batch = torch.full((len(rows), lm.num_codebooks, frames), lm.zero_token_id, dtype=torch.long)
        for r, i in enumerate(rows):
            batch[r, :, :codes[i].shape[1]] = codes[i]
        batch = batch.to(device)
        out = lm(batch)
        targets = batch[:, 1:1 + lm.dep_q]
        alone = scored_alone(lm, [codes[i].shape[1] for i in rows], frames, device)[:, 1:]
        valid = out.mask & (targets >= 0) & alone
        log_probs = out.logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        log_probs = torch.where(valid, log_probs, 0.0)
        totals[rows] = log_probs.sum(dim=(1, 2)).double().cpu().numpy()
        counts[rows] = valid.sum(dim=(1, 2)).cpu().numpy()
    return totals, counts


def score_pairs(lm, pairs: list[Pair], encode: tp.Callable[[np.ndarray], torch.Tensor], *,
                batch_size: int = 8, name: str = "benchmark") -> dict[str, tp.Any]:
    """Accuracy of `pairs` by summed and by token-normalised log-likelihood."""
    files = sorted({p for pair in pairs for p in (pair.positive, pair.negative)})
    codes = [encode(read_audio(path)) for path in tqdm(files, desc=f"{name}: tokenize", unit="file")]
    totals, counts = audio_log_likelihoods(lm, codes, batch_size)
    index = {path: i for i, path in enumerate(files)}
    result: dict[str, tp.Any] = {"pairs": len(pairs)}
    for kind, score in (("sum", totals), ("mean", totals / np.maximum(counts, 1))):
        wins = [_win(score[index[p.positive]], score[index[p.negative]]) for p in pairs]
        result[f"accuracy_{kind}"] = _grouped_accuracy(pairs, wins)
        subsets = sorted({p.subset for p in pairs} - {"all"})
        for subset in subsets:
            chosen = [(p, w) for p, w in zip(pairs, wins) if p.subset == subset]
            result[f"accuracy_{kind}/{subset}"] = _grouped_accuracy(*zip(*chosen))
    result["log_likelihood"] = {str(path): {"sum": float(totals[i]), "tokens": int(counts[i])}
                                for path, i in index.items()}
    return result


def read_audio(path: Path, sample_rate: int = 24000) -> np.ndarray:
    """The first channel of an audio file, [1, samples]."""
    return load_audio(path, sample_rate)[:1]


def _wav(directory: Path, filename: str) -> Path:
    name = filename if filename.endswith(".wav") else f"{filename}.wav"
    return directory / name


def _win(positive: float, negative: float) -> float:
    return 1.0 if positive > negative else 0.5 if positive == negative else 0.0


def _grouped_accuracy(pairs: tp.Sequence[Pair], wins: tp.Sequence[float]) -> float:
    """Mean over groups of the mean over each group's pairs (ZeroSpeech: over voices per id)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for pair, win in zip(pairs, wins):
        groups[pair.group].append(win)
    return float(np.mean([np.mean(v) for v in groups.values()]))
