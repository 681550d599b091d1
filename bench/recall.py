"""Recall benchmark: does TTT remember facts that attention has lost, and what makes it learn?

Every model is trained by `moshi-ttt train` on the built-in synthetic documents and scored on
held-out ones (`moshi_ttt.eval.recall`); every TTT result has, beside it, a model trained the
same way without TTT. Sections (all by default):

    main       the default run (`make run`) and its baseline: recall, and accuracy against time
    seeds      the default run with three other seeds (model, documents and held-out set)
    distance   the main model on documents 1x, 2x and 4x as long (the filler between statements and
               questions grows from 75 to 235 and 555 frames)
    capacity   the main model on 6, 12, 24 and 48 facts
    position   text and audio loss against position (`moshi-ttt eval`'s engine) of both main models
    retrofit   the main baseline (a plain model, pretrained on the task) converted with apply_ttt
               and finetuned in full, lora and ttt_layers mode (the tiny job's TTT settings and lr),
               the analogue of converting a pretrained Moshi
    speaker    facts the user says (their audio stream), with targets that can and cannot hear them
    ablations  one change at a time from the default: layers, eta, lr, x0 source, init, chunk, conv
    stream     recall over streams of 125 and 625 documents (20,000 and 100,000 frames) without a
               reset: the main job (streams, a gate, documents of varied length), its baseline,
               and the recipes it grew from (a fixed forgetting factor or none, one length)
    lmgen      the main job's model generating with moshi's LMGen for 100,000 frames (one
               conversation, random user audio): every output finite, the fast-weight norms bounded
    methods    In-Place TTT (the main job) against TTT-MLP blocks (Sun et al. 2024) trained with the
               same recipe on the same layer, and their baseline: recall per document and over a
               stream, text loss, training time

Every section but `stream` and `methods` starts from the per-document recipe (ONE_DOCUMENT: the main job
before it learned to hold a memory over a stream; every document from fresh fast weights).

    python bench/recall.py                       # everything (about an hour on 2 CPU cores)
    python bench/recall.py --sections main distance capacity
    python bench/recall.py --steps 300           # shorter trainings (the schedule follows)

Results: bench/results/recall.json, recall.md (tables) and recall_*.png. Each run keeps its
directory under --work; a run already finished there is read back, not trained again, so an
interrupted benchmark continues where it stopped (--fresh trains everything again).
"""

import argparse
import copy
import functools
import json
import math
import shutil
import sys
import typing as tp
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, markdown_table, write_results  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from moshi_ttt.eval.recall import answer_questions, attention_reach, summarize, synthetic_recall_set  # noqa: E402
from moshi_ttt.models import TTTConfig, load_lm  # noqa: E402
from moshi_ttt.train import TrainConfig, train  # noqa: E402

SECTIONS = ("main", "seeds", "distance", "capacity", "position", "retrofit", "speaker", "ablations", "stream",
            "lmgen", "methods")
# The per-document recipe, from the main job's defaults: one document a row of one length,
# never forgetting, no gate.
ONE_DOCUMENT = {"reset_fast_weights": "document", "stream_from_step": 0, "batch_size": 8, "max_steps": 1200,
                "ttt": {"forget": 1.0, "gate": "none"},
                "data": {"synthetic": {"documents_per_row": 1, "max_frames": None}}}
