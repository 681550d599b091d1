"""Reading audio files with errors that name the file."""

from pathlib import Path

import numpy as np
import sphn


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """[channels, samples] float32 audio resampled to `sample_rate`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        audio, _ = sphn.read(str(path), sample_rate=sample_rate)
    except Exception as error:  # sphn raises plain exceptions for unreadable files
        raise ValueError(f"cannot read audio file {path}: {error}") from error
    return np.atleast_2d(audio).astype(np.float32)
