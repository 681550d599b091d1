"""Synthetic multi-stream documents that only a memory beyond attention can predict.

Each document states `pairs` key/value facts in the text stream at its start,
then fills with noise for longer than the attention context, then asks for each
fact again: the key comes back, and the value after it can only be predicted by
recalling the statement. Audio codebooks carry noise, and the user's first
codebook echoes the key when it is asked. Everything derives from (seed, index).
"""

import numpy as np
import torch


class SyntheticDocuments:
    """A fixed, seeded set of documents in a model's stream layout ([K, frames] codes)."""

    def __init__(self, num_documents: int, frames: int, pairs: int, *, num_codebooks: int, dep_q: int,
                 card: int, text_card: int, text_padding_id: int, seed: int = 0):
        # Statements take frames 1 .. 2*pairs, questions the last 2*pairs + 1 frames.
        if frames < 4 * pairs + 4:
            raise ValueError(f"data.synthetic.frames={frames}: too short for {pairs} pairs "
                             f"(needs >= {4 * pairs + 4})")
        self.key_ids = np.arange(8, 8 + (text_card - 8) // 2)
        self.value_ids = np.arange(8 + (text_card - 8) // 2, text_card)
        if len(self.key_ids) < pairs:
            raise ValueError(f"text_card={text_card} leaves {len(self.key_ids)} key tokens for {pairs} pairs")
        self.num_documents = num_documents
        self.frames = frames
        self.pairs = pairs
        self.num_codebooks = num_codebooks
        self.dep_q = dep_q
        self.card = card
        self.text_padding_id = text_padding_id
        self.seed = seed

    def __len__(self) -> int:
        return self.num_documents

    def num_frames(self, index: int) -> int:
        return self.frames

    def answer_positions(self) -> list[int]:
        """Frames whose text is a value that only the statements reveal."""
        first = self.frames - 2 * self.pairs
        return [first + 2 * i + 1 for i in range(self.pairs)]

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_documents:
            raise IndexError(f"synthetic document {index} out of range (0 .. {self.num_documents - 1})")
        rng = np.random.default_rng([self.seed, index])
        codes = rng.integers(0, self.card, size=(self.num_codebooks, self.frames))
        codes[0] = self.text_padding_id
        keys = rng.choice(self.key_ids, self.pairs, replace=False)
        values = rng.choice(self.value_ids, self.pairs)
        for i, (key, value) in enumerate(zip(keys, values)):
            codes[0, 1 + 2 * i] = key
            codes[0, 2 + 2 * i] = value
        user_first = 1 + self.dep_q
        for answer, i in zip(self.answer_positions(), rng.permutation(self.pairs)):
            codes[0, answer - 1] = keys[i]
            codes[0, answer] = values[i]
            if user_first < self.num_codebooks:
                codes[user_first, answer - 1] = keys[i] % self.card
        return torch.from_numpy(codes).long()
