"""Recall of stated facts: does the model answer a question from a fact attention has lost?

Each question is scored at its answer frame from the text logits of a whole-document
forward (each document from fresh fast weights): top-1 correct, the answer's
cross-entropy, p(correct value), and the mean probability of the *other* open values:
stated in the same document and not yet answered (a model that knows which values
were stated can rule out those it has already heard as answers). The ratio of the two,
the key-addressing ratio, tells recall by key (ratio >> 1) from a bag of stated values
(ratio ~ 1). Such a bag is capped at the bag ceiling, the mean of 1/#open values over
the questions (H_n / n for n facts: 40.8% for 6). Chance is 1/#values.

Results are broken down by the distance from statement to answer, in frames and
in multiples of the attention context (beyond layers x context, the stacked
receptive field, no chain of attention reaches the statement), and by the number
of facts in the document.
"""

import csv
import json
import math
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.synthetic import Fact, SyntheticDocuments
from ..utils.atomic import atomic_file

# Distance bin edges, in attention contexts.
CONTEXT_EDGES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class RecallSet:
    """Documents ([K, T] codes each), the facts each one asks, and the number of possible values."""
    name: str
    documents: list[torch.Tensor]
    facts: list[list[Fact]]
    num_values: int

    @property
    def num_questions(self) -> int:
        return sum(len(f) for f in self.facts)


@dataclass
class Answer:
    """The outcome of one question."""
    correct: bool
    cross_entropy: float
    p_correct: float
    p_other: float  # mean p of the other open values (stated, not yet answered); NaN if none
    distance: int
    facts: int
    open_values: int  # values stated and not yet answered, the correct one included
    group: str = ""  # the recall set it comes from


def synthetic_recall_set(lm, *, documents: int, frames: int, pairs: int, spacing: int,
                         speaker: str = "text", audio: str = "noise", seed: int = 0,
                         max_frames: int | None = None) -> RecallSet:
    """Held-out synthetic documents (the "eval" split) in `lm`'s stream layout, each of
    `frames` frames, or of frames .. max_frames."""
    source = SyntheticDocuments(documents, frames, pairs, num_codebooks=lm.num_codebooks, dep_q=lm.dep_q,
                                card=lm.card, text_card=lm.text_card, text_padding_id=lm.text_padding_token_id,
                                spacing=spacing, speaker=speaker, audio=audio, seed=seed, split="eval",
                                max_frames=max_frames)
    length = f"{frames}" if max_frames is None else f"{frames}-{max_frames}"
    return RecallSet(f"{pairs} facts, {length} frames", [source[i] for i in range(documents)],
                     [source.facts(i) for i in range(documents)], len(source.value_ids))


FACTS_FILE = "facts.json"


def code_recall_set(directory: str | Path, num_codebooks: int) -> RecallSet:
    """Recall questions on .npy code documents, annotated in `directory`/facts.json:

        {"num_values": 56, "documents": {"doc.npy": [{"key": 8, "value": 70, "stated_frame": 1,
                                                     "answer_frame": 120}, ...], ...}}

    `stated_frame` is the frame of the statement's key (its value follows), `answer_frame`
    the frame whose text token is the value; `num_values` the number of possible values
    (chance is its inverse). Documents without an entry are not scored.
    """
    from ..data.code_files import CodeFiles
    files = CodeFiles(directory, num_codebooks)
    path = Path(directory) / FACTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: recall on code files needs their facts")
    try:
        spec = json.loads(path.read_text())
        num_values, entries = int(spec["num_values"]), spec["documents"]
        if num_values < 1 or not isinstance(entries, dict):
            raise ValueError(f"num_values={num_values!r}, documents of type {type(entries).__name__}")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: expected {{'num_values': N >= 1, 'documents': {{name: [fact, ...]}}}} "
                         f"({error})") from error
    names = {p.name: i for i, p in enumerate(files.paths)}
    unknown = sorted(set(entries) - set(names))
    if unknown:
        raise ValueError(f"{path} names documents that {directory} does not hold: {unknown[:5]}")
    documents, facts = [], []
    for name, listed in entries.items():
        codes = files[names[name]]
        doc_facts = []
        for i, item in enumerate(listed):
            try:
                fact = Fact(int(item["key"]), int(item["value"]), int(item["stated_frame"]), int(item["answer_frame"]))
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}: {name} fact {i}: expected key, value, stated_frame, answer_frame "
                                 f"({error})") from error
            if not 0 <= fact.stated_frame < fact.answer_frame - 1 < codes.shape[1] - 1:
                raise ValueError(f"{path}: {name} fact {i}: expected 0 <= stated_frame < answer_frame - 1 "
                                 f"(the stated value before the answer) < {codes.shape[1] - 1}, got {fact}")
            if int(codes[0, fact.answer_frame]) != fact.value:
                raise ValueError(f"{path}: {name} fact {i}: the text token at frame {fact.answer_frame} is "
                                 f"{int(codes[0, fact.answer_frame])}, not the value {fact.value}")
            doc_facts.append(fact)
        documents.append(codes)
        facts.append(doc_facts)
    recall_set = RecallSet(Path(directory).name, documents, facts, num_values)
    if not recall_set.num_questions:
        raise ValueError(f"{path} lists no question")
    return recall_set


