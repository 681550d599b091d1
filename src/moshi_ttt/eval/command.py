"""`moshi-ttt eval`: recall of facts, loss against position, spoken-LM benchmarks, TTT
diagnostics, a report.

Every TTT model is also evaluated with TTT switched off (the same weights as a plain
Moshi). That is a diagnostic of how much the model leans on its fast weights, not a
baseline: a model trained with TTT breaks without it. The baseline is a model trained
the same way without TTT (`moshi-ttt train --set baseline=true`), given as another --model.
"""

import argparse
import collections
import contextlib
import datetime
import json
import typing as tp
from pathlib import Path

import yaml

from ..train.config import SyntheticConfig  # no torch: `--help` answers at once
from ..utils.atomic import atomic_dir, atomic_file


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default."""


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moshi-ttt eval", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH",
                        help="a TTT (or plain) Moshi checkpoint directory or HF repo, optionally labelled; "
                             "repeat to compare (default label: what the directory holds, ttt, ttt-mlp, "
                             "baseline or moshi, with the run's name where two would share one)")
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for the results (CSV, JSON, PNG), written once the evaluation is done")
    parser.add_argument("--report", type=Path, help="directory for a Markdown report of everything")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out (and --report) that already holds files")
    parser.add_argument("--no-ttt-off", action="store_true",
                        help="skip the TTT-off diagnostic (same weights, TTT switched off) of TTT models")
    recall = parser.add_argument_group("recall of facts (held-out synthetic documents)")
    recall.add_argument("--recall", action="store_true", help="score recall of stated facts")
    task = SyntheticConfig()  # the training defaults: the held-out documents of `moshi-ttt train`'s kind
    recall.add_argument("--recall-facts", type=int, nargs="+", default=[task.pairs], metavar="N",
                        help="facts per document; several values make several sets")
    recall.add_argument("--recall-frames", type=int, nargs="+", default=[task.frames], metavar="T",
                        help="frames per document: more frames, more filler between facts and questions")
    recall.add_argument("--recall-spacing", type=int, default=task.spacing,
                        help="frames between statements (and questions)")
    recall.add_argument("--recall-speaker", choices=["text", "user"], default=task.speaker,
                        help="who states the facts: the text stream, or the user's audio")
    recall.add_argument("--recall-audio", choices=["noise", "silence"], default=task.audio,
                        help="the audio codebooks that say no fact")
    recall.add_argument("--recall-documents", type=int, default=128, help="documents per set")
    recall.add_argument("--recall-seed", type=int, default=0, help="seed of the held-out documents")
    recall.add_argument("--recall-stream", type=int, default=0, metavar="N",
                        help="also: recall over streams of N documents read without a reset (a long "
                             "conversation; the first --recall-frames and --recall-facts), 0: off")
    recall.add_argument("--recall-streams", type=int, default=4, metavar="S",
                        help="streams for --recall-stream (one batch row each)")
    recall.add_argument("--recall-codes", type=Path, metavar="DIR",
                        help="instead: .npy code documents with their facts in DIR/facts.json "
                             "(see moshi_ttt.eval.recall.code_recall_set)")
    long = parser.add_argument_group("loss against position")
    long.add_argument("--long-audio", type=Path, nargs="*", default=[], help="long audio files or directories")
    long.add_argument("--long-codes", type=Path, help="a directory of pre-tokenised .npy documents")
    long.add_argument("--max-frames", type=int, help="score at most this many frames of each document")
    long.add_argument("--engine", choices=["window", "stream"], default="window",
                      help="window: whole windows in parallel (default); stream: frame by frame, as LMGen")
    long.add_argument("--window", type=int, help="frames per window (default: 4 chunks, within the context)")
    long.add_argument("--positions", type=int, nargs="*", default=[100, 1000, 3000, 6000, 10000, 20000])
    long.add_argument("--user", choices=["silence", "none"], default="silence",
                      help="user stream for mono audio: codes of silence, or no token")
    long.add_argument("--text", choices=["pad", "none"], default="pad",
                      help="text stream: padding tokens, or no token")
    bench = parser.add_argument_group("spoken-LM benchmarks")
    bench.add_argument("--zerospeech", type=Path, help="ZeroSpeech 2021 root (for sWUGGY and sBLIMP)")
    bench.add_argument("--split", default="dev", choices=["dev", "test"])
    bench.add_argument("--sstorycloze", type=Path, help="sStoryCloze directory")
    bench.add_argument("--tstorycloze", type=Path, help="tStoryCloze directory")
    diag = parser.add_argument_group("TTT diagnostics")
    diag.add_argument("--diagnostics-frames", type=int, default=0,
                      help="run the diagnostics on this many first frames of each long document (0: off)")
    parser.add_argument("--mimi-weight", type=Path, help="Mimi weights, if not in the checkpoint")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto", help="auto: cuda where there is a GPU, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto: bfloat16 on a GPU, else float32")
    return parser


def eval_command(argv: list[str]) -> dict[str, tp.Any]:
    args = eval_parser().parse_args(argv)
    args.labels = model_labels(args.model)
    for name in ("recall_documents", "recall_spacing", "recall_streams", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1")
    if args.recall_stream < 0:
        raise ValueError(f"--recall-stream={args.recall_stream}: expected a number of documents >= 1, or 0 (off)")
    args.recall = args.recall or args.recall_codes is not None or args.recall_stream > 0
    if not (args.recall or args.long_audio or args.long_codes or args.zerospeech or args.sstorycloze
            or args.tstorycloze):
        raise ValueError("nothing to evaluate: give --recall, --long-audio, --long-codes, --zerospeech, "
                         "--sstorycloze or --tstorycloze")
    if args.diagnostics_frames and not (args.long_audio or args.long_codes):
        raise ValueError("--diagnostics-frames runs on the long documents: give --long-audio or --long-codes")
    for option, path in (("--out", args.out), ("--report", args.report)):
        if path is not None and (problem := _unusable_output(path, args.overwrite)):
            raise ValueError(f"{option} {path}: {problem}")
    from ..models import checkpoint_info
    for _, source in args.labels:  # every model found before the first is evaluated
        checkpoint_info(source)
    import torch
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.dtype = ("bfloat16" if args.device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    return run_eval(args)


def _unusable_output(path: Path, overwrite: bool) -> str | None:
    """Why `path` cannot take the results (None: it can)."""
    if path.exists() and not path.is_dir():
        return "is a file, not a directory"
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if held and not overwrite:
        listed = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        return f"already holds {listed}; give another directory, or --overwrite to replace it"
    return None


def model_labels(sources: list[str]) -> list[tuple[str, str]]:
    """(label, source) of each --model [LABEL=]PATH; labels must differ.

    An unlabelled model is named by what it is (`checkpoint_kind`), with its run's name
    added where two models are of one kind; one whose kind cannot be read, by its name."""
    given: list[tuple[str | None, str]] = []
    for text in sources:
        label, sep, source = text.partition("=")
        plain_path = not sep or "/" in label or Path(text).exists()  # a path with "=" in it is still a path
        given.append((None, text) if plain_path else (label, source))
    kinds = {source: checkpoint_kind(Path(source)) for label, source in given if label is None}
    per_kind = collections.Counter(kinds.values())
    labelled = []
    for label, source in given:
        if label is None:
            path, kind = Path(source), kinds[source]
            name = (path.parent.name if path.name == "final" and path.parent.name else path.name) or source
            label = name if kind is None else kind if per_kind[kind] == 1 else f"{kind} ({name})"
        labelled.append((label, source))
    seen: dict[str, str] = {}
    for label, source in labelled:
        if label in seen:
            raise ValueError(f"--model: {seen[label]} and {source} both get the label {label!r}; "
                             f"name them, e.g. --model ttt={seen[label]} --model baseline={source}")
        seen[label] = source
    return labelled


def checkpoint_kind(path: Path) -> str | None:
    """ttt, ttt-mlp (or both, joined by +) for a saved TTT model; baseline for a plain Moshi
    that `moshi-ttt train` trained as one; moshi for another plain one; None where `path`
    has no readable config.json (a hub repo, a mistyped path: loading it will say)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    saved = config.get("ttt") if isinstance(config, dict) else None
    if saved is not None:
        methods = {c.get("method", "inplace") for c in (saved if isinstance(saved, list) else [saved])}
        return "+".join(sorted("ttt" if m == "inplace" else m.replace("_", "-") for m in methods))
    run_dir = path.parent if path.name == "final" else path
    try:
        trained = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return "moshi"
    return "baseline" if isinstance(trained, dict) and trained.get("baseline") is True else "moshi"