# The stream section scores every model itself; the runs skip the trainer's own stream recall.
NO_STREAM_EVAL = {"eval_stream_documents": 0}
ABLATIONS: list[tuple[str, dict[str, tp.Any] | tp.Callable[[int], dict[str, tp.Any]]]] = [
    ("TTT on layers 0 and 2", {"ttt": {"layers": [0, 2]}}),
    ("TTT on layer 1", {"ttt": {"layers": [1]}}),
    ("eta 1.0", {"ttt": {"eta": 1.0}}),
    ("eta 0.1", {"ttt": {"eta": 0.1}}),
    ("lr 1e-3", {"optim": {"lr": 1e-3}}),
    ("x0_source input", {"ttt": {"x0_source": "input"}}),
    ("x0_source text_user", {"ttt": {"x0_source": "text_user"}}),
    ("x0_source hidden", {"ttt": {"x0_source": "hidden"}}),
    ("init warm", {"ttt": {"init": "warm"}}),
    ("eta warm-up over the first sixth of the steps", lambda steps: {"eta_warmup_steps": steps // 6}),
    ("official conv and init (K=5 centred, W_target diagonal)",
     {"ttt": {"kernel_size": 5, "kernel_past": 2, "init": "official"}}),
    ("chunk 16", {"ttt": {"chunk_size": 16}}),
    ("chunk 64", {"ttt": {"chunk_size": 64}}),
    ("mode ttt_layers", {"mode": "ttt_layers"}),
    ("facts side by side (spacing 2)", {"data": {"synthetic": {"spacing": 2}}}),
]


def merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


MARKER = ".bench-recall"  # in --work: the benchmark's own directory, whose runs it may delete


class Bench:
    def __init__(self, work: Path, steps: int | None, documents: int, fresh: bool):
        if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
            raise SystemExit(f"--work {work} exists and is not this benchmark's: give a new or empty directory")
        work.mkdir(parents=True, exist_ok=True)
        (work / MARKER).touch()
        self.work, self.documents, self.fresh = work, documents, fresh
        self.base = merge(merge(TrainConfig().to_dict(), ONE_DOCUMENT), NO_STREAM_EVAL)
        self.streams = merge(TrainConfig().to_dict(), NO_STREAM_EVAL)  # the main job
        if steps is not None:
            for key in ("stream_from_step", "data.synthetic.varied_from_step"):
                *parents, leaf = key.split(".")
                owner = functools.reduce(dict.__getitem__, parents, self.streams)
                owner[leaf] = owner[leaf] * steps // self.streams["max_steps"]
            self.base["max_steps"] = self.streams["max_steps"] = steps
        self.base.update(ckpt_freq=10 ** 9, eval_freq=max(1, self.base["max_steps"] // 10))

    def config(self, name: str, change: dict | None = None) -> TrainConfig:
        data = merge(self.base, change or {})
        if data["model"] != "tiny":
            data["tiny"] = {}  # the built-in model's settings do not apply to a checkpoint
        data["run_dir"] = str(self.work / name)
        return TrainConfig.from_dict(data)

    def run(self, name: str, change: dict | None = None) -> dict[str, tp.Any]:
        """Train one run, or read it back if it finished with these settings; its recall, time and curve."""
        config = self.config(name, change)
        run_dir = Path(config.run_dir)
        finished = (run_dir / "final").is_dir() and (run_dir / "recall" / "recall.json").is_file()
        if finished and not self.fresh:
            if TrainConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())) == config:
                return self.record(run_dir, config, change)
            print(f"{name}: its settings changed since it was trained: training it again", flush=True)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        train(config)
        return self.record(run_dir, config, change)

    @staticmethod
    def record(run_dir: Path, config: TrainConfig, change: dict | None) -> dict[str, tp.Any]:
        """What a finished run left: its final recall, its logged metrics, how long it trained."""
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curve = [(m["step"], m["train_s"], m["recall/accuracy"]) for m in metrics if "recall/accuracy" in m]
        return {"recall": json.loads((run_dir / "recall" / "recall.json").read_text()),
                "train_s": metrics[-1]["train_s"], "steps": config.max_steps, "curve": curve,
                "final_loss": metrics[-1]["loss"], "final_text_loss": metrics[-1]["text_loss"], "change": change or {}}

    def held_out(self, lm, documents: int, **task):
        """Held-out documents of the default task, with `task` changing its layout."""
        default = TrainConfig.from_dict(self.base)
        return synthetic_recall_set(lm, documents=documents, seed=default.seed,
                                    **{**default.data.synthetic.layout(), **task})

    def score(self, model_dir: Path, **task) -> dict[str, tp.Any]:
        """Recall of a saved model on held-out documents of the given task settings."""
        lm = load_lm(model_dir, dtype=torch.float32).eval()
        recall_set = self.held_out(lm, self.documents, **task)
        return summarize(answer_questions(lm, recall_set, batch_size=16), num_values=recall_set.num_values,
                         **attention_reach(lm))


def headline(recall: dict[str, tp.Any]) -> dict[str, float]:
    return {k: recall[k] for k in ("accuracy", "cross_entropy", "p_correct", "p_other", "key_addressing_ratio",
                                   "chance", "bag_ceiling", "distance_min", "distance_max")}


def main_section(bench: Bench) -> dict[str, tp.Any]:
    ttt = bench.run("main")
    baseline = bench.run("main-baseline", {"baseline": True})
    return {"ttt": ttt, "baseline": baseline, "receptive_field": ttt["recall"]["TTT"]["receptive_field"]}


def seeds_section(bench: Bench) -> dict[str, tp.Any]:
    return {str(seed): bench.run(f"seed-{seed}", {"seed": seed}) for seed in (1, 2, 3)}


def distance_section(bench: Bench) -> dict[str, tp.Any]:
    frames = bench.base["data"]["synthetic"]["frames"]
    out = {}
    for factor in (1, 2, 4):
        out[f"{factor}x"] = {
            "frames": factor * frames,
            "TTT": headline(bench.score(bench.work / "main" / "final", frames=factor * frames)),
            "baseline": headline(bench.score(bench.work / "main-baseline" / "final", frames=factor * frames))}
    return out


def capacity_section(bench: Bench) -> dict[str, tp.Any]:
    s = bench.base["data"]["synthetic"]
    out = {}
    for pairs in (6, 12, 24, 48):
        frames = max(s["frames"], 2 * s["spacing"] * (pairs - 1) + s["frames"] - 2 * s["spacing"] * (s["pairs"] - 1))
        out[str(pairs)] = {"frames": frames, "TTT": headline(bench.score(bench.work / "main" / "final",
                                                                         pairs=pairs, frames=frames))}
    return out


def position_section(bench: Bench, out: Path) -> dict[str, tp.Any]:
    """Loss against position over held-out documents, streamed window by window as in a conversation."""
    from moshi_ttt.eval.long_context import evaluate_documents, write_curves
    curves = []
    for label, directory in (("TTT", "main"), ("baseline trained without TTT", "main-baseline")):
        lm = load_lm(bench.work / directory / "final", dtype=torch.float32).eval()
        recall_set = bench.held_out(lm, min(64, bench.documents), frames=2 * bench.base["data"]["synthetic"]["frames"])
        window = bench.base["ttt"]["chunk_size"]  # the same windows for both models
        curves.append(evaluate_documents(lm, recall_set.documents, label, window=window, batch_size=16))
        answers = sorted({f.answer_frame for facts in recall_set.facts for f in facts})
    result = write_curves(curves, out / "recall_position", positions=answers, context=attention_reach(lm)["context"],
                          smooth=1)
    return {name: {"text_loss_at_answers": {p: c["text_loss_at"].get(str(p)) for p in answers},
                   "text_loss_mean": c["text_loss_mean"]} for name, c in result["summary"].items()}


RETROFITS: list[tuple[str, str, list[int]]] = [  # (name, mode, TTT layers)
    ("full", "full", [0]), ("lora", "lora", [0]), ("lora, TTT on layer 3", "lora", [3]),
    ("ttt_layers", "ttt_layers", [0]), ("ttt_layers, TTT on layer 3", "ttt_layers", [3]),
    ("ttt_layers, TTT on layers 0 and 3", "ttt_layers", [0, 3]),
    ("ttt_layers, TTT on every layer", "ttt_layers", [0, 1, 2, 3])]


def retrofit_section(bench: Bench) -> dict[str, tp.Any]:
    pretrained = str(bench.work / "main-baseline" / "final")
    return {name: bench.run("retrofit-" + "".join(c if c.isalnum() else "-" for c in name),
                            {"model": pretrained, "mode": mode, "ttt": {"layers": layers}})
            for name, mode, layers in RETROFITS}


def speaker_section(bench: Bench) -> dict[str, tp.Any]:
    user = {"data": {"synthetic": {"speaker": "user"}}}
    return {source: bench.run(f"user-{source}", merge(user, {"ttt": {"x0_source": source}}))
            for source in ("text_user", "text")} | {"baseline": bench.run("user-baseline", merge(user, {"baseline": True}))}


def ablation_section(bench: Bench) -> dict[str, tp.Any]:
    steps = bench.base["max_steps"]
    return {name: bench.run("ablation-" + "".join(c if c.isalnum() else "-" for c in name).strip("-"),
                            change(steps) if callable(change) else change)
            for name, change in ABLATIONS}


def stream_change(bench: Bench, **change) -> dict[str, tp.Any]:
    """The main job's settings (training on streams) as a change to the per-document base."""
    keys = ("reset_fast_weights", "stream_from_step", "batch_size", "max_steps")
    out = {k: bench.streams[k] for k in keys}
    out["ttt"] = {k: bench.streams["ttt"][k] for k in ("forget", "gate")}
    out["data"] = {"synthetic": {k: bench.streams["data"]["synthetic"][k]
                                 for k in ("documents_per_row", "max_frames", "varied_from_step")}}
    return merge(out, change)


def stream_section(bench: Bench, out: Path) -> dict[str, tp.Any]:
    """Each model over streams of held-out documents, never reset: the main job, its baseline, and
    the recipes it grew from (no gate: a fixed forgetting factor, or none; documents of one length)."""
    one_length = {"data": {"synthetic": {"max_frames": None}}}
    fixed = {"ttt": {"forget": 0.8, "gate": "none"}, **one_length}
    runs = {
        "main job: streams, gate decay_write, documents of varied length": ("stream", stream_change(bench)),
        "baseline trained alike without TTT": ("stream-baseline", stream_change(bench, baseline=True)),
        "one document at a time, never forgetting (issue 11)": ("main", None),
        "baseline of that": ("main-baseline", {"baseline": True}),
        "one document at a time, forget 0.8": ("document-forget", {"ttt": {"forget": 0.8}}),
        "streams, never forgetting": ("stream-keep", stream_change(bench, ttt={"forget": 1.0, "gate": "none"},
                                                                   **one_length)),
        "streams, forget 0.8 (the main job before the gate)": ("stream-forget", stream_change(bench, **fixed)),
        "streams, gate decay_write, documents of one length": ("stream-one-length",
                                                               stream_change(bench, **one_length)),
        "streams, gate decay (no write gate), documents of one length": (
            "stream-decay-gate", stream_change(bench, ttt={"gate": "decay"}, **one_length)),
    }
    results: dict[str, tp.Any] = {}
    for length, documents in (("20k", 125), ("100k", 625)):
        kept = {label: run for label, run in runs.items()
                if length == "20k" or run[0] in ("stream", "stream-baseline", "main", "stream-forget")}
        results[length] = score_streams(bench, kept, documents, out / f"recall_stream_{length}",
                                        ("baseline trained alike without TTT", "baseline of that"))
    return results


def score_streams(bench: Bench, runs: dict[str, tuple[str, dict | None]], documents: int, out: Path,
                  baselines: tuple[str, ...]) -> dict[str, tp.Any]:
    """Each run's model over 4 streams of `documents` held-out documents without a reset, written to
    `out`; every model's text loss against each of `baselines`."""
    from moshi_ttt.eval.stream_recall import stream_documents, stream_recall, text_loss_excess, write_stream_recall
    task = TrainConfig.from_dict(bench.base).data.synthetic
    scored = {}
    for label, (name, change) in runs.items():
        record = bench.run(name, change)
        lm = load_lm(bench.work / name / "final", dtype=torch.float32).eval()
        recall_set = bench.held_out(lm, 4 * documents)
        window = bench.base["tiny"]["context"]  # one attention context at a time, for every model
        scored[label] = stream_recall(lm, stream_documents(recall_set, documents), window)
        scored[label]["per_document_recall"] = record["recall"][next(iter(record["recall"]))]["accuracy"]
        scored[label]["train_s"] = record["train_s"]
    write_stream_recall(scored, out)
    for label in scored:
        for baseline in baselines:
            if baseline in scored and baseline != label:
                scored[label].setdefault("text_loss_excess", {})[baseline] = text_loss_excess(
                    scored, label, baseline, task.frames)
    return {label: {k: v for k, v in s.items() if k not in ("text_loss", "fast_weight_norms")}
            for label, s in scored.items()}


# TTT-MLP on the main job's layer: the paper's settings (mini-batch 16, base lr 0.1), then larger inner
# lrs (the tiny model's heads have 16 dimensions, so base lr 10 allows 0.6 per token).
TTT_MLP_RUNS = (("TTT-MLP, base lr 0.1 (the paper's)", "ttt-mlp", {}),
                ("TTT-MLP, base lr 1.0", "ttt-mlp-lr1", {"base_lr": 1.0}),
                ("TTT-MLP, base lr 10", "ttt-mlp-lr10", {"base_lr": 10.0}))


def methods_section(bench: Bench, out: Path) -> dict[str, tp.Any]:
    """In-Place TTT and TTT-MLP, each trained with the main job's recipe (streams of four
    documents after the first two thirds of the steps) on the same layer, and their baseline."""
    runs = {"In-Place TTT (main job)": ("stream", stream_change(bench))}
    for label, name, settings in TTT_MLP_RUNS:
        change = stream_change(bench)
        change["ttt"] = TTTConfig(method="ttt_mlp", layers=bench.streams["ttt"]["layers"], **settings).to_dict()
        runs[label] = (name, change)
    runs["baseline trained alike without TTT"] = ("stream-baseline", stream_change(bench, baseline=True))
    return {"20k": score_streams(bench, runs, 125, out / "recall_methods", ("baseline trained alike without TTT",))}


def lmgen_section(bench: Bench, frames: int = 100_000, every: int = 1000) -> dict[str, tp.Any]:
    """LMGen over one long conversation with the main job's model: each TTT layer's ||W - W0||_F every
    `every` frames, all finite. (Sampling itself fails on a NaN or inf logit: a finished run had none.)"""
    from moshi.models.lm import LMGen
    from moshi_ttt.models import ttt_layers
    bench.run("stream", stream_change(bench))
    lm = load_lm(bench.work / "stream" / "final", dtype=torch.float32).eval()
    gen = LMGen(lm, temp=0.8, temp_text=0.7)
    generator = torch.Generator().manual_seed(0)
    norms: dict[str, list[float]] = {name: [] for name, _ in ttt_layers(lm)}
    finite = True
    with torch.no_grad(), gen.streaming(1):
        for t in tqdm(range(frames), desc="LMGen", unit="frame", mininterval=10):
            user = torch.randint(0, lm.card, (1, lm.n_q - lm.dep_q, 1), generator=generator)
            gen.step(user)
            if (t + 1) % every == 0:
                for name, layer in ttt_layers(lm):
                    norms[name].append(float(layer.fast_weight_change_norms().max()))
                finite = finite and all(math.isfinite(v[-1]) for v in norms.values())
    tenth = max(1, len(next(iter(norms.values()))) // 10)
    return {"frames": frames, "every": every, "finite": finite, "fast_weight_norms": norms,
            "max_norm": {k: max(v) for k, v in norms.items()},
            "first_tenth_max": {k: max(v[:tenth]) for k, v in norms.items()},
            "last_tenth_max": {k: max(v[-tenth:]) for k, v in norms.items()}}


def write_tables(results: dict[str, tp.Any], path: Path) -> None:
    lines = [f"Measured {results['environment']['date']} on {results['environment']['device']}, "
             f"torch {results['environment']['torch']}.", ""]

    def row(name, recall, steps=None, seconds=None):
        return [name, f"{100 * recall['accuracy']:.1f}", f"{recall['key_addressing_ratio']:.3g}",
                f"{recall['cross_entropy']:.3f}", steps if steps is not None else "-",
                f"{seconds:.0f}" if seconds is not None else "-"]
    header = ["model", "top-1 %", "ratio", "answer CE", "steps", "train s"]
    if "main" in results:
        m = results["main"]
        r = m["ttt"]["recall"]
        lines += ["## Main run", "", markdown_table(header, [
            row("TTT", r["TTT"], m["ttt"]["steps"], m["ttt"]["train_s"]),
            row("same weights, TTT off (diagnostic)", r["same weights, TTT off (diagnostic)"]),
            row("baseline trained without TTT", m["baseline"]["recall"]["baseline trained without TTT"],
                m["baseline"]["steps"], m["baseline"]["train_s"])]), "",
            f"Chance {100 * r['TTT']['chance']:.1f}%, bag ceiling {100 * r['TTT']['bag_ceiling']:.1f}%; distances "
            f"{r['TTT']['distance_min']}-{r['TTT']['distance_max']} frames, layers x context "
            f"{m['receptive_field']}.", ""]
    if "distance" in results:
        lines += ["## Longer documents (more filler)", "", markdown_table(
            ["length", "frames", "distances", "TTT top-1 %", "TTT ratio", "baseline top-1 %"],
            [[k, v["frames"], f"{v['TTT']['distance_min']}-{v['TTT']['distance_max']}",
              f"{100 * v['TTT']['accuracy']:.1f}", f"{v['TTT']['key_addressing_ratio']:.3g}",
              f"{100 * v['baseline']['accuracy']:.1f}"] for k, v in results["distance"].items()]), ""]
    if "capacity" in results:
        lines += ["## Capacity", "", markdown_table(
            ["facts", "frames", "top-1 %", "ratio", "bag ceiling %", "chance %"],
            [[k, v["frames"], f"{100 * v['TTT']['accuracy']:.1f}", f"{v['TTT']['key_addressing_ratio']:.3g}",
              f"{100 * v['TTT']['bag_ceiling']:.1f}", f"{100 * v['TTT']['chance']:.1f}"]
             for k, v in results["capacity"].items()]), ""]
    if "position" in results:
        p = results["position"]
        names = list(p)
        answers = list(p[names[0]]["text_loss_at_answers"])
        lines += ["## Text loss at the answer frames (documents twice as long, streamed)", "", markdown_table(
            ["frame"] + names, [[a] + [f"{p[n]['text_loss_at_answers'][a]:.3f}" for n in names] for a in answers]),
            "", "![loss by position](recall_position/loss_by_position.png)", ""]
    for section, title, plots in (("stream", "Recall over a stream", "recall_stream_{}"),
                                  ("methods", "In-Place TTT and TTT-MLP: recall over a stream", "recall_methods")):
        for length, scored in results.get(section, {}).items():
            first = next(iter(scored.values()))
            lines += [f"## {title} of {first['documents_per_stream']} documents ({first['frames']} "
                      "frames, no reset)", "", markdown_table(
                          ["model", "train s", "per document %", "first %", "last %", "last quarter %", "text CE",
                           "worst text-loss excess (nats, over one document)", "max norm W - W0"],
                          [[label, f"{s['train_s']:.0f}" if "train_s" in s else "-",
                            f"{100 * s['per_document_recall']:.1f}",
                            f"{100 * s['first_document']['accuracy']:.1f}",
                            f"{100 * s['last_document']['accuracy']:.1f}", f"{100 * s['last_quarter']['accuracy']:.1f}",
                            f"{s['text_loss_mean']:.3f}",
                            "; ".join(f"{e['max_excess']:+.3f} vs {b} (frame {e['at_frame']})"
                                      for b, e in s.get("text_loss_excess", {}).items()) or "-",
                            ", ".join(f"{v:.3g}" for v in s["fast_weight_norm_max"].values()) or "-"]
                           for label, s in scored.items()]), "",
                      f"Chance {100 * first['chance']:.1f}%. "
                      f"![recall over a stream]({plots.format(length)}/recall_stream.png)", ""]
    if "lmgen" in results:
        g = results["lmgen"]
        lines += [f"## LMGen over {g['frames']} frames (one conversation, the main job's model)", "",
                  markdown_table(["layer", "max norm W - W0", "max in the first tenth", "max in the last tenth",
                                  "all finite"],
                                 [[k, f"{g['max_norm'][k]:.4g}", f"{g['first_tenth_max'][k]:.4g}",
                                   f"{g['last_tenth_max'][k]:.4g}", "yes" if g["finite"] else "NO"]
                                  for k in g["max_norm"]]), ""]
    for section, title in (("seeds", "Other seeds (the default run)"),
                           ("retrofit", "Retrofit: the pretrained baseline, converted and finetuned"),
                           ("speaker", "Facts the user says"), ("ablations", "Ablations (one change each)")):
        if section not in results:
            continue
        rows = []
        for name, record in results[section].items():
            key = next(iter(record["recall"]))
            rows.append(row(name, record["recall"][key], record["steps"], record["train_s"]))
        lines += [f"## {title}", "", markdown_table(header, rows), ""]
    path.write_text("\n".join(lines))


def plot(results: dict[str, tp.Any], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    if "main" in results:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, record in (("TTT", results["main"]["ttt"]), ("baseline trained without TTT",
                                                                  results["main"]["baseline"])):
            curve = record["curve"]
            ax.plot([c[1] for c in curve], [100 * c[2] for c in curve], marker="o", label=label)
        chance = results["main"]["ttt"]["recall"]["TTT"]["chance"]
        ax.axhline(100 * chance, color="gray", linestyle=":", label="chance")
        ax.axhline(95, color="gray", linestyle="--", label="95%")
        ax.set_xlabel("training time (s, 2 CPU threads)")
        ax.set_ylabel("held-out top-1 accuracy at the answers (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "recall_time.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if "distance" in results or "capacity" in results:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        if "distance" in results:
            d = results["distance"]
            for who in ("TTT", "baseline"):
                axes[0].plot([v["frames"] for v in d.values()], [100 * v[who]["accuracy"] for v in d.values()],
                             marker="o", label=who)
            axes[0].set_xlabel("document frames (1x, 2x, 4x the trained length)")
            axes[0].set_ylabel("top-1 accuracy (%)")
            axes[0].legend(fontsize=8)
            axes[0].grid(alpha=0.3)
        if "capacity" in results:
            c = results["capacity"]
            axes[1].plot([int(k) for k in c], [100 * v["TTT"]["accuracy"] for v in c.values()], marker="o",
                         label="TTT")
            axes[1].plot([int(k) for k in c], [100 * v["TTT"]["bag_ceiling"] for v in c.values()], linestyle="--",
                         color="gray", label="bag ceiling")
            axes[1].set_xscale("log", base=2)
            axes[1].set_xticks([int(k) for k in c], [str(k) for k in c])
            axes[1].set_xlabel("facts per document")
            axes[1].legend(fontsize=8)
            axes[1].grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "recall_distance_capacity.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the default config's)")
    parser.add_argument("--documents", type=int, default=256, help="held-out documents per score")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-recall"), help="run directories")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--fresh", action="store_true", help="train every run again")
    args = parser.parse_args()
    needs_main = {"distance", "capacity", "position", "retrofit"} & set(args.sections)
    sections = list(dict.fromkeys((["main"] if needs_main else []) + args.sections))
    bench = Bench(args.work, args.steps, args.documents, args.fresh)
    # The sections not run keep their earlier results; each run section records its environment.
    previous = args.out / "recall.json"
    results: dict[str, tp.Any] = json.loads(previous.read_text()) if previous.is_file() else {}
    for section in SECTIONS:
        if section in results and "environment" in results:
            results.setdefault(f"{section}_environment", results["environment"])
    results.update(environment=environment(torch.device("cpu")), default=bench.base)
    runners = {"main": main_section, "seeds": seeds_section, "distance": distance_section, "capacity": capacity_section,
               "position": lambda b: position_section(b, args.out), "retrofit": retrofit_section,
               "speaker": speaker_section, "ablations": ablation_section,
               "stream": lambda b: stream_section(b, args.out), "lmgen": lmgen_section,
               "methods": lambda b: methods_section(b, args.out)}
    args.out.mkdir(parents=True, exist_ok=True)
    for section in sections:
        print(f"== {section}", flush=True)
        results[section] = runners[section](bench)
        results[f"{section}_environment"] = results["environment"]
        write_results(args.out / "recall.json", results)
        write_tables(results, args.out / "recall.md")
    for path in plot(results, args.out):
        print(f"plotted {path}")
    print((args.out / "recall.md").read_text())


if __name__ == "__main__":
    main()