@torch.no_grad()
def answer_questions(lm, recall_set: RecallSet, batch_size: int = 16) -> list[Answer]:
    """Every question of `recall_set` scored by `lm` (in eval mode, restored after)."""
    return score_documents(lm, recall_set, batch_size)[0]


@torch.no_grad()
def score_documents(lm, recall_set: RecallSet, batch_size: int = 16, filler_id: int | None = None
                    ) -> tuple[list[Answer], np.ndarray | None]:
    """Every question of `recall_set` scored by `lm`, and with `filler_id` (the text token of
    frames that say nothing: padding) the mean text cross-entropy at each frame over the
    documents whose text there is that token, NaN where none is; None without."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected an integer >= 1")
    device = next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    answers = []
    frames = max(d.shape[1] for d in recall_set.documents)
    sums, counts = np.zeros(frames), np.zeros(frames)
    try:
        by_length: dict[int, list[int]] = {}
        for i, doc in enumerate(recall_set.documents):
            by_length.setdefault(doc.shape[1], []).append(i)
        for indices in by_length.values():
            for start in range(0, len(indices), batch_size):
                batch = indices[start:start + batch_size]
                codes = torch.stack([recall_set.documents[i] for i in batch]).to(device)
                log_p = lm(codes).text_logits[:, 0].float().log_softmax(-1)  # [B, T, text_card]
                for row, i in enumerate(batch):
                    answers += _score(log_p[row], recall_set.facts[i], recall_set.name)
                if filler_id is not None:
                    truth = codes[:, 0]
                    ce = -log_p.gather(-1, truth.clamp(min=0)[..., None])[..., 0]
                    filler = truth == filler_id
                    T = truth.shape[1]
                    sums[:T] += (ce * filler).sum(0).cpu().numpy()
                    counts[:T] += filler.sum(0).cpu().numpy()
    finally:
        lm.train(was_training)
    if filler_id is None:
        return answers, None
    return answers, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def worst_excess(loss: tp.Sequence[float], baseline: tp.Sequence[float], span: int) -> dict[str, float]:
    """How far `loss` rises above `baseline` (per frame, NaN where not measured), in means over
    windows of `span` frames: the worst window's excess (nats; <= 0: nowhere above) and its start."""
    a, b = np.asarray(loss, dtype=float), np.asarray(baseline, dtype=float)
    n = min(len(a), len(b)) // span
    diff = (a[:n * span] - b[:n * span]).reshape(n, span)
    measured = ~np.isnan(diff)
    means = np.where(measured.any(1), np.nansum(diff, 1) / np.maximum(measured.sum(1), 1), -np.inf)
    worst = int(means.argmax())
    return {"max_excess": float(means[worst]), "at_frame": worst * span, "span": span}