def run_eval(args: argparse.Namespace) -> dict[str, tp.Any]:
    """Evaluate every model; the results (and the report) appear only once all of it is done."""
    from .report import write_report
    with atomic_dir(args.out) as staging, _staged_report(args.report, args.out, staging) as report:
        results, plots = _evaluate(args, staging)
        if report is not None:
            write_report(report, results, plots)
        written = sorted(p.name for p in staging.iterdir())
    print("\n".join(_summary(results)))
    print(f"results in {args.out}: {', '.join(written)}")
    if args.report is not None:
        print(f"report: {args.report / 'report.md'}")
    return results


@contextlib.contextmanager
def _staged_report(report: Path | None, out: Path, staged_out: Path) -> tp.Iterator[Path | None]:
    """Where to write the report: in the staged --out when it lies inside --out, else staged apart."""
    inside = report is not None and report.resolve().is_relative_to(out.resolve())
    if report is None or inside:
        yield None if report is None else staged_out / report.resolve().relative_to(out.resolve())
        return
    with atomic_dir(report) as staged:
        yield staged


def _evaluate(args: argparse.Namespace, out: Path) -> tuple[dict[str, tp.Any], list[Path]]:
    """Score every model and write the results' files into `out`; (results, plots)."""
    import torch

    from ..models import set_ttt_enabled, ttt_layers
    from .benchmarks import score_pairs, storycloze_pairs, zerospeech_pairs
    from .diagnostics import activity, ttt_diagnostics, write_diagnostics
    from .long_context import evaluate_documents, write_curves
    from .stream_recall import stream_recall

    dtype = getattr(torch, args.dtype)
    results: dict[str, tp.Any] = {
        "environment": f"{_device_name(args.device)}, torch {torch.__version__}, {datetime.date.today()}",
        "models": {}, "benchmarks": {}, "activity": {}, "diagnostics": {}}
    benchmarks = _benchmark_pairs(args, zerospeech_pairs, storycloze_pairs)
    curves, plots, context, chunk_sizes = [], [], None, {}
    recall_results: dict[str, dict[str, tp.Any]] = {}
    stream_results: dict[str, dict[str, tp.Any]] = {}
    for name, source in args.labels:
        lm, info = _load(source, args.device, dtype)
        tokenizer = _audio_tokenizer(info, lm, args) if (benchmarks or args.long_audio) else None
        documents = _documents(args, lm, tokenizer)
        context = lm.transformer.layers[0].self_attn.context
        recall_sets = _recall_sets(args, lm) if args.recall else []
        streams = _recall_streams(args, lm) if args.recall_stream else []
        has_ttt = bool(ttt_layers(lm))
        variants = [(name, True)] + ([(f"{name} (TTT off, same weights)", False)]
                                     if has_ttt and not args.no_ttt_off else [])
        for label, enabled in variants:
            results["models"][label] = str(source)
            set_ttt_enabled(lm, enabled)
            if recall_sets:
                recall_results[label] = _recall(lm, recall_sets, args.batch_size)
            if streams:
                stream_results[label] = stream_recall(lm, streams, args.window or _default_window(lm, context))
            if documents:
                window = 1 if args.engine == "stream" else (args.window or _default_window(lm, context))
                curve = evaluate_documents(lm, documents, label, window=window, batch_size=args.batch_size,
                                           max_frames=args.max_frames)
                curves.append(curve)
                if has_ttt and enabled:
                    results["activity"][label] = activity(curve.fast_weight_change)
            for bench, pairs in benchmarks.items():
                results["benchmarks"].setdefault(label, {})[bench] = score_pairs(
                    lm, pairs, tokenizer.encode, batch_size=args.batch_size, name=f"{bench} ({label})")
            if has_ttt and enabled and documents and args.diagnostics_frames > 0:
                results["diagnostics"][label] = _diagnostics(lm, documents, args.diagnostics_frames,
                                                             args.device, ttt_diagnostics)
                chunk_sizes[label] = {name: layer.frames_per_update for name, layer in ttt_layers(lm)}
        set_ttt_enabled(lm, True)
        del lm
    if recall_results:
        from .recall import verdict, write_recall
        results["recall"] = recall_results
        plots += write_recall(recall_results, out)
        print(verdict(recall_results, "recall of facts on held-out documents:"))
    if stream_results:
        from .stream_recall import stream_verdict, text_loss_excess, write_stream_recall
        plots += write_stream_recall(stream_results, out)
        first = next(iter(stream_results.values()))
        span = first["frames"] // first["documents_per_stream"]  # one document's frames, on average
        results["recall_stream"] = {
            model: {**{k: v for k, v in s.items() if k != "text_loss"},
                    "text_loss_excess": {other: text_loss_excess(stream_results, model, other, span)
                                         for other in stream_results if other != model}}
            for model, s in stream_results.items()}
        print(stream_verdict(stream_results))
    if curves:
        results["long_context"] = write_curves(curves, out, positions=args.positions, context=context)
        plots.append(out / "loss_by_position.png")
        results["long_context"] = {k: v for k, v in results["long_context"].items() if k != "curves"}
    if results["diagnostics"]:
        plots += write_diagnostics(results["diagnostics"], out, chunk_sizes)
    if results["benchmarks"]:
        with atomic_file(out / "benchmarks.json") as tmp:
            tmp.write_text(json.dumps(results["benchmarks"], indent=1))
    with atomic_file(out / "results.json") as tmp:
        tmp.write_text(json.dumps({k: v for k, v in results.items() if k != "benchmarks"}, indent=1))
    return results, plots


