"""Which targets of Moshi's delayed streams a document has."""

import torch
from moshi.models.lm import LMModel


def scored_alone(lm: LMModel, lengths: list[int], frames: int, device=None) -> torch.Tensor:
    """[B, 1 + dep_q, frames] bool: the targets (text, model audio) of documents of `lengths`.

    A codebook with delay d has no prediction for the last d frames of a document;
    padded into a longer batch it would, so batching would change the scores.
    """
    time = torch.arange(frames, device=device)
    ends = torch.tensor(lengths, device=device)[:, None, None]
    delays = torch.tensor(lm.delays[:1 + lm.dep_q], device=device)[None, :, None]
    return time[None, None, :] < ends - delays