def _score(log_p: torch.Tensor, facts: list[Fact], group: str) -> list[Answer]:
    asked = sorted(facts, key=lambda f: f.answer_frame)
    out = []
    for j, fact in enumerate(asked):
        row = log_p[fact.answer_frame]
        # Still open: stated before this answer, not answered yet, and not this answer's value.
        others = sorted({f.value for f in asked[j + 1:]
                         if f.stated_frame + 1 < fact.answer_frame and f.value != fact.value})
        p = row.exp()
        out.append(Answer(
            correct=int(row.argmax()) == fact.value,
            cross_entropy=float(-row[fact.value]),
            p_correct=float(p[fact.value]),
            p_other=float(p[others].mean()) if others else float("nan"),
            distance=fact.distance,
            facts=len(facts),
            open_values=len(others) + 1,
            group=group))
    return out


def attention_reach(lm) -> dict[str, int | None]:
    """The attention context of `lm` and how far a chain of attention reaches (layers x context)."""
    context = lm.transformer.layers[0].self_attn.context
    return {"context": context, "receptive_field": context * len(lm.transformer.layers) if context else None}


def summarize(answers: list[Answer], *, num_values: int, context: int | None,
              receptive_field: int | None = None) -> dict[str, tp.Any]:
    """Accuracy, CE, p(correct), p(other open value), their ratio, chance and bag ceiling, and the
    same by distance bin and by number of facts."""
    if not answers:
        raise ValueError("no question to summarize")
    summary = _stats(answers)
    summary.update(chance=1 / num_values, bag_ceiling=float(np.mean([1 / a.open_values for a in answers])),
                   context=context, receptive_field=receptive_field,
                   distance_min=min(a.distance for a in answers), distance_max=max(a.distance for a in answers))
    summary["by_distance"] = [dict(lo=lo, hi=hi, lo_contexts=lo_c, hi_contexts=hi_c, **_stats(group))
                              for (lo, hi, lo_c, hi_c), group in _distance_bins(answers, context)]
    summary["by_facts"] = {str(n): _stats([a for a in answers if a.facts == n])
                           for n in sorted({a.facts for a in answers})}
    groups = list(dict.fromkeys(a.group for a in answers))
    summary["by_group"] = {g: _stats([a for a in answers if a.group == g]) for g in groups}
    return summary


def _stats(answers: list[Answer]) -> dict[str, float]:
    """The means over `answers`; p_other and the ratio over the answers that have other open values."""
    paired = [a for a in answers if not math.isnan(a.p_other)]
    mean_other = float(np.mean([a.p_other for a in paired])) if paired else float("nan")
    paired_correct = float(np.mean([a.p_correct for a in paired])) if paired else float("nan")
    return {
        "questions": len(answers),
        "accuracy": float(np.mean([a.correct for a in answers])),
        "cross_entropy": float(np.mean([a.cross_entropy for a in answers])),
        "p_correct": float(np.mean([a.p_correct for a in answers])),
        "p_other": mean_other,
        "key_addressing_ratio": paired_correct / mean_other if paired and mean_other > 0 else float("nan"),
    }


def _distance_bins(answers: list[Answer], context: int | None):
    """(lo, hi, lo / context, hi / context) and the answers with lo <= distance < hi, non-empty bins only."""
    if not context:
        yield (0, max(a.distance for a in answers) + 1, None, None), answers
        return
    edges = list(CONTEXT_EDGES)
    while edges[-1] * context <= max(a.distance for a in answers):
        edges.append(edges[-1] * 2)
    for lo_c, hi_c in zip(edges[:-1], edges[1:]):
        group = [a for a in answers if lo_c * context <= a.distance < hi_c * context]
        if group:
            yield (lo_c * context, hi_c * context, lo_c, hi_c), group