def _summary(results: dict[str, tp.Any]) -> list[str]:
    """The headline figures of the benchmarks, the loss against position and the fast weights'
    activity, where measured (recall prints its own table)."""
    lines = []
    for model, per_benchmark in results["benchmarks"].items():
        scores = ", ".join(f"{b} {100 * r['accuracy_sum']:.1f}% (sum) {100 * r['accuracy_mean']:.1f}% (mean)"
                           for b, r in per_benchmark.items())
        lines.append(f"spoken-LM benchmarks, {model}: {scores} (chance 50%)")
    for model, s in results.get("long_context", {}).get("summary", {}).items():
        lines.append(f"loss against position, {model}: audio CE {s['early_quarter_mean']:.3f} in the first quarter, "
                     f"{s['late_quarter_mean']:.3f} in the last, slope {s['slope_per_1000_frames']:+.3f} per "
                     f"1000 frames ({s['documents']} documents)")
    for model, a in results["activity"].items():
        moved = ", ".join(f"{layer} {s['max']:.3g}" for layer, s in a["layers"].items())
        lines.append(f"fast weights of {model}: {'moved' if a['active'] else 'did not all move'} from W0 "
                     f"(largest change per layer: {moved})")
    return lines


def _recall_sets(args, lm) -> list:
    from .recall import code_recall_set, synthetic_recall_set
    if args.recall_codes is not None:
        return [code_recall_set(args.recall_codes, lm.num_codebooks)]
    return [synthetic_recall_set(lm, documents=args.recall_documents, frames=frames, pairs=pairs,
                                 spacing=args.recall_spacing, speaker=args.recall_speaker, audio=args.recall_audio,
                                 seed=args.recall_seed)
            for pairs in args.recall_facts for frames in args.recall_frames]


