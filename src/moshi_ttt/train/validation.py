"""The validation loss during training: moshi-finetune's loss on held-out documents.

The held-out documents (`data.eval_data`, of the training data's kind) are cut once into
rows of the training length, in order, packed as in training (each document its own fast
weights), at most `max_rows` of them; the frames that fill no whole row are left out. Every
evaluation reads the same rows with the model in eval mode: each process a share, the
weighted sums reduced, so the loss is the same on any number of processes. Every process
runs as many forwards (a sharded model's forward is a collective): one short of rows
scores a copy of a row with weight 0.
"""

import typing as tp

import torch

from .batches import DocumentSource, SequenceBatcher
from .distributed import Distributed
from .loss import loss_weights, weighted_losses


class ValidationSet:
    def __init__(self, source: DocumentSource, frames: int, max_rows: int):
        if len(source) == 0:
            raise ValueError("data.eval_data has no documents")
        total = sum(source.num_frames(i) for i in range(len(source)))
        if total < frames:
            raise ValueError(f"data.eval_data holds {total} frames, less than one row of {frames}")
        batcher = SequenceBatcher(source, frames, shuffle=False)
        self.plans = [batcher.plan_row() for _ in range(min(max_rows, total // frames))]
        self.batcher = batcher

    def __len__(self) -> int:
        return len(self.plans)

    @torch.no_grad()
    def losses(self, lm, dist: Distributed, batch_size: int, first_codebook_weight_multiplier: float,
               text_padding_weight: float, autocast: tp.Callable[[], tp.ContextManager]) -> dict[str, float]:
        """{"loss", "text_loss", "audio_loss"} of `lm` over every row (weighted means, as in training)."""
        from ..models.convert import document_segments
        was_training = lm.training
        lm.eval()
        sums = torch.zeros(4, device=dist.device)  # text, audio, and their weight totals
        try:
            mine = self.plans[dist.rank::dist.world_size]
            share = -(-len(self.plans) // dist.world_size)
            counted = [True] * len(mine) + [False] * (share - len(mine))
            mine = mine + self.plans[:share - len(mine)]
            for start in range(0, share, batch_size):
                rows = [self.batcher.load_row(plan) for plan in mine[start:start + batch_size]]
                codes = torch.stack([c for c, _ in rows]).to(dist.device)
                segments = torch.stack([s for _, s in rows]).to(dist.device)
                weights = loss_weights(lm, codes, first_codebook_weight_multiplier, text_padding_weight)
                kept = torch.tensor(counted[start:start + batch_size], device=dist.device)
                weights = weights.masked_rows(kept)
                with autocast(), document_segments(lm, segments):
                    parts = weighted_losses(lm(codes), codes, weights)
                sums += torch.cat([parts, weights.totals()])
        finally:
            lm.train(was_training)
        text, audio, text_total, audio_total = dist.all_reduce_sum(sums).tolist()
        text, audio = text / max(text_total, 1e-6), audio / max(audio_total, 1e-6)
        return {"loss": text + audio, "text_loss": text, "audio_loss": audio}
