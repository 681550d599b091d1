"""Memory plan for training TTT Moshi 7B: the per-GPU peak of a step, DDP against FSDP.

No GPU and no weights: the activations are measured on the meta device (torch's
MemTracker) for one row of T frames, in each mode, with and without activation
checkpointing; what does not depend on T is counted. Per GPU, with b rows a GPU:

    DDP:   frozen (bf16) + trained x (4 master + 4 grad + 8 Adam + 4 DDP bucket + 2 bf16
           autocast copy) bytes + b x activations
    FSDP:  (frozen x 2 + trained x 16 bytes) / N + the whole units (the root, which FSDP
           keeps gathered, and two layer units: the one running and the next one, in bf16,
           with the trained part's bf16 gradients and their float32 copies to reduce)
           + b x activations

Attention is counted as on a GPU (the memory-efficient kernel, given moshi's context mask
as a bias) rather than as the meta device's math kernel would (every T x T score kept);
activations scale with b as measured for one row (gradient accumulation divides b), and
AdamW's temporaries are left out. Moshi 7B with TTT on layers 0, 6, ...,
30 (In-Place, C=512), at moshi-finetune's setting (1250 frames, 16 rows over the GPUs)
and at long sequences (one row per GPU).

    python bench/model_memory.py                     # the plan (15 minutes on a CPU)
    python bench/model_memory.py --lengths 1250 --gpus 1 8
    python bench/model_memory.py --measured bench/results/model_memory.json --rows 32   # plan again, no measuring
"""

import argparse
import contextlib
import json
import sys
import types
import typing as tp
from pathlib import Path

import torch
import torch.nn.functional as F
from moshi.models import loaders
from moshi.modules.transformer import StreamingTransformerLayer

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, markdown_table, write_results  # noqa: E402

from moshi_ttt import TTTConfig, apply_ttt  # noqa: E402
from moshi_ttt.train.modes import apply_mode  # noqa: E402
from moshi_ttt.train.trainer import set_gradient_checkpointing  # noqa: E402

MODES = ("full", "ttt_layers", "lora", "ttt")
GIB = 2**30
GPU_GIB = 76  # what an 80 GB GPU (79.6 GiB) leaves after CUDA's context, NCCL's buffers and fragmentation
NO_HOOK = types.SimpleNamespace(remove=lambda: None)