def _recall_streams(args, lm) -> list:
    from .recall import code_recall_set, synthetic_recall_set
    from .stream_recall import stream_documents
    needed = args.recall_stream * args.recall_streams
    if args.recall_codes is not None:
        source = code_recall_set(args.recall_codes, lm.num_codebooks)
    else:
        source = synthetic_recall_set(lm, documents=needed, frames=args.recall_frames[0], pairs=args.recall_facts[0],
                                      spacing=args.recall_spacing, speaker=args.recall_speaker,
                                      audio=args.recall_audio, seed=args.recall_seed)
    streams = stream_documents(source, args.recall_stream)
    return streams[:args.recall_streams]


def _recall(lm, recall_sets: list, batch_size: int) -> dict[str, tp.Any]:
    from .recall import answer_questions, attention_reach, summarize
    answers = [a for s in recall_sets for a in answer_questions(lm, s, batch_size=batch_size)]
    return summarize(answers, num_values=recall_sets[0].num_values, **attention_reach(lm))


def _load(source: str, device: str, dtype):
    from ..models import checkpoint_info, load_lm
    return load_lm(source, device=device, dtype=dtype).eval(), checkpoint_info(source)


def _audio_tokenizer(info, lm, args):
    from ..data.tokenize import AudioTokenizer
    if args.mimi_weight is not None:
        info.mimi_weights = args.mimi_weight
    return AudioTokenizer.from_checkpoint_info(info, device=args.device, user=args.user, text=args.text)


