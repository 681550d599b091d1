"""Pre-tokenised documents: one .npy file of codes [K, T] per document.

K is the model's number of streams (text, then the model's and the user's audio
codebooks), -1 marks "no token". `moshi-ttt tokenize` writes these from audio,
so long-context training reads codes without running Mimi.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..utils.atomic import atomic_file


class CodeFiles:
    """The .npy documents of a directory (sorted by name), memory-mapped."""

    def __init__(self, directory: str | Path, num_codebooks: int):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"code directory not found: {self.directory}")
        self.paths = sorted(self.directory.glob("*.npy"))
        if not self.paths:
            raise ValueError(f"no .npy code files in {self.directory}")
        self.num_codebooks = num_codebooks
        self._shapes = [self._open(p).shape for p in self.paths]

    def _open(self, path: Path) -> np.ndarray:
        try:
            codes = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as error:
            raise ValueError(f"cannot read code file {path}: {error}") from error
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"{path} holds codes of shape {codes.shape}: expected "
                             f"[{self.num_codebooks}, frames] for this model")
        return codes

    def __len__(self) -> int:
        return len(self.paths)

    def num_frames(self, index: int) -> int:
        return self._shapes[index][1]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._open(self.paths[index]), dtype=np.int64))


def write_codes(path: Path, codes: torch.Tensor) -> None:
    """Save codes [K, T] (int16 fits Moshi's vocabularies) atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, codes.cpu().numpy().astype(np.int16))


def tokenize_command(argv: list[str]) -> None:
    """`moshi-ttt tokenize`: audio files to code files, for long-context training and evaluation."""
    parser = argparse.ArgumentParser(
        prog="moshi-ttt tokenize",
        description="Encode audio with Mimi into .npy code files [K, T]: the model's stream from the "
                    "first channel, the user's from the second (or silence), the text stream padding.")
    parser.add_argument("audio", nargs="+", type=Path, help="audio files, or directories of .wav/.flac/.mp3/.ogg")
    parser.add_argument("--out", type=Path, required=True, help="directory for the .npy files")
    parser.add_argument("--model", default="kyutai/moshiko-pytorch-bf16",
                        help="a Moshi checkpoint directory or HF repo, for its Mimi and stream layout")
    parser.add_argument("--mimi-weight", type=Path, help="Mimi weights, if not the checkpoint's")
    parser.add_argument("--user", choices=["silence", "none"], default="silence",
                        help="user stream of mono audio: Mimi codes of silence, or -1 (no input)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from ..models.checkpoints import checkpoint_info
    from .tokenize import AudioTokenizer

    info = checkpoint_info(args.model, mimi_weights=args.mimi_weight)
    tokenizer = AudioTokenizer.from_checkpoint_info(info, device=args.device, user=args.user)
    files = audio_files(args.audio)
    index = []
    for path in tqdm(files, desc="tokenize", unit="file"):
        codes = tokenizer.encode_file(path)
        target = args.out / f"{path.stem}.npy"
        write_codes(target, codes)
        index.append({"path": target.name, "source": str(path), "frames": codes.shape[1]})
    with atomic_file(args.out / "index.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(entry) + "\n" for entry in index))
    print(f"wrote {len(index)} code files to {args.out}")


def audio_files(inputs: list[Path]) -> list[Path]:
    files = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in (".wav", ".flac", ".mp3", ".ogg"))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"audio file or directory not found: {item}")
    if not files:
        raise ValueError(f"no audio files in {[str(i) for i in inputs]}")
    return files
