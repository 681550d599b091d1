"""TTT's own diagnostics: is each chunk's update learning what it is meant to?

For every In-Place TTT layer and chunk i, the layer's TTT objective per token under three
weights: W0 (l0), the fast weights the chunk reads, before its update (lprev), and those
after it (lafter); plus the norm of the chunk's update and of the fast weights' change
after it. The objective is the layer's own: -<Z_i W^T, V_i>_F / n_i for "dot", and
||Z_i (W - W0)^T - V_i||^2 / (2 n_i) for the delta rule ("l2"). The chunks are replayed
with their recorded decay and write strength (`ops.inplace.recurrence.recurrence_trace`).

For every TTT-MLP block and mini-batch, the same three of its inner reconstruction loss
(under the initial inner weights, before the mini-batch's update and after it) and the
norms, as the scan computes them from its own state (`ops.ttt_mlp.ttt_mlp`).
"""

import json
import typing as tp
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.convert import ttt_layers
from ..ops.common import compute_dtype, pad_to_chunks
from ..ops.inplace.recurrence import recurrence_trace
from ..utils.atomic import atomic_file


@torch.no_grad()
def ttt_diagnostics(lm, codes: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """Per TTT layer, per chunk means over the batch of codes [B, K, T] (one document per row)."""
    layers = ttt_layers(lm)
    if not layers:
        raise ValueError("this model has no TTT layers")
    for _, layer in layers:
        layer.capture = []
    try:
        lm(codes)
        return {name: (_layer_diagnostics(layer, layer.capture[0]) if layer.method == "inplace"
                       else _block_diagnostics(layer.capture[0])) for name, layer in layers}
    finally:
        for _, layer in layers:
            layer.capture = None


def _layer_diagnostics(layer, record) -> dict[str, list[float]]:
    """From an In-Place layer's ChunkRecord of one batch of documents."""
    C = layer.chunk_size
    trace = recurrence_trace(record.z, record.v, C, layer.eta, layer.objective, record.decay, record.write)
    cd = compute_dtype(record.z.dtype)
    v = record.v.to(cd)
    sizes = pad_to_chunks(torch.ones_like(v[..., :1]), C).sum(dim=(2, 3))  # tokens per chunk

    def per_token(x: torch.Tensor) -> torch.Tensor:
        return pad_to_chunks(x, C).sum(dim=(2, 3)) / sizes
    if layer.objective == "l2":
        l0, lprev, lafter = (per_token((fast - v).square()) / 2 for fast in (0 * v, trace.before, trace.after))
    else:
        l0 = -per_token(F.linear(record.z, _weight(layer.linear_out)).to(cd) * v)
        lprev, lafter = (l0 - per_token(fast * v) for fast in (trace.before, trace.after))
    stats = {"l0": l0, "lprev": lprev, "lafter": lafter, "update_norm": trace.update_norms,
             "accumulated_norm": trace.state_norms}
    return {key: value.mean(0).tolist() for key, value in stats.items()}


def _block_diagnostics(record: torch.Tensor) -> dict[str, list[float]]:
    """From a TTT-MLP block's [B, H, n, 5] record: means over samples and heads per mini-batch."""
    means = record.float().mean(dim=(0, 1))
    keys = ("l0", "lprev", "lafter", "update_norm", "accumulated_norm")
    return {key: means[:, i].tolist() for i, key in enumerate(keys)}


def _weight(linear) -> torch.Tensor:
    return linear.weight if hasattr(linear, "weight") else linear.merge_weight()


def write_diagnostics(results: dict[str, dict[str, dict[str, list[float]]]], out: Path,
                      chunk_sizes: dict[str, dict[str, int]]) -> list[Path]:
    """diagnostics.json and one PNG per (model, layer) in `out`; chunk_sizes: the frames per
    update of each model's layers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "diagnostics.json") as tmp:
        tmp.write_text(json.dumps({"chunk_size": chunk_sizes, "models": results}, indent=1))
    plots = []
    for model, layers in results.items():
        for layer, stats in layers.items():
            fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
            chunks = np.arange(len(stats["l0"]))
            for key in ("l0", "lprev", "lafter"):
                top.plot(chunks, stats[key], marker="o", label=key)
            top.set_ylabel("TTT objective per token")
            top.legend()
            top.grid(alpha=0.3)
            bottom.plot(chunks, stats["update_norm"], marker="o", label="chunk update")
            bottom.plot(chunks, stats["accumulated_norm"], marker="o", label="accumulated change")
            bottom.set_ylabel("Frobenius norm")
            bottom.set_xlabel(f"update ({chunk_sizes[model][layer]} frames each)")
            bottom.legend()
            bottom.grid(alpha=0.3)
            fig.suptitle(f"{model}: {layer}", fontsize=9)
            fig.tight_layout()
            path = out / f"diagnostics_{_safe(model)}_{_safe(layer)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            plots.append(path)
    return plots


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def activity(fast_weight_change: dict[str, list[float]], threshold: float = 0.0) -> dict[str, tp.Any]:
    """From the fast weights read in the streaming state: did each TTT layer move away from W0?"""
    per_layer = {layer: {"mean": float(np.mean(v)), "max": float(np.max(v))}
                 for layer, v in fast_weight_change.items() if v}
    return {"layers": per_layer, "active": bool(per_layer) and all(s["max"] > threshold for s in per_layer.values())}
