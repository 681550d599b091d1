"""moshi-finetune's loss: text and audio cross-entropy with per-token weights.

Weights: 1 on valid tokens, `first_codebook_weight_multiplier` on the first
(semantic) audio codebook, `text_padding_weight` on text padding tokens, 0 where
the target is "no token" (-1) or, because of the acoustic delay, out of the
sequence. Each part is a weighted mean; the loss is their sum.

The weights depend on the codes only, so their totals are known before any
forward: summed over micro-batches and processes, they make the loss of a step
the same however its batch is split (one process or many, one micro-batch or many).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel, LMOutput

from ..models.streams import scored_alone


@dataclass
class LossWeights:
    text: torch.Tensor   # [B, 1, T]
    audio: torch.Tensor  # [B, dep_q, T]

    def totals(self) -> torch.Tensor:
        return torch.stack([self.text.sum(), self.audio.sum()])

    def masked_rows(self, kept: torch.Tensor) -> "LossWeights":
        """These weights with the rows where `kept` [B] is False set to 0."""
        mask = kept.to(self.text.dtype)[:, None, None]
        return LossWeights(self.text * mask, self.audio * mask)


def loss_weights(lm: LMModel, codes: torch.Tensor, first_codebook_weight_multiplier: float,
                 text_padding_weight: float) -> LossWeights:
    """Weights of every target token of `codes` [B, K, T]."""
    B, _, T = codes.shape
    targets = codes[:, :1 + lm.dep_q]
    weights = ((targets != lm.zero_token_id) & scored_alone(lm, [T] * B, T, codes.device)).float()
    text = weights[:, :1]
    padding = (targets[:, :1] == lm.text_padding_token_id) | (targets[:, :1] == lm.end_of_text_padding_id)
    text = torch.where(padding, text * text_padding_weight, text)
    audio = weights[:, 1:].clone()
    audio[:, 0] *= first_codebook_weight_multiplier
    return LossWeights(text, audio)


def weighted_losses(output: LMOutput, codes: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """[sum of weighted text CE, sum of weighted audio CE] for one micro-batch."""
    dep_q = output.logits.shape[1]
    parts = []
    for logits, targets, w in ((output.text_logits, codes[:, :1], weights.text),
                               (output.logits, codes[:, 1:1 + dep_q], weights.audio)):
        targets = torch.where(w > 0, targets, torch.zeros_like(targets))
        logits = torch.where(w[..., None] > 0, logits, torch.zeros_like(logits))  # NaN outside the mask
        ce = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), reduction="none")
        parts.append((ce * w.flatten()).sum())
    return torch.stack(parts)