def _documents(args, lm, tokenizer) -> list:
    from ..data.code_files import CodeFiles, audio_files
    documents = []
    if args.long_codes is not None:
        files = CodeFiles(args.long_codes, lm.num_codebooks)
        documents += [files[i] for i in range(len(files))]
    if args.long_audio:
        documents += [tokenizer.encode_file(path) for path in audio_files(args.long_audio)]
    return documents


def _benchmark_pairs(args, zerospeech_pairs, storycloze_pairs) -> dict[str, list]:
    pairs = {}
    if args.zerospeech is not None:
        pairs["sWUGGY"] = zerospeech_pairs(args.zerospeech, "lexical", args.split)
        pairs["sBLIMP"] = zerospeech_pairs(args.zerospeech, "syntactic", args.split)
    if args.sstorycloze is not None:
        pairs["sStoryCloze"] = storycloze_pairs(args.sstorycloze)
    if args.tstorycloze is not None:
        pairs["tStoryCloze"] = storycloze_pairs(args.tstorycloze)
    return pairs


def _default_window(lm, context: int | None) -> int:
    """Four TTT updates' frames (2048 frames without TTT), at most the attention context."""
    chunk = max(c.update_frames for c in lm.ttt_configs) if getattr(lm, "ttt_config", None) else 512
    return min(4 * chunk, context) if context else 4 * chunk


def _diagnostics(lm, documents, frames: int, device: str, ttt_diagnostics) -> dict[str, dict[str, list[float]]]:
    """Per-chunk diagnostics averaged over the documents that have `frames` frames."""
    usable = [d[:, :frames] for d in documents if d.shape[1] >= frames]
    if not usable:
        raise ValueError(f"--diagnostics-frames={frames}: no document is that long")
    import torch
    return ttt_diagnostics(lm, torch.stack(usable).to(device))


def _device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"
