"""Training data: moshi-finetune's format, code files, and rows packed from documents."""

import json

import numpy as np
import pytest
import sphn
import torch

from assets import SR, random_mimi, write_conversation, write_tokenizer
from moshi_ttt.data.code_files import CodeFiles, tokenize_command
from moshi_ttt.data.finetune_data import FinetuneConversations, text_stream
from moshi_ttt.models import checkpoint_info
from moshi_ttt.train import TrainConfig, train
from moshi_ttt.train.batches import SequenceBatcher

def test_text_stream_follows_moshi_finetune():
    # Word A at 0.5 s (frame 6), two tokens; word B at 1.0 s (frame 12), one token.
    stream = text_stream([([11, 12], 0.5, 0.9), ([13], 1.0, 1.2)], 16, 12.5, padding_id=3, end_padding_id=0)
    assert stream == [3, 3, 3, 3, 3, 0, 11, 12, 3, 3, 3, 0, 13, 3, 3, 3]
    # A word that starts while the previous one is still being written replaces its rest.
    assert text_stream([([1, 2, 3], 0.0, 0.1), ([4], 0.09, 0.2)], 4, 12.5, 3, 0) == [1, 4, 3, 3]


def test_moshi_finetune_format_round_trip(finetune_data):
    model, data = finetune_data
    info = checkpoint_info(model)
    mimi, tokenizer = info.get_mimi(), info.get_text_tokenizer()
    source = FinetuneConversations(data / "train.jsonl", mimi, tokenizer, padding_id=3, end_padding_id=0,
                                   dep_q=2, num_codebooks=5)
    assert len(source) == 2 and source.num_frames(0) == 50
    codes = source[0]
    assert codes.shape == (5, 50)
    audio, _ = sphn.read(str(data / "a.wav"), sample_rate=SR)
    with torch.no_grad():
        expected = mimi.encode(torch.from_numpy(audio)[:, None])[:, :2]
    assert not torch.equal(expected[0], expected[1])  # the channels are told apart below
    assert torch.equal(codes[1:3], expected[0]) and torch.equal(codes[3:5], expected[1])
    kalo, suta = tokenizer.encode("kalo"), tokenizer.encode("suta")
    text = codes[0].tolist()
    assert text[6:6 + len(kalo)] == kalo and text[5] == 0
    assert text[25:25 + len(suta)] == suta and text[24] == 0
    assert set(text) - set(kalo) - set(suta) == {0, 3}  # the other speaker's word is not in the stream


def test_training_on_moshi_finetune_data(finetune_data, tmp_path):
    model, data = finetune_data
    config = TrainConfig.from_dict({
        "model": str(model), "max_steps": 2, "batch_size": 2, "seq_frames": 30, "ckpt_freq": 2,
        "run_dir": str(tmp_path / "run"), "ttt": {"every": 2, "chunk_size": 8},
        "data": {"source": "finetune", "train_data": str(data / "train.jsonl")}})
    losses = train(config)["losses"]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("problem,match", [
    ("missing", r"audio file not found: .*gone.wav"),
    ("mono", r"mono.wav has 1 channel\(s\): moshi-finetune data is stereo"),
    ("late", r"late.json: the word 'kalo' ends at 5.00 s, past the end of the audio \(2.00 s\)"),
    ("untranscribed", r"transcript not found for .*untranscribed.wav"),
    ("unreadable", r"cannot read audio file .*unreadable.wav"),
])
def test_bad_conversations_name_the_file(finetune_data, problem, match):
    model, data = finetune_data
    if problem == "missing":
        entry = {"path": "gone.wav", "duration": 2.0}
    elif problem == "mono":
        entry = write_conversation(data, "mono", 2.0, [], channels=1)
    elif problem == "late":
        entry = write_conversation(data, "late", 2.0, [["kalo", [4.5, 5.0], "SPEAKER_MAIN"]])
    elif problem == "untranscribed":
        entry = write_conversation(data, "untranscribed", 2.0, [])
        (data / "untranscribed.json").unlink()
    else:
        (data / "unreadable.wav").write_text("not audio")
        entry = {"path": "unreadable.wav", "duration": 2.0}
    (data / "bad.jsonl").write_text(json.dumps(entry) + "\n")
    source = FinetuneConversations(data / "bad.jsonl", random_mimi(64), write_tokenizer_for(data),
                                   padding_id=3, end_padding_id=0, dep_q=2, num_codebooks=5)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        source[0]


def write_tokenizer_for(directory):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(write_tokenizer(directory / "tok.model", 120)))