def write_recall(results: dict[str, dict[str, tp.Any]], out: Path) -> list[Path]:
    """recall.json, recall.csv (one row per model and distance bin) and recall.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "recall.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    with atomic_file(out / "recall.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        columns = ["questions", "accuracy", "cross_entropy", "p_correct", "p_other", "key_addressing_ratio"]
        writer.writerow(["model", "distance_lo", "distance_hi", "contexts_lo", "contexts_hi"] + columns)
        for model, summary in results.items():
            writer.writerow([model, "all", "", "", ""] + [_fmt(summary[c]) for c in columns])
            for b in summary["by_distance"]:
                writer.writerow([model, b["lo"], b["hi"], b["lo_contexts"], b["hi_contexts"]]
                                + [_fmt(b[c]) for c in columns])
    plot = out / "recall.png"
    plot_recall(results, plot)
    return [plot]


def plot_recall(results: dict[str, dict[str, tp.Any]], path: Path) -> None:
    """Accuracy against the distance from statement to answer, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    first = next(iter(results.values()))
    for model, summary in results.items():
        bins = summary["by_distance"]
        x = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.plot(x, [100 * b["accuracy"] for b in bins], marker="o", label=model)
    ax.axhline(100 * first["chance"], color="gray", linestyle=":", label=f"chance ({100 * first['chance']:.1f}%)")
    ax.axhline(100 * first["bag_ceiling"], color="gray", linestyle="--",
               label=f"bag-of-values ceiling ({100 * first['bag_ceiling']:.1f}%)")
    if first.get("context"):
        ax.axvline(first["context"], color="black", linewidth=1, label=f"attention context ({first['context']})")
    if first.get("receptive_field"):
        ax.axvline(first["receptive_field"], color="black", linestyle="--", linewidth=1,
                   label=f"layers x context ({first['receptive_field']})")
    ax.set_xlabel("distance from statement to answer (frames, bin centres)")
    ax.set_ylabel("top-1 accuracy at the answer (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdict(results: dict[str, dict[str, tp.Any]], title: str) -> str:
    """A short table of the headline figures of each model, with chance and the bag ceiling."""
    first = next(iter(results.values()))
    lines = [title,
             f"distances {first['distance_min']}-{first['distance_max']} frames"
             + (f" ({first['distance_min'] / first['context']:.1f}-{first['distance_max'] / first['context']:.1f}"
                f" attention contexts of {first['context']})" if first.get("context") else "")
             + (f"; layers x context = {first['receptive_field']}" if first.get("receptive_field") else ""),
             f"{'model':<44} {'top-1':>7} {'answer CE':>10} {'p(correct)':>11} {'p(other)':>9} {'ratio':>8}"]
    for model, s in results.items():
        lines.append(f"{model:<44} {100 * s['accuracy']:>6.1f}% {s['cross_entropy']:>10.3f} "
                     f"{s['p_correct']:>11.3f} {s['p_other']:>9.4f} {s['key_addressing_ratio']:>8.3g}")
    lines.append(f"chance 1/{round(1 / first['chance'])} = {100 * first['chance']:.1f}%; "
                 f"bag-of-values ceiling {100 * first['bag_ceiling']:.1f}%; "
                 "ratio = p(correct) / p(another stated value not yet answered), over the questions "
                 "that have one")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def distance_table(results: dict[str, dict[str, tp.Any]], title: str) -> str:
    """Top-1 recall and the key-addressing ratio of each model by distance bin: the bins of
    `by_distance_all_lengths` (documents of every length scored, merged)."""
    first = next(s for s in results.values() if "by_distance_all_lengths" in s)
    bins = [(b["lo"], b["hi"]) for b in first["by_distance_all_lengths"]]
    cells = [f"{lo}-{hi}" for lo, hi in bins]
    lines = [title, f"{'statement to answer (frames)':<44} " + " ".join(f"{c:>9}" for c in cells)]
    for model, summary in results.items():
        if "by_distance_all_lengths" not in summary:
            continue
        by_bin = {(b["lo"], b["hi"]): b for b in summary["by_distance_all_lengths"]}
        lines.append(f"{model + ', top-1':<44} " + " ".join(
            f"{100 * by_bin[b]['accuracy']:>8.1f}%" if b in by_bin else f"{'-':>9}" for b in bins))
        lines.append(f"{model + ', ratio':<44} " + " ".join(
            f"{by_bin[b]['key_addressing_ratio']:>9.3g}" if b in by_bin else f"{'-':>9}" for b in bins))
    lines.append(f"chance {100 * first['chance']:.1f}%; documents of {', '.join(first['by_length'])} the "
                 f"trained length ({', '.join(str(s['frames']) for s in first['by_length'].values())} frames)")
    return "\n".join(lines)
