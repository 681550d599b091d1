"""TTT's own diagnostics: is each chunk's update learning what it is meant to?

For every In-Place TTT layer and chunk i, the TTT objective l(W) = -<Z_i W^T, V_i>_F / n_i
(per token) under three weights: W0 (l0), the fast weights before the chunk's
update (lprev), and after it (lafter); plus the norm of the chunk's update and of
the fast weights' accumulated change. All follow from inner products of Z and V,
so no d x h matrix is formed:

    lprev  = l0 - eta <Z_i S_i^T, V_i> / n_i            (S_i: the clipped updates before i)
    lafter = lprev - eta c_i ||V_i^T Z_i||^2 / n_i
    ||S_{i+1}||^2 = ||S_i||^2 + 2 c_i <Z_i S_i^T, V_i> + c_i^2 ||V_i^T Z_i||^2

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
from ..ops.inplace import chunk_delta_sq_norms, clip_scales, expand_chunk_values, scan_add_
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
        return {name: (_layer_diagnostics(layer, *layer.capture[0]) if layer.method == "inplace"
                       else _block_diagnostics(layer.capture[0])) for name, layer in layers}
    finally:
        for _, layer in layers:
            layer.capture = None


def _layer_diagnostics(layer, z: torch.Tensor, v: torch.Tensor) -> dict[str, list[float]]:
    C, eta = layer.chunk_size, layer.eta
    cd = compute_dtype(z.dtype)
    zf, vf = z.to(cd), v.to(cd)
    T = z.shape[1]
    sq = chunk_delta_sq_norms(zf, vf, C)  # [B, n]
    scales = clip_scales(sq, eta, layer.clip_tau)
    slow = F.linear(z, _weight(layer.linear_out)).to(cd)
    vc = vf * expand_chunk_values(scales, C, T)
    fast = scan_add_(zf, vc, torch.zeros_like(vf), C, 1.0, block_size=-(-T // C) * C)  # Z_i S_i^T
    sizes = pad_to_chunks(torch.ones_like(zf[..., :1]), C).sum(dim=(2, 3))  # tokens per chunk
    l0 = -(pad_to_chunks(slow * vf, C)).sum(dim=(2, 3)) / sizes
    before = (pad_to_chunks(fast * vf, C)).sum(dim=(2, 3))  # <Z_i S_i^T, V_i>
    lprev = l0 - eta * before / sizes
    lafter = lprev - eta * scales * sq / sizes
    accumulated = torch.zeros_like(sq)
    total = torch.zeros_like(sq[:, 0])
    for i in range(sq.shape[1]):
        total = total + 2 * scales[:, i] * before[:, i] + scales[:, i] ** 2 * sq[:, i]
        accumulated[:, i] = eta * total.clamp(min=0).sqrt()
    stats = {"l0": l0, "lprev": lprev, "lafter": lafter, "update_norm": eta * scales * sq.sqrt(),
             "accumulated_norm": accumulated}
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
