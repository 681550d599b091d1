"""The training loop of `moshi-ttt train`: one process, or many under torchrun.

Each step reads `batch_size * world_size * num_microbatches` rows from the
shared data stream (process r takes its own rows), accumulates gradients over
the micro-batches, clips them, and takes an AdamW step (warm-up, then cosine decay).
The loss is normalised by the step's total token weight over every process, so
a step is the same whatever the split. Under torchrun the model is sharded with
FSDP2 (`fsdp.py`) or copied whole into each process with DDP (`distributed`).
"""

import contextlib
import dataclasses
import functools
import gc
import json
import math
import shutil
import signal
import sys
import time
import typing as tp
from pathlib import Path

import torch
import yaml
from moshi.models.lm import LMModel
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..models import (build_lm, checkpoint_info, document_segments, is_ttt_checkpoint, load_moshi_lm, load_ttt_lm,
                      retune_ttt, save_moshi_lm, save_ttt_lm, tiny_lm_config, ttt_disabled)
from ..models.checkpoints import with_assets
from ..models.convert import ttt_layers
from ..utils.atomic import atomic_file
from .batches import DocumentSource, SequenceBatcher
from .checkpointing import (checkpoint_step, list_checkpoints, load_checkpoint, rng_state, save_checkpoint,
                            set_rng_state)
from .config import TrainConfig
from .distributed import Distributed, setup
from .fsdp import SHARDED_DIR, consolidated_state_dict, is_sharded, local, shard_model, whole
from .interrupts import stop_on_signals
from .loss import loss_weights, weighted_losses
from .modes import GROUPS, apply_mode, parameter_group
from .validation import ValidationSet

BASELINE = "baseline trained without TTT"  # the label of a baseline run's results