def test_bad_jsonl(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"path": "a.wav"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: expected \{\"path\": ..., \"duration\": ...\}"):
        FinetuneConversations(tmp_path / "x.jsonl", None, None, padding_id=3, end_padding_id=0, dep_q=2,
                              num_codebooks=5)
    with pytest.raises(FileNotFoundError, match="training data not found"):
        FinetuneConversations(tmp_path / "y.jsonl", None, None, padding_id=3, end_padding_id=0, dep_q=2,
                              num_codebooks=5)


def test_tokenize_command_writes_code_files(finetune_data, tmp_path):
    model, data = finetune_data
    mono = tmp_path / "audio"
    mono.mkdir()
    noise = np.random.default_rng(2).normal(size=(1, 3 * SR)).astype(np.float32) * 0.5
    sphn.write_wav(str(mono / "long.wav"), noise, SR)
    tokenize_command([str(mono), str(data / "a.wav"), "--out", str(tmp_path / "codes"), "--model", str(model),
                      "--device", "cpu"])
    files = CodeFiles(tmp_path / "codes", num_codebooks=5)
    assert [p.name for p in files.paths] == ["a.npy", "long.npy"]
    long = files[1]
    assert long.shape == (5, 38) and (long[0] == 3).all()
    mimi = checkpoint_info(model).get_mimi()
    stored, _ = sphn.read(str(mono / "long.wav"), sample_rate=SR)
    with torch.no_grad():
        heard, silence = mimi.encode(torch.from_numpy(np.stack([stored[0], np.zeros_like(stored[0])]))[:, None])
    assert torch.equal(long[1:3], heard[:2, :38]) and torch.equal(long[3:5], silence[:2, :38])
    assert not torch.equal(long[1:3], long[3:5])
    index = [json.loads(line) for line in (tmp_path / "codes" / "index.jsonl").read_text().splitlines()]
    assert [(e["path"], e["frames"]) for e in index] == [("long.npy", 38), ("a.npy", 50)]
    config = TrainConfig.from_dict({
        "max_steps": 2, "batch_size": 2, "seq_frames": 40, "ckpt_freq": 2, "run_dir": str(tmp_path / "run"),
        "ttt": {"every": 2, "chunk_size": 8},
        "data": {"source": "codes", "train_data": str(tmp_path / "codes")}})
    assert len(train(config)["losses"]) == 2


def test_code_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="code directory not found"):
        CodeFiles(tmp_path / "none", 5)
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="no .npy code files"):
        CodeFiles(tmp_path / "c", 5)
    np.save(tmp_path / "c" / "x.npy", np.zeros((3, 10), dtype=np.int16))
    with pytest.raises(ValueError, match=r"x.npy holds codes of shape \(3, 10\): expected \[5, frames\]"):
        CodeFiles(tmp_path / "c", 5)


class Documents:
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def num_frames(self, i):
        return self.lengths[i]

    def __getitem__(self, i):
        return torch.full((2, self.lengths[i]), i).long()


def test_rows_pack_short_documents_and_split_long_ones():
    batcher = SequenceBatcher(Documents([3, 10, 2]), frames=6, shuffle=False)
    codes, ids = batcher.next_rows(3)
    assert codes[:, 0].tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 2, 2, 0, 0, 0]]
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 2, 2, 2]]
    state = batcher.state_dict()
    more, _ = batcher.next_rows(2)
    batcher.load_state_dict(state)
    again, _ = batcher.next_rows(2)
    assert torch.equal(more, again)


def test_whole_documents_are_never_split_across_rows():
    """Short documents go whole into a row, the rest of a row is padding (no token, its own id);
    only a document longer than a row is cut, and its last piece starts a row."""
    batcher = SequenceBatcher(Documents([3, 4, 2, 13, 1]), frames=6, shuffle=False, whole_documents=True)
    codes, ids = batcher.next_rows(5)
    assert codes[:, 0].tolist() == [[0, 0, 0, -1, -1, -1], [1, 1, 1, 1, 2, 2], [3] * 6, [3] * 6,
                                    [3, 4, 0, 0, 0, -1]]  # the next epoch begins
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0] * 6, [0] * 6, [0, 1, 2, 2, 2, 3]]
    assert (codes[:, 1] == codes[:, 0]).all()  # every stream padded alike


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_frame_of_every_document_is_trained_once_an_epoch(seed):
    lengths = np.random.default_rng(seed).integers(1, 30, size=40).tolist()

    class Numbered(Documents):
        def __getitem__(self, i):  # document i, frame t: 1000 i + t
            return (1000 * i + torch.arange(self.lengths[i]))[None].repeat(2, 1)

    batcher = SequenceBatcher(Numbered(lengths), frames=24, seed=seed, whole_documents=True)
    seen = []
    while batcher.epoch == 0:
        codes, ids = batcher.next_rows(1)
        row, doc_ids = codes[0, 0], ids[0]
        for piece in doc_ids.unique():
            frames = row[doc_ids == piece]
            if frames[0] < 0:
                assert (frames == -1).all() and doc_ids[-1] == piece  # padding, at the row's end
                continue
            document = int(frames[0]) // 1000
            assert (frames // 1000 == document).all() and (torch.diff(frames) == 1).all()
            if lengths[document] <= 24:
                assert len(frames) == lengths[document]  # whole
            seen += frames.tolist()
    expected = [1000 * i + t for i, n in enumerate(lengths) for t in range(n)]
    assert sorted(seen) == expected


def test_padding_has_no_loss():
    from moshi_ttt.train.loss import loss_weights
    from moshi_ttt import build_lm, tiny_lm_config
    lm = build_lm(tiny_lm_config())
    codes = torch.randint(0, 8, (1, lm.num_codebooks, 12))
    codes[:, :, 8:] = -1
    weights = loss_weights(lm, codes, 100.0, 0.5)
    assert (weights.text[..., 8:] == 0).all() and (weights.audio[..., 8:] == 0).all()
    assert (weights.text[..., :8] > 0).all()


def test_rows_are_shuffled_per_epoch_and_shared_between_processes():
    docs = Documents([4] * 6)
    a = SequenceBatcher(docs, frames=4, seed=1)
    b = SequenceBatcher(docs, frames=4, seed=1)
    first = a.next_rows(6)[0][:, 0, 0].tolist()
    assert sorted(first) == list(range(6)) and first != list(range(6))
    second = a.next_rows(6)[0][:, 0, 0].tolist()
    assert sorted(second) == list(range(6)) and second != first
    mine = b.next_rows(6, keep=lambda row: row % 2 == 1)[0][:, 0, 0].tolist()
    assert mine == first[1::2]
