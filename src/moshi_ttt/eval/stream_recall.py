"""Recall over a long conversation: many documents in one stream, never a reset.

A stream concatenates N held-out documents; the model reads it through moshi's
streaming state (KV cache and fast weights carried from one window to the next, as
in a live conversation), and every document's questions are scored as in
`eval.recall`, at their answer frames. A stream's documents may have any lengths (topics
of a conversation have no fixed length). Keys repeat across documents with new values,
as facts change in a conversation: a memory that keeps every old answer fails here
where one document at a time succeeds. Reported per document index (how recall
holds as the stream grows) and per frame (the text loss of the whole stream, to
set against a baseline trained without TTT).
"""

import csv
import json
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.convert import ttt_layers
from ..utils.atomic import atomic_file
from .recall import Answer, RecallSet, _score, _stats, worst_excess
from .teacher_forcing import delayed_inputs, widen_kv_caches


@dataclass
class StreamScores:
    """The answers of each document of the streams, and the text loss at every frame."""
    answers: list[list[Answer]]  # [document index] -> the answers of every stream's document there
    text_loss: np.ndarray        # [frames] mean over streams of the text cross-entropy at each frame
    document_starts: list[int]   # the mean over streams of the frame where each document starts
    document_text_loss: list[float]  # mean over streams of each document's mean text cross-entropy
    fast_weight_norms: dict[str, list[float]]  # per TTT layer: the largest ||W - W0||_F after each document
    frames: int                  # frames of the longest stream


def stream_documents(recall_set: RecallSet, documents_per_stream: int) -> list[RecallSet]:
    """The recall set cut into streams of `documents_per_stream` documents, in order."""
    n = documents_per_stream
    if n < 1 or len(recall_set.documents) < n:
        raise ValueError(f"documents_per_stream={n}: expected 1 .. {len(recall_set.documents)} "
                         f"(the documents of {recall_set.name!r})")
    count = len(recall_set.documents) // n
    return [RecallSet(recall_set.name, recall_set.documents[s * n:(s + 1) * n], recall_set.facts[s * n:(s + 1) * n],
                      recall_set.num_values) for s in range(count)]


@torch.no_grad()
def score_streams(lm, streams: list[RecallSet], window: int) -> StreamScores:
    """Every stream read at once (one batch row each, shorter ones padded at their end), at
    most `window` frames at a time and cut at every document's end; every document's
    questions scored when its last frame has been read.

    The streams must have the same number of documents; their lengths may differ.
    """
    if window < 1:
        raise ValueError(f"window={window}: expected an integer >= 1")
    counts = {len(s.documents) for s in streams}
    if len(counts) != 1:
        raise ValueError(f"the streams hold {sorted(counts)} documents: every stream needs as many")
    if lm.delays[0] != 0:
        raise ValueError(f"the text stream has delay {lm.delays[0]}: stream recall expects Moshi's 0")
    device = next(lm.parameters()).device
    ends = [np.cumsum([d.shape[1] for d in s.documents]) for s in streams]  # [S, N]
    total = int(max(e[-1] for e in ends))
    codes = torch.stack([F.pad(torch.cat(s.documents, dim=1), (0, total - int(e[-1])), value=-1)
                         for s, e in zip(streams, ends)]).to(device)  # [S, K, T]
    inputs, _ = delayed_inputs(lm, codes)
    cuts = sorted({int(c) for e in ends for c in e} | set(range(window, total, window)) | {total})
    answer_frames = [{int(e[k] - d.shape[1]) + f.answer_frame for k, d in enumerate(s.documents) for f in s.facts[k]}
                     for s, e in zip(streams, ends)]
    rows: list[dict[int, torch.Tensor]] = [{} for _ in streams]  # stream -> {frame: log-probs there}
    text_loss = np.full((len(streams), total), np.nan)
    layers = ttt_layers(lm)
    norms: dict[str, list[list[float]]] = {name: [[] for _ in streams] for name, _ in layers}
    answers: list[list[Answer]] = [[] for _ in range(len(streams[0].documents))]
    was_training = lm.training
    lm.eval()
    try:
        with lm.streaming(len(streams)):
            if window > 1:
                widen_kv_caches(lm, window)
            start = 0
            for end in tqdm(cuts, desc="recall over a stream", unit="window"):
                _, logits = lm.forward_text(inputs[:, :, start:end])
                log_p = logits[:, 0].float().log_softmax(-1)  # [S, end - start, text_card]
                truth = codes[:, 0, start:end]
                ce = -log_p.gather(-1, truth.clamp(min=0)[..., None])[..., 0]
                text_loss[:, start:end] = torch.where(truth >= 0, ce, torch.nan).cpu().numpy()
                for s, stream in enumerate(streams):
                    for t in range(start, end):
                        if t in answer_frames[s]:
                            rows[s][t] = log_p[s, t - start]
                    finished = np.flatnonzero(ends[s] == end)
                    for k in finished:
                        offset = int(ends[s][k]) - stream.documents[k].shape[1]
                        local = {t - offset: row for t, row in rows[s].items() if t >= offset}
                        answers[k] += _score(local, stream.facts[k], stream.name)
                        rows[s] = {}
                        for name, layer in layers:
                            if layer.ttt_active:
                                norms[name][s].append(float(layer.fast_weight_change_norms()[s]))
                start = end
    finally:
        lm.train(was_training)
    starts = [[int(e[k]) - d.shape[1] for k, d in enumerate(s.documents)] for s, e in zip(streams, ends)]
    document_loss = [float(np.mean([np.nanmean(text_loss[s, starts[s][k]:int(ends[s][k])]) for s in range(len(streams))]))
                     for k in range(len(answers))]
    return StreamScores(answers, np.nanmean(text_loss, axis=0), [int(np.mean(c)) for c in zip(*starts)],
                        document_loss, {name: [max(v) for v in zip(*per_stream)]
                                        for name, per_stream in norms.items() if per_stream[0]}, total)