def activation_gib(lm, length: int) -> float:
    """Peak memory a training step holds beyond the parameters and their gradients, one row."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class ActivationPeak(MemTracker):
        peak = 0

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            for snapshot in self._curr_mem_snap.values():
                held = snapshot["Total"] - snapshot[_MemRefType.PARAM] - snapshot[_MemRefType.GRAD]
                self.peak = max(self.peak, held)

    codes = torch.zeros(1, lm.num_codebooks, length, dtype=torch.long, device="meta")
    for p in lm.parameters():
        p.grad = None
    tracker = ActivationPeak()
    for p in lm.parameters():  # MemTracker hooks every parameter's gradient: not those of frozen ones
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (NO_HOOK, NO_HOOK)
    tracker.track_external(lm)
    with tracker, gpu_attention():
        out = lm(codes)
        (out.logits.float().sum() + out.text_logits.float().sum()).backward()
    return tracker.peak / GIB


@contextlib.contextmanager
def gpu_attention() -> tp.Iterator[None]:
    """Attention through the memory-efficient kernel, as a GPU runs moshi's masked attention
    (the mask becomes a float bias); the meta device would otherwise take the math kernel."""
    math_kernel = F.scaled_dot_product_attention

    def efficient(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        bias = attn_mask
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, is_causal,
                                                                      scale=scale)[0]
    F.scaled_dot_product_attention = efficient
    try:
        yield
    finally:
        F.scaled_dot_product_attention = math_kernel


def moshi_7b(mode: str, ttt: bool) -> torch.nn.Module:
    lm = loaders.get_moshi_lm(None, device="meta", dtype=torch.bfloat16)
    if ttt:
        apply_ttt(lm, TTTConfig(chunk_size=512, init="normal", init_std=0.02, x0_source="input", every=6))
    apply_mode(lm, mode, lora_rank=128, lora_scaling=2.0)  # moshi-finetune's example rank
    return lm


def static_counts(lm) -> dict[str, float]:
    """Parameter counts: frozen, trained, and those of the largest transformer-layer unit and the root."""
    frozen = sum(p.numel() for p in lm.parameters() if not p.requires_grad)
    trained = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    units = [m for m in lm.modules() if isinstance(m, StreamingTransformerLayer)]
    in_units = {id(p) for m in units for p in m.parameters()}

    def size(params) -> tuple[int, int]:
        params = list(params)
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    unit, unit_trained = max(size(m.parameters()) for m in units)
    root, root_trained = size(p for p in lm.parameters() if id(p) not in in_units)
    return {"frozen": frozen, "trained": trained, "unit": unit, "unit_trained": unit_trained,
            "root": root, "root_trained": root_trained}


def per_gpu_gib(counts: dict[str, float], activations: float, rows: int, strategy: str, gpus: int) -> float:
    frozen, trained = counts["frozen"], counts["trained"]
    if strategy == "ddp":
        bucket = 4 if gpus > 1 else 0
        static = 2 * frozen + (4 + 4 + 8 + bucket + 2) * trained
    else:
        gathered = (2 * (counts["root"] + 2 * counts["unit"])
                    + 6 * (counts["root_trained"] + 2 * counts["unit_trained"]))
        static = (2 * frozen + 16 * trained) / gpus + gathered
    return static / GIB + rows * activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1250, 3072, 12288])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rows", type=int, default=16, help="rows of a step at the first length, over the GPUs")
    parser.add_argument("--measured", type=Path, help="the activations of an earlier run's JSON, not measured again")
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_memory.json"))
    args = parser.parse_args()
    if args.measured is not None:
        measured = json.loads(args.measured.read_text())["measured"]
        args.lengths = sorted({m["T"] for m in measured})
    else:
        measured = measure(args.lengths)
    plan = []
    for entry in (m for m in measured if m["model"] == "ttt"):
        for gpus in args.gpus:
            rows = max(1, args.rows // gpus) if entry["T"] == args.lengths[0] else 1
            for strategy in ("ddp", "fsdp") if gpus > 1 else ("ddp",):
                plan.append({"mode": entry["mode"], "checkpointing": entry["checkpointing"], "T": entry["T"],
                             "gpus": gpus, "rows_per_gpu": rows, "strategy": strategy if gpus > 1 else "one GPU",
                             "per_gpu_gib": per_gpu_gib(entry, entry["activations_gib"], rows, strategy, gpus)})
    env = environment(torch.device("meta"))
    write_results(args.out, {**env, "gpu_gib": GPU_GIB, "rows": args.rows, "measured": measured, "plan": plan})
    print(f"{env['device']}, torch {env['torch']}, {env['date']}; Moshi 7B + In-Place TTT on 6 layers, "
          f"per-GPU peak of a training step (GiB; in brackets: above the {GPU_GIB} an 80 GB GPU holds)")
    print(plan_table(plan, args.gpus, args.rows))
    plot(plan, args.lengths[0], args.rows, args.gpus, args.out.with_suffix(".png"))


def measure(lengths: list[int]) -> list[dict[str, tp.Any]]:
    """Activations of a row of each length, in each mode, with and without checkpointing (and
    the plain model's, in full mode, for TTT's share)."""
    measured = []
    for mode in MODES:
        lm = moshi_7b(mode, ttt=True)
        counts = static_counts(lm)
        for checkpointing in (False, True):
            set_gradient_checkpointing(lm, checkpointing)
            for length in lengths:
                gib = activation_gib(lm, length)
                measured.append({"model": "ttt", "mode": mode, "checkpointing": checkpointing, "T": length,
                                 "activations_gib": gib, **counts})
                print(f"{mode:<10} checkpointing {checkpointing!s:<5} T={length:<6} activations {gib:6.1f} GiB "
                      f"a row", flush=True)
    plain = moshi_7b("full", ttt=False)  # TTT's cost in activations, beside the plain model's
    for length in lengths:
        measured.append({"model": "plain", "mode": "full", "checkpointing": False, "T": length,
                         "activations_gib": activation_gib(plain, length), **static_counts(plain)})
    return measured


def plan_table(plan: list[dict[str, tp.Any]], gpus: list[int], rows_a_step: int) -> str:
    columns = [(n, s) for n in gpus for s in (("ddp", "fsdp") if n > 1 else ("one GPU",))]
    rows = {}
    for entry in plan:
        key = (entry["T"], entry["mode"], entry["checkpointing"])
        rows.setdefault(key, {})[(entry["gpus"], entry["strategy"])] = entry
    header = ["T", "rows a GPU", "mode", "act. ckpt"] + [f"{n} {s}" for n, s in columns]
    lines = []
    for (length, mode, checkpointing), cells in rows.items():
        per_gpu = {cells[c]["rows_per_gpu"] for c in cells}
        row = [length, "1" if per_gpu == {1} else f"{rows_a_step} / GPUs", mode, "yes" if checkpointing else "no"]
        row += [_cell(cells[c]["per_gpu_gib"]) if c in cells else "" for c in columns]
        lines.append(row)
    return markdown_table(header, lines)


def _cell(gib: float) -> str:
    return f"{gib:.0f}" if gib <= GPU_GIB else f"({gib:.0f})"


def plot(plan: list[dict[str, tp.Any]], length: int, rows_a_step: int, gpus: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, checkpointing in zip(axes, (False, True)):
        for mode, color in zip(MODES, ("C0", "C1", "C2", "C3")):
            for strategy, style in (("ddp", "--"), ("fsdp", "-")):
                points = sorted((e["gpus"], e["per_gpu_gib"]) for e in plan
                                if e["T"] == length and e["mode"] == mode and e["checkpointing"] == checkpointing
                                and e["strategy"] in (strategy, "one GPU"))
                ax.plot(*zip(*points), style, color=color, marker="o", label=f"{mode}, {strategy}")
        ax.axhline(GPU_GIB, color="gray", lw=1)
        ax.text(gpus[0], GPU_GIB * 1.05, f"{GPU_GIB} GiB: an 80 GB GPU", fontsize=7, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_xticks(gpus, [str(n) for n in gpus])
        ax.set_yscale("log")
        ax.set_xlabel("GPUs")
        ax.set_title(f"T={length}, {rows_a_step} rows a step, "
                     f"activation checkpointing {'on' if checkpointing else 'off'}")
    axes[0].set_ylabel("per-GPU peak (GiB)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
