"""One Markdown page with every table and plot of an evaluation."""

import shutil
import typing as tp
from pathlib import Path

from ..utils.atomic import atomic_file


def write_report(directory: Path, results: dict[str, tp.Any], plots: list[Path]) -> Path:
    """report.md (and copies of the plots) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        if plot.resolve().parent != directory.resolve():
            shutil.copy(plot, directory / plot.name)
    lines = ["# moshi-ttt evaluation", "", f"{results['environment']}", ""]
    lines += ["Models: " + ", ".join(f"`{name}` ({source})" for name, source in results["models"].items()), ""]

    recall = results.get("recall")
    if recall:
        lines += _recall_section(recall)
    stream = results.get("recall_stream")
    if stream:
        lines += _stream_section(stream)

    benchmarks = results.get("benchmarks", {})
    if benchmarks:
        names = sorted({b for per_model in benchmarks.values() for b in per_model})
        lines += ["## Spoken-LM benchmarks", "",
                  "Accuracy of the acceptable recording over the other, by log-likelihood of the model's audio "
                  "stream summed over tokens (sum) and divided by the token count (mean).", ""]
        header = ["model"] + [f"{b} {kind}" for b in names for kind in ("sum", "mean")]
        rows = []
        for model, per_model in benchmarks.items():
            row = [model]
            for b in names:
                for kind in ("sum", "mean"):
                    value = per_model.get(b, {}).get(f"accuracy_{kind}")
                    row.append("-" if value is None else f"{100 * value:.1f}")
            rows.append(row)
        lines += _table(header, rows)
        subsets = [(model, b, key, value) for model, per_model in benchmarks.items() for b, r in per_model.items()
                   for key, value in r.items() if key.startswith("accuracy_") and "/" in key]
        if subsets:
            lines += ["", "By subset:", ""]
            lines += _table(["model", "benchmark", "score", "accuracy"],
                            [[m, b, k.removeprefix("accuracy_"), f"{100 * v:.1f}"] for m, b, k, v in subsets])
        lines.append("")

    long_context = results.get("long_context")
    if long_context:
        lines += ["## Loss against position", "",
                  f"Attention context: {long_context['context']} frames. Audio cross-entropy (mean over the "
                  "model's codebooks) at chosen positions, the slope of a linear fit over all positions, and the "
                  "means of the first and last quarter.", ""]
        positions = long_context["positions"]
        header = ["model"] + [f"@{p}" for p in positions] + ["slope /1000 frames", "early", "late", "documents"]
        rows = []
        for model, s in long_context["summary"].items():
            at = s["audio_loss_at"]
            rows.append([model] + [f"{at[str(p)]:.3f}" if str(p) in at else "-" for p in positions]
                        + [f"{s['slope_per_1000_frames']:.4f}", f"{s['early_quarter_mean']:.3f}",
                           f"{s['late_quarter_mean']:.3f}", str(s["documents"])])
        lines += _table(header, rows)
        lines += ["", "Text cross-entropy (the text stream; padding included):", ""]
        rows = []
        for model, s in long_context["summary"].items():
            at = s.get("text_loss_at", {})
            rows.append([model] + [f"{at[str(p)]:.3f}" if str(p) in at else "-" for p in positions]
                        + [f"{s['text_loss_mean']:.3f}", f"{s['text_early_quarter_mean']:.3f}",
                           f"{s['text_late_quarter_mean']:.3f}"])
        lines += _table(["model"] + [f"@{p}" for p in positions] + ["mean", "early", "late"], rows)
        lines += ["", "![loss by position](loss_by_position.png)", ""]

    activity = results.get("activity")
    if activity:
        lines += ["## Fast-weight activity", "",
                  "Norm of eta * (W - W0) read from each TTT layer's streaming state at the end of each document.",
                  ""]
        rows = [[model, layer, f"{s['mean']:.4g}", f"{s['max']:.4g}", "yes" if a["active"] else "NO"]
                for model, a in activity.items() for layer, s in a["layers"].items()]
        lines += _table(["model", "layer", "mean", "max", "active"], rows) + [""]

    diagnostics = results.get("diagnostics")
    if diagnostics:
        lines += ["## TTT diagnostics", "",
                  "Per chunk: the TTT objective under W0 (l0), before the chunk's update (lprev) and after it "
                  "(lafter); the update's norm and the accumulated change's.", ""]
        rows = []
        for model, layers in diagnostics.items():
            for layer, stats in layers.items():
                rows.append([model, layer, str(len(stats["l0"])), f"{stats['l0'][-1]:.4g}",
                             f"{stats['lprev'][-1]:.4g}", f"{stats['lafter'][-1]:.4g}",
                             f"{stats['accumulated_norm'][-1]:.4g}"])
        lines += _table(["model", "layer", "chunks", "l0 (last)", "lprev (last)", "lafter (last)",
                         "accumulated norm"], rows) + [""]
        lines += [f"![{p.stem}]({p.name})" for p in plots if p.name.startswith("diagnostics_")] + [""]

    path = directory / "report.md"
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def _recall_section(recall: dict[str, dict[str, tp.Any]]) -> list[str]:
    first = next(iter(recall.values()))
    lines = ["## Recall of facts", "",
             f"Top-1 accuracy of the answer on held-out documents, its cross-entropy, p(correct value) and the "
             f"mean p of the other values stated in the document and not yet answered; their ratio is the "
             f"key-addressing ratio (~1: a bag of values, not recall). Chance {100 * first['chance']:.1f}%, "
             f"bag-of-values ceiling (the stated values, minus those already answered) "
             f"{100 * first['bag_ceiling']:.1f}%. Distances {first['distance_min']}-{first['distance_max']} frames; "
             f"attention context {first['context']}, layers x context {first['receptive_field']}. "
             "\"TTT off, same weights\" is a diagnostic, not a baseline.", ""]
    header = ["model", "top-1 %", "answer CE", "p(correct)", "p(other)", "ratio", "questions"]
    lines += _table(header, [[m, f"{100 * s['accuracy']:.1f}", f"{s['cross_entropy']:.3f}", f"{s['p_correct']:.3f}",
                              f"{s['p_other']:.4f}", f"{s['key_addressing_ratio']:.3g}", str(s["questions"])]
                             for m, s in recall.items()])
    groups = list(first["by_group"])
    if len(groups) > 1:
        lines += ["", "By set (top-1 %):", ""]
        lines += _table(["model"] + groups, [[m] + [f"{100 * s['by_group'][g]['accuracy']:.1f}" for g in groups]
                                             for m, s in recall.items()])
    bins = [(b["lo"], b["hi"]) for b in first["by_distance"]]
    lines += ["", "By distance from statement to answer (frames; top-1 %):", ""]
    lines += _table(["model"] + [f"{lo}-{hi}" for lo, hi in bins],
                    [[m] + [f"{100 * b['accuracy']:.1f}" for b in s["by_distance"]] for m, s in recall.items()])
    return lines + ["", "![recall by distance](recall.png)", ""]


def _stream_section(stream: dict[str, dict[str, tp.Any]]) -> list[str]:
    first = next(iter(stream.values()))
    lines = ["## Recall over a long conversation", "",
             f"{first['streams']} streams of {first['documents_per_stream']} held-out documents "
             f"({first['frames']} frames each), read without a reset: fast weights and KV cache carry from "
             f"one document to the next, and keys come back with new values. Top-1 recall of each "
             f"document's facts (chance {100 * first['chance']:.1f}%) and the stream's mean text cross-entropy; "
             "the worst excess is the largest amount by which a model's text loss, averaged over one "
             "document's span, exceeds the other model's.", ""]
    lines += _table(["model", "first document %", "last document %", "last quarter %", "text CE", "worst excess"],
                    [[m, f"{100 * s['first_document']['accuracy']:.1f}", f"{100 * s['last_document']['accuracy']:.1f}",
                      f"{100 * s['last_quarter']['accuracy']:.1f}", f"{s['text_loss_mean']:.3f}",
                      "; ".join(f"{e['max_excess']:+.3f} over {o} (frame {e['at_frame']})"
                                for o, e in s["text_loss_excess"].items()) or "-"]
                     for m, s in stream.items()])
    return lines + ["", "![recall over a stream](recall_stream.png)", ""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(row) + " |" for row in rows]
