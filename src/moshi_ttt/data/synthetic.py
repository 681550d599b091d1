"""Synthetic documents whose answers only a memory beyond attention can give.

A document states `pairs` key/value facts, one every `spacing` frames from its
start, then fills with frames that say nothing, then asks for every fact again
in a random order, one question every `spacing` frames up to its end: the key
comes back, and the value after it can only be predicted by recalling the
statement. Values are drawn without replacement, so no two facts of a document
share one.

Who speaks the facts (`speaker`):
- "text": the model's own text stream holds keys and values (statements,
  questions and answers); the user's audio is noise.
- "user": the user states the facts and asks the questions in their first audio
  codebook (key and value codes, silence elsewhere); the model answers in text,
  with the value's text token. A fact the user said is never in Moshi's text stream.

The audio codebooks that carry no fact hold uniform noise (`audio="noise"`, the
hardest case: nothing in them is predictable) or the silence code (`"silence"`).
With `max_frames`, each document's length is drawn from frames .. max_frames (more
or less filler between statements and questions), so that a model trained on
streams of them cannot learn where the next document starts. Every document
derives from (seed, split, index): the "eval" split is held out from the "train" split.
"""

from dataclasses import dataclass

import numpy as np
import torch

SPEAKERS = ("text", "user")
AUDIO = ("noise", "silence")
SPLITS = ("train", "eval")
FIRST_TEXT_ID = 8  # text tokens below this are moshi's special tokens (padding, end of padding, ...)
SILENCE_CODE = 0  # the user's audio codes between what they say (speaker "user")


@dataclass(frozen=True)
class Fact:
    """One key/value fact of a document: where it is stated and where it is asked."""
    key: int              # token (text) or code (user audio) of the key
    value: int            # the text token the answer must be
    stated_frame: int     # frame of the key of the statement (the value follows it)
    answer_frame: int     # frame whose text token is the answer (the question's key precedes it)

    @property
    def distance(self) -> int:
        """Frames from the stated value to the answer."""
        return self.answer_frame - (self.stated_frame + 1)


class SyntheticDocuments:
    """A fixed, seeded set of documents in a model's stream layout ([K, frames] codes)."""

    def __init__(self, num_documents: int, frames: int, pairs: int, *, num_codebooks: int, dep_q: int,
                 card: int, text_card: int, text_padding_id: int, spacing: int, speaker: str = "text",
                 audio: str = "noise", seed: int = 0, split: str = "train", max_frames: int | None = None):
        if speaker not in SPEAKERS:
            raise ValueError(f"data.synthetic.speaker={speaker!r}: expected one of {SPEAKERS}")
        if audio not in AUDIO:
            raise ValueError(f"data.synthetic.audio={audio!r}: expected one of {AUDIO}")
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        if not isinstance(spacing, int) or spacing < 2:
            raise ValueError(f"data.synthetic.spacing={spacing!r}: expected an integer >= 2 "
                             "(a key and its value take two frames)")
        needed = 2 * spacing * (pairs - 1) + 5
        if frames < needed:
            raise ValueError(f"data.synthetic.frames={frames}: too short for {pairs} pairs spaced {spacing} "
                             f"frames apart (needs >= {needed})")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < frames):
            raise ValueError(f"data.synthetic.max_frames={max_frames!r}: expected null or an integer >= "
                             f"data.synthetic.frames={frames}")
        text_ids = np.arange(FIRST_TEXT_ID, text_card)
        self.value_ids = text_ids[len(text_ids) // 2:]
        if speaker == "text":
            self.key_ids = text_ids[:len(text_ids) // 2]
        else:
            if num_codebooks < 2 + dep_q:
                raise ValueError(f"speaker 'user' needs a user audio stream: the model has {num_codebooks} "
                                 f"streams for {dep_q} of its own audio codebooks")
            codes = np.arange(SILENCE_CODE + 1, card)
            self.key_ids = codes[:len(codes) // 2]
            # A value code maps to the text token the model answers with.
            self.value_codes = codes[len(codes) // 2:][:len(self.value_ids)]
            self.value_ids = self.value_ids[:len(self.value_codes)]
        for what, ids in (("key", self.key_ids), ("value", self.value_ids)):
            if len(ids) < pairs:
                raise ValueError(f"data.synthetic.pairs={pairs}: the model's vocabulary leaves "
                                 f"{len(ids)} {what} tokens (speaker {speaker!r})")
        self.num_documents = num_documents
        self.frames = frames
        self.max_frames = max_frames
        self.pairs = pairs
        self.spacing = spacing
        self.speaker = speaker
        self.audio = audio
        self.num_codebooks = num_codebooks
        self.dep_q = dep_q
        self.card = card
        self.text_padding_id = text_padding_id
        self.seed = seed
        self.split = split

    def __len__(self) -> int:
        return self.num_documents

    def num_frames(self, index: int) -> int:
        if self.max_frames is None:
            return self.frames
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index, 1])
        return int(rng.integers(self.frames, self.max_frames + 1))

    @property
    def user_stream(self) -> int:
        """Index of the user's first audio codebook among the streams."""
        return 1 + self.dep_q

    def statement_frames(self) -> list[int]:
        """Frame of the key of each statement, in order."""
        return [1 + self.spacing * i for i in range(self.pairs)]

    def question_frames(self, frames: int | None = None) -> list[int]:
        """Frame of the key of each question in a document of `frames` (default: `frames`)
        frames, in order; the last answer is the last frame."""
        last = (frames or self.frames) - 2
        return [last - self.spacing * (self.pairs - 1 - j) for j in range(self.pairs)]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self._generate(index)[0]).long()

    def facts(self, index: int) -> list[Fact]:
        """The facts of document `index`, in the order they are asked."""
        return self._generate(index)[1]

    def _generate(self, index: int) -> tuple[np.ndarray, list[Fact]]:
        if not 0 <= index < self.num_documents:
            raise IndexError(f"synthetic document {index} out of range (0 .. {self.num_documents - 1})")
        frames = self.num_frames(index)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        codes = rng.integers(0, self.card, size=(self.num_codebooks, frames))
        if self.audio == "silence":
            codes[1:] = SILENCE_CODE
        codes[0] = self.text_padding_id
        keys = rng.choice(len(self.key_ids), self.pairs, replace=False)
        values = rng.choice(len(self.value_ids), self.pairs, replace=False)
        order = rng.permutation(self.pairs)
        statements, questions = self.statement_frames(), self.question_frames(frames)
        if self.speaker == "text":
            said = codes[0]
            key_tokens, value_tokens = self.key_ids[keys], self.value_ids[values]
        else:
            said = codes[self.user_stream]
            said[:] = SILENCE_CODE
            codes[self.user_stream + 1:] = SILENCE_CODE
            key_tokens, value_tokens = self.key_ids[keys], self.value_codes[values]
        facts = []
        for i, frame in enumerate(statements):
            said[frame], said[frame + 1] = key_tokens[i], value_tokens[i]
        for i, frame in zip(order, questions):
            said[frame] = key_tokens[i]
            codes[0, frame + 1] = self.value_ids[values[i]]
            facts.append(Fact(int(key_tokens[i]), int(self.value_ids[values[i]]), statements[i], frame + 1))
        return codes, facts
