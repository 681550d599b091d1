"""Fixed-length training rows cut from documents, with document ids for packing.

Documents are taken in a seeded order (reshuffled every epoch). A row of L
frames is filled from the current document onwards: a long document gives
several rows, short ones are packed together. With `whole_documents`, a document
that fits in a row is never cut across two: when the next one does not fit in
what is left of a row, the rest of the row is padding (moshi's "no token",
`PAD_CODE`: a zero embedding and no loss) and the document starts the next row;
only a document longer than a row is cut, into row-long pieces. Every piece in a
row gets its own document id, and the TTT layers give every id its own fast
weights, so a row never lets one document's fast weights reach another (nor a
piece of a long document reach the next piece).

The batcher's position is a small dict (`state_dict`), saved in checkpoints, so
a resumed run reads exactly the rows the interrupted one would have read.
"""

import typing as tp

import numpy as np
import torch


class DocumentSource(tp.Protocol):
    def __len__(self) -> int: ...

    def num_frames(self, index: int) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...  # [K, num_frames(index)] codes


PAD_CODE = -1  # moshi's zero_token_id: embedded as zeros, never a target
PADDING = -1  # the document index of a row's padding piece


class SequenceBatcher:
    """Rows [K, frames] with document ids [frames], from a `DocumentSource`."""

    def __init__(self, source: DocumentSource, frames: int, *, seed: int = 0, shuffle: bool = True,
                 whole_documents: bool = False):
        if len(source) == 0:
            raise ValueError("the training data has no documents")
        self.source = source
        self.frames = frames
        self.seed = seed
        self.shuffle = shuffle
        self.whole_documents = whole_documents
        self.epoch = 0
        self.cursor = 0  # position in this epoch's order
        self.offset = 0  # frames of the current document already used
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.source))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.source))

    def _advance_document(self) -> None:
        self.offset = 0
        self.cursor += 1
        if self.cursor == len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = self._epoch_order()

    def plan_row(self) -> list[tuple[int, int, int]]:
        """Advance by one row; return its pieces as (document, start frame, length), the
        padding as (PADDING, 0, length)."""
        pieces, filled = [], 0
        while filled < self.frames:
            index = int(self._order[self.cursor])
            available = self.source.num_frames(index) - self.offset
            if available <= 0:
                self._advance_document()
                continue
            if self.whole_documents and filled and available > self.frames - filled:
                pieces.append((PADDING, 0, self.frames - filled))  # the document starts the next row
                break
            length = min(available, self.frames - filled)
            pieces.append((index, self.offset, length))
            filled += length
            self.offset += length
            if self.offset >= self.source.num_frames(index):
                self._advance_document()
        return pieces

    def load_row(self, pieces: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        loaded = [self.source[i][:, start:start + n] for i, start, n in pieces if i != PADDING]
        if pieces[-1][0] == PADDING:
            loaded.append(torch.full((loaded[0].shape[0], pieces[-1][2]), PAD_CODE, dtype=loaded[0].dtype))
        codes = torch.cat(loaded, dim=1)
        ids = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor([n for _, _, n in pieces]))
        return codes, ids

    def next_rows(self, count: int, keep: tp.Callable[[int], bool] = lambda row: True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `count` rows of the stream, loading only those `keep(row)` selects.

        Returns codes [n, K, frames] and document ids [n, frames] of the kept rows.
        """
        plans = [self.plan_row() for _ in range(count)]
        rows = [self.load_row(plan) for i, plan in enumerate(plans) if keep(i)]
        return torch.stack([c for c, _ in rows]), torch.stack([s for _, s in rows])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self.offset = state["epoch"], state["cursor"], state["offset"]
        self._order = self._epoch_order()