def warmup_cosine(total_steps: int, warmup_share: float, step: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup_share` of the steps, then a cosine to 0."""
    warmup = max(1, round(warmup_share * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def eta_at(eta: float, warmup_steps: int, step: int) -> float:
    """TTT's eta at `step` (0-based): a linear warm-up over `warmup_steps`, then `eta`."""
    return eta if step >= warmup_steps else eta * (step + 1) / warmup_steps


def build_model(config: TrainConfig, device: torch.device) -> LMModel:
    """The model to train: with TTT, or without for a baseline run."""
    dtype = torch.bfloat16 if (device.type == "cuda" and config.bf16) else torch.float32
    ttt = None if config.baseline else config.ttt
    if config.model == "tiny":
        lm = build_lm(tiny_lm_config(**config.tiny), ttt, seed=config.seed, device=device, dtype=dtype)
    elif config.baseline:
        _check_baseline_model(config)
        lm = load_moshi_lm(config.model, device=device, dtype=dtype, moshi_weights=config.moshi_weights,
                           config_path=config.config_path)
    else:
        saved = is_ttt_checkpoint(config.model, config.config_path, config.moshi_weights)
        lm = load_ttt_lm(config.model, None if saved else config.ttt, device=device, dtype=dtype,
                         moshi_weights=config.moshi_weights, config_path=config.config_path)
        if saved:
            retune_ttt(lm, config.ttt)  # the config's eta, forget, ... apply; a structural change is an error
    lm.train()
    set_gradient_checkpointing(lm, config.gradient_checkpointing)
    return lm


def set_gradient_checkpointing(lm: LMModel, enabled: bool) -> None:
    """Recompute each layer's activations in the backward, in the main transformer and the
    depformer, as moshi's `LMModel(gradient_checkpointing=...)` does."""
    for transformer in (lm.transformer, getattr(lm, "depformer", None)):
        if transformer is not None:
            transformer.checkpointing = enabled


def prepare_model(config: TrainConfig, device: torch.device) -> tuple[LMModel, dict[str, int]]:
    """The model with what trains (in float32) chosen by the mode; the trainable counts per group."""
    lm = build_model(config, device)
    layers = config.ttt.layer_indices(len(lm.transformer.layers)) if config.baseline else None
    counts = apply_mode(lm, config.mode, config.lora.rank, config.lora.scaling, layers=layers,
                        ft_embed=config.lora.ft_embed)
    if not any(p.requires_grad for p in lm.parameters()):
        raise ValueError(f"mode={config.mode!r} leaves nothing to train in this model")
    for p in lm.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return lm, counts


def build_source(config: TrainConfig, lm: LMModel, documents: str | None = None, step: int | None = None
                 ) -> DocumentSource:
    """The documents at `documents` (by default data.train_data), or the synthetic ones (those
    of training step `step`: of one length before data.synthetic.varied_from_step)."""
    data = config.data
    documents = documents or data.train_data
    if data.source == "synthetic":
        from ..data.synthetic import SyntheticDocuments
        varied = step is None or step >= data.synthetic.varied_from_step
        return SyntheticDocuments(data.synthetic.num_documents, num_codebooks=lm.num_codebooks, dep_q=lm.dep_q,
                                  card=lm.card, text_card=lm.text_card, text_padding_id=lm.text_padding_token_id,
                                  seed=config.seed, max_frames=data.synthetic.max_frames if varied else None,
                                  **data.synthetic.layout())
    if data.source == "codes":
        from ..data.code_files import CodeFiles
        return CodeFiles(documents, lm.num_codebooks)
    from ..data.finetune_data import FinetuneConversations
    if config.model == "tiny":
        raise ValueError("data.source='finetune' needs a model checkpoint (its Mimi and text tokenizer), "
                         "not model='tiny'")
    info = checkpoint_info(config.model, mimi_weights=data.mimi_weights, tokenizer=data.tokenizer,
                           config_path=config.config_path, moshi_weights=config.moshi_weights)
    for what, path in (("Mimi weights", info.mimi_weights), ("text tokenizer", info.tokenizer)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} not found: {path} (set data.mimi_weights / data.tokenizer)")
    return FinetuneConversations(documents, info.get_mimi(device="cpu"), info.get_text_tokenizer(),
                                 padding_id=lm.text_padding_token_id, end_padding_id=lm.end_of_text_padding_id,
                                 dep_q=lm.dep_q, num_codebooks=lm.num_codebooks)


def require_wandb() -> tp.Any:
    """The wandb module, or an error that says how to install it (before any model loads)."""
    try:
        import wandb
    except ImportError as error:
        raise ValueError("wandb.project is set but wandb is not installed: pip install 'moshi-ttt[wandb]', "
                         "or drop the wandb section") from error
    return wandb


class MetricsLog:
    """TensorBoard scalars and a metrics.jsonl (and wandb, when configured), written by the main process."""

    def __init__(self, run_dir: Path, enabled: bool, config: TrainConfig | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.wandb_run = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if enabled and config is not None and config.wandb.project:
            wandb = require_wandb()
            if config.wandb.key:
                wandb.login(key=config.wandb.key)
            self.wandb_run = wandb.init(project=config.wandb.project, name=config.wandb.run_name or run_dir.name,
                                        dir=str(run_dir), mode="offline" if config.wandb.offline else "online",
                                        config=config.to_dict())

    def forget_after(self, step: int) -> None:
        """Drop the lines of steps after `step` (logged before a resumed run's checkpoint was lost)."""
        if self.enabled and self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict[str, tp.Any]:
    """Run (or resume) training; `stop_after` ends this process early, the schedule unchanged."""
    dist = setup(config.device)
    try:
        return _train(config, dist, resume, stop_after)
    finally:
        dist.close()


def train_with_baseline(config: TrainConfig, resume: bool = False) -> dict[str, tp.Any]:
    """Train `config`, then its fair baseline (the same run without TTT) in run_dir/baseline,
    and compare their held-out recall (written to run_dir/recall, the verdict printed)."""
    if config.baseline:
        raise ValueError("--with-baseline: this config is already a baseline (baseline=true)")
    baseline = dataclasses.replace(config, baseline=True, run_dir=str(Path(config.run_dir) / "baseline"))
    _check_baseline_model(baseline)  # before the first run, not after it
    result = train(config, resume=resume)
    resume_baseline = resume and bool(list_checkpoints(Path(baseline.run_dir)))
    if resume and not resume_baseline:  # the baseline had not reached a checkpoint: nothing of it to keep
        baseline = dataclasses.replace(baseline, overwrite_run_dir=True)
    result["baseline"] = train(baseline, resume=resume_baseline)
    if "recall" in result and "recall" in result["baseline"]:
        from ..eval.recall import distance_table, verdict, worst_excess, write_recall
        compared = {**result["recall"], **result["baseline"]["recall"]}
        out = Path(config.run_dir) / "recall"
        ttt, plain = compared["TTT"], compared[BASELINE]
        span = config.ttt.update_frames
        ttt["filler_excess"] = {
            length: worst_excess(s["filler_text_loss"], plain["by_length"][length]["filler_text_loss"], span)
            for length, s in ttt["by_length"].items()}
        write_recall(compared, out)
        first = next(iter(compared.values()))
        print(verdict(compared, f"held-out recall, TTT against its baseline ({first['questions']} questions):"))
        print(distance_table(compared, "held-out recall by distance, documents of every length:"))
        print(f"TTT's text loss on filler against the baseline's, worst {span}-frame window: " + ", ".join(
            f"{length} {e['max_excess']:+.3f} nats" for length, e in ttt["filler_excess"].items()))
        print(f"comparison written to {out}")
        result["recall"] = compared
    for key, directory in (("recall_stream", ""), ("recall_stream_varied", "varied")):
        if key not in result or key not in result["baseline"]:
            continue
        from ..eval.stream_recall import stream_verdict, text_loss_excess, write_stream_recall
        compared = {**result[key], **result["baseline"][key]}
        span = config.data.synthetic.frames if key == "recall_stream" else config.ttt.update_frames
        excess = text_loss_excess(compared, "TTT", BASELINE, span)
        compared["TTT"]["text_loss_excess"] = {BASELINE: excess}
        write_stream_recall(compared, Path(config.run_dir) / "recall" / directory)
        print(stream_verdict(compared))
        print(f"TTT's text loss against the baseline's, worst mean over {span} frames: "
              f"{excess['max_excess']:+.3f} nats (frame {excess['at_frame']}; <= 0: nowhere above)")
        result[key] = compared
    return result


def _check_baseline_model(config: TrainConfig) -> None:
    if config.model != "tiny" and is_ttt_checkpoint(config.model, config.config_path, config.moshi_weights):
        raise ValueError(f"baseline=true: model={config.model!r} is a TTT model; "
                         "a baseline starts from a plain Moshi checkpoint")


def _train(config: TrainConfig, dist: Distributed, resume: bool, stop_after: int | None) -> dict[str, tp.Any]:
    run_dir = Path(config.run_dir)
    _check_data_paths(config)  # before the model loads (a checkpoint may first download for minutes)
    finished = _finished_run(config) if resume else None
    if finished is not None:
        return finished
    if not resume:  # before anything slow; every process checks, the main one clears
        _claim_run_dir(run_dir, config.overwrite_run_dir, dist)
    if config.wandb.project and dist.is_main:
        require_wandb()
    torch.manual_seed(config.seed)
    lm, counts = prepare_model(config, dist.device)
    sharded = dist.enabled and _strategy(config, run_dir, resume) == "fsdp"
    if sharded:
        shard_model(lm, dist.world_size, dist.device, config.bf16)
    params = [p for p in lm.parameters() if p.requires_grad]
    batcher = SequenceBatcher(build_source(config, lm, step=0), config.frames, seed=config.seed,
                              shuffle=config.data.shuffle, whole_documents=config.data.pack == "whole")
    validation = _validation_set(config, lm) if config.do_eval and config.data.eval_data else None
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                                  weight_decay=config.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(warmup_cosine, config.max_steps, config.optim.pct_start))
    step = 0
    if resume:
        step = _resume(run_dir, config, lm, optimizer, schedule, batcher, dist)
    model = DistributedDataParallel(lm, find_unused_parameters=True) if dist.enabled and not sharded else lm
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(run_dir / "config.yaml") as tmp:
            tmp.write_text(config.to_yaml())
        print(config.to_yaml())
        print("trainable parameters: " + ", ".join(f"{g} {counts[g]:,}" for g in GROUPS))
    metrics_log = MetricsLog(run_dir, dist.is_main, config)
    # Sharded, every process runs the model's forwards, the probe's too (only the main one reports).
    probe = RecallProbe.for_run(config, lm, report=dist.is_main) if (dist.is_main or sharded) else None
    metrics_log.forget_after(step)
    last_step = min(config.max_steps, stop_after) if stop_after is not None else config.max_steps
    rows_per_step = config.batch_size * dist.world_size * config.num_microbatches
    losses = []
    # A bar in a terminal; in a log file, a line every log_freq steps instead.
    interactive = sys.stderr.isatty()
    progress = tqdm(range(step, last_step), initial=step, total=config.max_steps, desc="train",
                    disable=not (dist.is_main and interactive))
    train_s = 0.0
    fast_layers = ttt_layers(lm)
    inplace_layers = [(name, layer) for name, layer in fast_layers if layer.method == "inplace"]
    target_etas = [layer.eta for _, layer in inplace_layers]  # each layer's own (its config's, retuned)
    interrupted, last_saved, done = None, None, step
    start_step = step
    with stop_on_signals() as request:
        for step in progress:
            start = time.perf_counter()
            log_now = (step + 1) % config.log_freq == 0
            for (_, layer), eta in zip(inplace_layers, target_etas):
                layer.capture = [] if log_now else None
                layer.eta = eta_at(eta, config.eta_warmup_steps, step)
            if config.data.source == "synthetic" and step in (start_step, config.data.synthetic.varied_from_step):
                batcher.source = build_source(config, lm, step=step)  # the curriculum's lengths, also on resume
            metrics = _train_step(config, dist, lm, model, batcher, optimizer, streams=streams_at(config, step))
            done = step + 1
            schedule.step()
            metrics["lr"] = schedule.get_last_lr()[0]
            if step < config.eta_warmup_steps and inplace_layers:
                metrics["ttt_eta"] = inplace_layers[0][1].eta
            seconds = time.perf_counter() - start
            train_s += seconds
            metrics["frames_per_s"] = rows_per_step * config.frames / seconds
            metrics["train_s"] = train_s  # seconds this process spent in training steps (no evaluation)
            losses.append(metrics["loss"])
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                 fps=f"{metrics['frames_per_s']:.0f}")
            metrics.update(_update_norms(inplace_layers))  # from this step's batch, before any evaluation forward
            if log_now:
                metrics.update(_gates(fast_layers))
            interrupted = request.agreed(dist)  # before the evaluation: torchrun kills 30 s after a signal
            evaluate = ((step + 1) % config.eval_freq == 0 or step + 1 == config.max_steps) and not interrupted
            if validation is not None and evaluate:
                metrics.update(_validation_losses(config, dist, lm, validation))
                if dist.is_main:
                    progress.write(f"step {step + 1}: validation loss {metrics['eval/loss']:.3f} (text "
                                   f"{metrics['eval/text_loss']:.3f}, audio {metrics['eval/audio_loss']:.3f})")
            if probe is not None and (step + 1) % config.eval_freq == 0 and not interrupted:
                recall = probe.measure(lm)
                metrics.update(recall)
                if dist.is_main:
                    progress.write(f"step {step + 1}: held-out recall {100 * recall['recall/accuracy']:.1f}%, "
                                   f"answer CE {recall['recall/cross_entropy']:.3f}, "
                                   f"ratio {recall['recall/key_addressing_ratio']:.3g}")
            if log_now or "recall/accuracy" in metrics or "eval/loss" in metrics:
                metrics_log.log(step + 1, metrics)
            if log_now and dist.is_main and not interactive:
                left = train_s / (step + 1 - start_step) * (last_step - step - 1)
                print(f"step {step + 1}/{config.max_steps}: loss {metrics['loss']:.3f}, lr {metrics['lr']:.2e}, "
                      f"{metrics['frames_per_s']:.0f} frames/s, {train_s:.0f} s, about {left:.0f} s of training "
                      "left", flush=True)
            if config.do_ckpt and ((step + 1) % config.ckpt_freq == 0 or step + 1 == last_step or interrupted):
                state = {"step": step + 1, "schedule": schedule.state_dict(), "rng": rng_state(),
                         "data": batcher.state_dict()}
                last_saved = save_checkpoint(run_dir, step + 1, lm, optimizer, state, config.to_yaml(),
                                             config.keep_last, dist)
            if interrupted:
                progress.close()
                break
        # A signal during the last step's save: the run ends there, its checkpoint written.
        interrupted = interrupted or request.agreed(dist)
    metrics_log.close()
    if dist.is_main:
        from .plots import plot_losses
        plot = plot_losses(run_dir)
        if plot is not None:
            print(f"losses plotted in {plot}")
    if interrupted:
        name = signal.Signals(interrupted).name
        if dist.is_main and not config.do_ckpt:
            print(f"{name}: stopped after step {done} of {config.max_steps}; no checkpoint (do_ckpt: false), "
                  "so the run cannot be resumed.", flush=True)
        elif dist.is_main:
            saved = last_saved or list_checkpoints(run_dir)[-1]
            print(f"{name}: stopped after step {done} of {config.max_steps}; checkpoint written to "
                  f"{saved}. Continue with the same command and --resume.", flush=True)
        raise SystemExit(128 + interrupted)
    if last_step < config.max_steps and dist.is_main:
        print(f"--stop-after {last_step}: stopped after step {last_step} of {config.max_steps}; "
              + ("continue with the same command and --resume." if config.do_ckpt else
                 "no checkpoint (do_ckpt: false), so the run cannot be resumed."), flush=True)
    result = {"losses": losses, "trainable": counts, "run_dir": str(run_dir)}
    if last_step == config.max_steps and sharded:  # the main process gets the whole model back
        whole_state = consolidated_state_dict(lm)
        del model, optimizer, schedule, params, fast_layers, inplace_layers
        lm = None
        gc.collect()  # the shards go before the whole model comes
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
        if dist.is_main:
            lm = prepare_model(config, dist.device)[0]
            lm.load_state_dict(whole_state)
    if last_step == config.max_steps and dist.is_main:
        _export(lm, config, run_dir / "final")  # before the evaluation, which takes minutes
        if probe is not None:
            try:
                result.update(_final_recall(config, probe, lm, run_dir / "recall"))
            except KeyboardInterrupt:
                print(f"\nSIGINT during the final evaluation: the trained model is in {run_dir / 'final'}; "
                      f"score it alone with `moshi-ttt eval --model {run_dir / 'final'} --recall --out {run_dir / 'eval'}`.",
                      flush=True)
                raise SystemExit(128 + signal.SIGINT) from None
    return result


def _final_recall(config: TrainConfig, probe: "RecallProbe", lm: LMModel, out: Path) -> dict[str, tp.Any]:
    """The end-of-run recall: per document (and by length), over streams of one length and of varied ones."""
    result = {"recall": probe.final(lm, out)}
    if config.eval_stream_documents:
        result["recall_stream"] = probe.final_stream(lm, out)
        if max(config.eval_lengths) > 1:
            result["recall_stream_varied"] = probe.final_stream(lm, out / "varied", varied=True)
    return result


def _strategy(config: TrainConfig, run_dir: Path, resume: bool) -> str:
    """ddp or fsdp; `auto` is fsdp, but a resumed run keeps DDP if its checkpoint was written without FSDP."""
    if config.distributed != "auto":
        return config.distributed
    checkpoints = list_checkpoints(run_dir) if resume else []
    return "ddp" if checkpoints and not (checkpoints[-1] / SHARDED_DIR).is_dir() else "fsdp"


def streams_at(config: TrainConfig, step: int) -> bool:
    """Whether the rows of this step keep their fast weights across documents (one conversation a row)."""
    return config.reset_fast_weights == "row" and step >= config.stream_from_step


def _train_step(config: TrainConfig, dist: Distributed, lm: LMModel, model: torch.nn.Module,
                batcher: SequenceBatcher, optimizer: torch.optim.Optimizer, streams: bool) -> dict[str, float]:
    """One optimizer step over `num_microbatches` micro-batches: DDP reduces the gradients after
    the last, FSDP after each (so that they stay sharded)."""
    micro_rows = config.batch_size * dist.world_size
    batches = []
    for _ in range(config.num_microbatches):
        mine = range(dist.rank * config.batch_size, (dist.rank + 1) * config.batch_size)
        codes, segments = batcher.next_rows(micro_rows, keep=lambda row: row in mine)
        if streams:
            segments = torch.zeros_like(segments)  # one conversation a row: its documents share fast weights
        codes, segments = codes.to(dist.device), segments.to(dist.device)
        batches.append((codes, segments, loss_weights(lm, codes, config.first_codebook_weight_multiplier,
                                                      config.text_padding_weight)))
    totals = dist.all_reduce_sum(sum(w.totals() for _, _, w in batches)).clamp(min=1e-6)
    sums = torch.zeros(2, device=dist.device)
    sharded = is_sharded(lm)
    for i, (codes, segments, weights) in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if (last or not dist.enabled or sharded) else model.no_sync()
        with sync, _autocast(config, dist.device), document_segments(lm, segments):
            parts = weighted_losses(model(codes), codes, weights)
            (parts / totals).sum().mul(dist.world_size).backward()
        sums += parts.detach()
    squares = _grad_squares(lm, dist if sharded else None)
    grad_norms = {f"grad_norm/{g}": math.sqrt(v) for g, v in zip(GROUPS, squares.tolist()) if v > 0}
    if config.max_norm > 0:
        # torch's own norm (of DTensor shards too): the logged one's float64 sum differs in the last
        # bits, enough to move a run's trajectory (the main job's recall went from 99.4% to 98.2%).
        torch.nn.utils.clip_grad_norm_([p for p in lm.parameters() if p.requires_grad], config.max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    text, audio = (dist.all_reduce_sum(sums) / totals).tolist()
    if not math.isfinite(text + audio):
        raise FloatingPointError(f"the loss is not finite (text {text}, audio {audio})")
    return {"loss": text + audio, "text_loss": text, "audio_loss": audio, **grad_norms}


def _validation_set(config: TrainConfig, lm: LMModel) -> ValidationSet:
    """The held-out rows (read before the run writes anything): at most VALIDATION_BATCHES batches,
    as moshi-finetune caps its evaluation."""
    try:
        source = build_source(config, lm, config.data.eval_data)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"data.eval_data: {error}") from error
    return ValidationSet(source, config.frames, max_rows=VALIDATION_BATCHES * config.batch_size)


VALIDATION_BATCHES = 40


def _validation_losses(config: TrainConfig, dist: Distributed, lm: LMModel,
                       validation: ValidationSet) -> dict[str, float]:
    """eval/... of the model now and, with TTT, eval_ttt_off/... of the same weights without it."""
    def losses(prefix: str) -> dict[str, float]:
        values = validation.losses(lm, dist, config.batch_size, config.first_codebook_weight_multiplier,
                                   config.text_padding_weight, lambda: _autocast(config, dist.device))
        return {f"{prefix}/{k}": v for k, v in values.items()}
    out = losses("eval")
    if ttt_layers(lm):
        with ttt_disabled(lm):
            out.update(losses("eval_ttt_off"))
    return out


def _autocast(config: TrainConfig, device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and config.bf16)


def _grad_squares(lm: LMModel, shards: Distributed | None) -> torch.Tensor:
    """The squared gradient norm of each parameter group (GROUPS); of the whole gradients when
    they are sharded across `shards` (each process sums the squares of its own part)."""
    device = shards.device if shards is not None else next(lm.parameters()).device
    squares = torch.zeros(len(GROUPS), dtype=torch.float64, device=device)
    for name, param in lm.named_parameters():
        if param.grad is not None:
            norm = torch.linalg.vector_norm(local(param.grad).detach(), dtype=torch.float32)
            squares[GROUPS.index(parameter_group(name))] += norm.double().square()
    if shards is not None:
        shards.all_reduce_sum(squares)
    return squares


def _update_norms(fast_layers: list) -> dict[str, float]:
    """Mean Frobenius norm of each TTT layer's per-chunk fast-weight update, eta * ||c E^T Z||."""
    out = {}
    with torch.no_grad():
        for name, layer in fast_layers:
            norms = [layer.chunk_update_norms(record).flatten() for record in layer.capture or []]
            if norms:
                out[f"fast_weight_update/{name}"] = torch.cat(norms).mean().item()
            layer.capture = None
    return out


def _gates(fast_layers: list) -> dict[str, float]:
    """Mean |tanh(alpha)| of each TTT-MLP block's gate: a peer's gates drifted toward 0 in
    finetuning (the model learning to ignore its blocks), so it is worth watching."""
    with torch.no_grad():
        return {f"ttt_gate/{name}": whole(layer.gate).tanh().abs().mean().item()
                for name, layer in fast_layers if layer.method == "ttt_mlp"}


# Settings a resumed run may change: they do not change what it computes (but for
# `distributed` on a GPU: FSDP computes what trains in bf16, see fsdp.py).
RESUMABLE_CHANGES = ("run_dir", "device", "distributed", "log_freq", "ckpt_freq", "keep_last", "overwrite_run_dir",
                     "do_ckpt", "save_adapters", "do_eval", "eval_freq", "eval_lengths", "data.eval_data", "wandb.project",
                     "wandb.run_name", "wandb.key", "wandb.offline")


def _finished_run(config: TrainConfig) -> dict[str, tp.Any] | None:
    """A run resumed after its last step trains and evaluates nothing again: it says so, and its
    recall is read back from run_dir/recall (for --with-baseline's comparison). None: not finished."""
    run_dir = Path(config.run_dir)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints or checkpoint_step(checkpoints[-1]) < config.max_steps or not (run_dir / "final").is_dir():
        return None
    _check_same_settings(run_dir, checkpoints[-1], config)
    final = run_dir / "final"
    print(f"--resume: the run in {run_dir} is finished (step {config.max_steps} of {config.max_steps}); its model "
          f"is in {final}. Nothing to train; to score it again: "
          f"`moshi-ttt eval --model {final} --recall --out {run_dir / 'eval'}`", flush=True)
    result: dict[str, tp.Any] = {"losses": [], "run_dir": str(run_dir), "finished": True}
    for key, path in (("recall", "recall.json"), ("recall_stream", "recall_stream.json"),
                      ("recall_stream_varied", "varied/recall_stream.json")):
        if (run_dir / "recall" / path).is_file():
            saved = json.loads((run_dir / "recall" / path).read_text())
            result[key] = {m: r for m, r in saved.items() if (m == BASELINE) == config.baseline}
    return result


def _check_data_paths(config: TrainConfig) -> None:
    """The data files the config names exist: a codes directory, a finetune .jsonl."""
    kind = {"codes": ("a directory of .npy code files", Path.is_dir), "finetune": ("a .jsonl file", Path.is_file)}
    if config.data.source not in kind:
        return
    what, exists = kind[config.data.source]
    for key in ("train_data", "eval_data"):
        path = getattr(config.data, key)
        if path and not exists(Path(path)):
            raise FileNotFoundError(f"data.{key}={path!r}: expected {what} (data.source={config.data.source!r}); "
                                    "not found")


def _claim_run_dir(run_dir: Path, overwrite: bool, dist: Distributed) -> None:
    """A new run starts in an empty run_dir (moshi-finetune's rule); overwrite_run_dir empties one
    that holds a run (its config.yaml or checkpoints/), never another directory."""
    held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} is a file, not a directory")
    if held:
        listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        if not overwrite:
            raise ValueError(f"run_dir={str(run_dir)!r} already holds a run ({listed}): continue it with --resume, "
                             "give another run_dir, or set overwrite_run_dir: true to replace it")
        if not {"config.yaml", "checkpoints"} & set(held):
            raise ValueError(f"overwrite_run_dir: run_dir={str(run_dir)!r} holds {listed} but no run (no config.yaml "
                             "or checkpoints/): it is not removed; give an empty or new run_dir")
        if dist.is_main:
            print(f"overwrite_run_dir: removing the previous run in {run_dir}")
            shutil.rmtree(run_dir)
    dist.barrier()


def _check_same_settings(run_dir: Path, checkpoint: Path, config: TrainConfig) -> None:
    """A resumed run keeps the settings it was started with (but those of RESUMABLE_CHANGES)."""
    started = _flat(TrainConfig.from_dict(yaml.safe_load((checkpoint / "config.yaml").read_text())).to_dict())
    now = _flat(config.to_dict())
    changed = [key for key in sorted(set(started) | set(now))
               if key not in RESUMABLE_CHANGES and started.get(key) != now.get(key)]
    if changed:
        listed = ", ".join(f"{k}: {started.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ValueError(f"--resume: the run in {run_dir} was started with other settings ({listed}); resume it "
                         "with its own config (its config.yaml), or start a new run in another run_dir")


def _resume(run_dir: Path, config: TrainConfig, lm: LMModel, optimizer, schedule, batcher: SequenceBatcher,
            dist: Distributed) -> int:
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    _check_same_settings(run_dir, checkpoints[-1], config)
    state = load_checkpoint(checkpoints[-1], lm, optimizer)
    schedule.load_state_dict(state["schedule"])
    batcher.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    if dist.is_main:
        print(f"resumed from {checkpoints[-1]} (step {state['step']})")
    return state["step"]


def _flat(data: dict[str, tp.Any], prefix: str = "") -> dict[str, tp.Any]:
    """{"optim.lr": ..., ...} of a nested config dict."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "tiny":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _export(lm: LMModel, config: TrainConfig, directory: Path) -> None:
    """The trained model as a TTT model directory, or a plain Moshi one for a baseline (LoRA
    merged), for load_ttt_lm, moshi's loader and serving."""
    from moshi.modules.lora import replace_lora_with_linear
    adapters = {}
    if config.mode == "lora":  # what trained (adapters, TTT parameters, embeddings with ft_embed), unmerged
        dtype = torch.bfloat16 if config.bf16 else torch.float32
        adapters = {n: p.detach().to(dtype).contiguous().cpu() for n, p in lm.named_parameters() if p.requires_grad}
        replace_lora_with_linear(lm)
    if config.model != "tiny":  # point to the source's Mimi and tokenizer: serve and eval need them
        lm.moshi_config = with_assets(lm.moshi_config, config.model, mimi_weights=config.data.mimi_weights,
                                      tokenizer=config.data.tokenizer, config_path=config.config_path,
                                      moshi_weights=config.moshi_weights)
    (save_moshi_lm if config.baseline else save_ttt_lm)(lm, directory)
    if config.save_adapters and adapters:  # as moshi-finetune's lora.safetensors: over the base model, not final/
        from safetensors.torch import save_file
        with atomic_file(directory / "lora.safetensors") as tmp:
            save_file(adapters, str(tmp))
    print(f"trained model saved to {directory}")


class RecallProbe:
    """Recall on held-out synthetic documents of the training kind, during and after a run."""

    FINAL_SCALE = 4  # the final evaluation reads this many times more documents

    def __init__(self, config: TrainConfig, lm: LMModel):
        from ..eval.recall import attention_reach, synthetic_recall_set
        self.config = config
        self.settings = dict(config.data.synthetic.layout(), seed=config.seed)
        self.during = synthetic_recall_set(lm, documents=config.eval_documents, **self.settings)
        self.reach = attention_reach(lm)

    @classmethod
    def for_run(cls, config: TrainConfig, lm: LMModel, report: bool = True) -> "RecallProbe | None":
        if not config.do_eval:
            return None
        if config.data.source != "synthetic":
            if not config.data.eval_data and report:
                print(f"do_eval: no held-out data for data.source={config.data.source!r}: set data.eval_data "
                      "for a validation loss during training, or evaluate the trained model with moshi-ttt eval")
            return None
        return cls(config, lm)

    def _summary(self, lm: LMModel, recall_set) -> dict[str, tp.Any]:
        from ..eval.recall import answer_questions, summarize
        device = next(lm.parameters()).device
        with _autocast(self.config, device):  # as in training: frozen bf16 and trained float32 weights mix
            answers = answer_questions(lm, recall_set, batch_size=self.config.batch_size)
        return summarize(answers, num_values=recall_set.num_values, **self.reach)

    def measure(self, lm: LMModel) -> dict[str, float]:
        summary = self._summary(lm, self.during)
        return {f"recall/{k}": summary[k] for k in ("accuracy", "cross_entropy", "p_correct", "p_other",
                                                       "key_addressing_ratio")}

    def final(self, lm: LMModel, out: Path) -> dict[str, dict[str, tp.Any]]:
        """Recall of the trained model (and, for TTT, of the same weights with TTT off), written
        to `out` with a plot; and of the trained model on documents of every `eval_lengths`
        multiple of the length, by distance, with the text loss on their filler. The verdict and
        the distance table are printed."""
        from ..eval.recall import distance_table, synthetic_recall_set, verdict, write_recall
        recall_set = synthetic_recall_set(lm, documents=self.FINAL_SCALE * self.config.eval_documents,
                                          **self.settings)
        results = self._with_ttt_off(lm, lambda: self._summary(lm, recall_set))
        trained = next(iter(results))
        results[trained].update(self._by_length(lm))
        write_recall(results, out)
        print(verdict(results, f"held-out recall, {recall_set.num_questions} questions "
                               f"({recall_set.name}, spacing {self.settings['spacing']}):"))
        print(distance_table(results, "held-out recall by distance, documents of every length:"))
        print(f"recall written to {out}")
        return results

    def _by_length(self, lm: LMModel) -> dict[str, tp.Any]:
        """`by_length` (a summary per multiple of the document length, with the mean text loss at
        each filler frame) and `by_distance_all_lengths` (every length's answers, by distance)."""
        from ..eval.recall import _distance_bins, _stats, score_documents, summarize, synthetic_recall_set
        device = next(lm.parameters()).device
        by_length, everything = {}, []
        for factor in sorted(self.config.eval_lengths):
            settings = dict(self.settings, frames=factor * self.settings["frames"])
            recall_set = synthetic_recall_set(lm, documents=self.FINAL_SCALE * self.config.eval_documents, **settings)
            with _autocast(self.config, device):
                answers, filler = score_documents(lm, recall_set, self.config.batch_size,
                                                  filler_id=lm.text_padding_token_id)
            summary = summarize(answers, num_values=recall_set.num_values, **self.reach)
            by_length[f"{factor}x"] = dict(summary, frames=settings["frames"],
                                           filler_text_loss=[round(float(v), 5) for v in filler])
            everything += answers
        bins = [dict(lo=lo, hi=hi, lo_contexts=lo_c, hi_contexts=hi_c, **_stats(group))
                for (lo, hi, lo_c, hi_c), group in _distance_bins(everything, self.reach["context"])]
        return {"by_length": by_length, "by_distance_all_lengths": bins}

    def _with_ttt_off(self, lm: LMModel, score: tp.Callable[[], dict[str, tp.Any]]) -> dict[str, dict[str, tp.Any]]:
        """{model: score()} for the trained model and, for TTT, the same weights with TTT off."""
        name = BASELINE if self.config.baseline else "TTT"
        results = {name: score()}
        if ttt_layers(lm):
            with ttt_disabled(lm):
                results["same weights, TTT off (diagnostic)"] = score()
        return results

    STREAMS = 4

    def final_stream(self, lm: LMModel, out: Path, varied: bool = False) -> dict[str, dict[str, tp.Any]]:
        """Recall over STREAMS streams of `eval_stream_documents` held-out documents without a reset
        (and, for TTT, with TTT off), written to `out`; the verdict is printed. `varied`: streams
        of documents of 1x to max(eval_lengths)x the length instead, as many frames in all."""
        from ..eval.recall import synthetic_recall_set
        from ..eval.stream_recall import stream_documents, stream_recall, stream_verdict, write_stream_recall
        n, settings = self.config.eval_stream_documents, self.settings
        if varied:
            longest = max(self.config.eval_lengths)
            settings = dict(settings, max_frames=longest * settings["frames"])
            n = max(1, round(2 * n / (1 + longest)))
        streams = stream_documents(synthetic_recall_set(lm, documents=self.STREAMS * n, **settings), n)
        window = self.reach["context"] or self.config.ttt.update_frames
        results = self._with_ttt_off(lm, lambda: stream_recall(lm, streams, window))
        write_stream_recall(results, out)
        print(stream_verdict(results))
        return results