def stream_recall(lm, streams: list[RecallSet], window: int) -> dict[str, tp.Any]:
    """`score_streams` summarized: what the eval command, the trainer and the benchmark report."""
    return dict(summarize_streams(score_streams(lm, streams, window), num_values=streams[0].num_values,
                                  streams=len(streams)), documents=streams[0].name)


def summarize_streams(scores: StreamScores, *, num_values: int, streams: int) -> dict[str, tp.Any]:
    """Recall per document index, the text loss per document, and the headline: recall of
    the last document, of the last quarter, and the first document's (a fresh memory)."""
    per_document = [dict(index=k, start_frame=start, **_stats(a), text_loss=loss)
                    for k, (a, start, loss) in enumerate(zip(scores.answers, scores.document_starts,
                                                             scores.document_text_loss))]
    last_quarter = [a for doc in scores.answers[-max(1, len(scores.answers) // 4):] for a in doc]
    return {
        "streams": streams,
        "documents_per_stream": len(scores.answers),
        "frames": scores.frames,
        "chance": 1 / num_values,
        "first_document": _stats(scores.answers[0]),
        "last_document": _stats(scores.answers[-1]),
        "last_quarter": _stats(last_quarter),
        "all": _stats([a for doc in scores.answers for a in doc]),
        "text_loss_mean": float(np.nanmean(scores.text_loss)),
        "fast_weight_norms": scores.fast_weight_norms,
        "fast_weight_norm_max": {k: max(v) for k, v in scores.fast_weight_norms.items()},
        "per_document": per_document,
        "text_loss": [round(float(v), 5) for v in scores.text_loss],
    }


def text_loss_excess(results: dict[str, dict[str, tp.Any]], model: str, baseline: str,
                     span: int) -> dict[str, float]:
    """How far `model`'s text loss rises above `baseline`'s, in means over spans of `span` frames:
    the worst span's excess (nats; <= 0: nowhere above) and where it starts."""
    return worst_excess(results[model]["text_loss"], results[baseline]["text_loss"], span)


def write_stream_recall(results: dict[str, dict[str, tp.Any]], out: Path) -> list[Path]:
    """recall_stream.json, recall_stream.csv (one row per model and document index), recall_stream.png."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "recall_stream.json") as tmp:
        tmp.write_text(json.dumps(results))
    with atomic_file(out / "recall_stream.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        columns = ["questions", "accuracy", "cross_entropy", "p_correct", "p_other", "text_loss"]
        writer.writerow(["model", "document", "start_frame"] + columns)
        for model, summary in results.items():
            for d in summary["per_document"]:
                writer.writerow([model, d["index"], d["start_frame"]] + [f"{d[c]:.6g}" for c in columns])
    plot = out / "recall_stream.png"
    plot_stream_recall(results, plot)
    return [plot]


def plot_stream_recall(results: dict[str, dict[str, tp.Any]], path: Path) -> None:
    """Recall per document index (top) and the text loss along the stream (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    first = next(iter(results.values()))
    for model, s in results.items():
        x = [d["start_frame"] for d in s["per_document"]]
        top.plot(x, [100 * d["accuracy"] for d in s["per_document"]], marker=".", label=model)
        loss = np.asarray(s["text_loss"])
        span = max(1, len(loss) // len(s["per_document"]))
        n = len(loss) // span
        bottom.plot(np.arange(n) * span, loss[:n * span].reshape(n, span).mean(1), label=model)
    top.axhline(100 * first["chance"], color="gray", linestyle=":", label=f"chance ({100 * first['chance']:.1f}%)")
    top.set_ylabel("top-1 recall of each document's facts (%)")
    top.set_ylim(-2, 102)
    bottom.set_ylabel("text cross-entropy\n(mean over each document)")
    bottom.set_xlabel(f"frame of the stream where the document starts ({first['streams']} streams of "
                      f"{first['documents_per_stream']} documents, no reset)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stream_verdict(results: dict[str, dict[str, tp.Any]]) -> str:
    """A short table: recall of the first, the last and the last quarter's documents, and the text loss."""
    first = next(iter(results.values()))
    kind = f" of {first['documents']}" if "documents" in first else ""
    lines = [f"recall over streams of {first['documents_per_stream']} documents{kind} ({first['frames']} frames, "
             f"{first['streams']} streams, no reset):",
             f"{'model':<44} {'first doc':>9} {'last doc':>9} {'last 1/4':>9} {'text CE':>8}"]
    for model, s in results.items():
        lines.append(f"{model:<44} {100 * s['first_document']['accuracy']:>8.1f}% "
                     f"{100 * s['last_document']['accuracy']:>8.1f}% {100 * s['last_quarter']['accuracy']:>8.1f}% "
                     f"{s['text_loss_mean']:>8.3f}")
    lines.append(f"chance {100 * first['chance']:.1f}%")
    return "\n".join(lines)
