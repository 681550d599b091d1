"""Loss against position on long audio: does the model get better the more it has heard?

Both streams are scored: the model's audio codebooks and its text (where a memory of
stated facts shows, in the synthetic task).

Each document is teacher-forced as Moshi's own stream (the user's stream silent,
the text stream padding, unless the codes say otherwise), one stream per batch
row, through `position_losses`. The losses are averaged over documents position
by position; the summary gives the loss at chosen positions and the slope of the
mean audio loss from early to late positions. Beyond the attention context
(3000 frames in Moshi), only the fast weights remember.
"""

import csv
import json
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..utils.atomic import atomic_file
from ..models.streams import scored_alone
from .teacher_forcing import position_losses


@dataclass
class PositionCurve:
    """Mean cross-entropy per position over documents, per scored codebook."""
    name: str
    losses: np.ndarray  # [1 + dep_q, T], NaN where no document reaches
    counts: np.ndarray  # [T] documents that reach each position
    fast_weight_change: dict[str, list[float]] = field(default_factory=dict)

    @property
    def audio(self) -> np.ndarray:
        """Mean over the audio codebooks, per position."""
        with np.errstate(invalid="ignore"):
            return np.nanmean(self.losses[1:], axis=0)

    def summary(self, positions: tp.Sequence[int]) -> dict[str, tp.Any]:
        audio = self.audio
        valid = ~np.isnan(audio)
        at = {str(p): float(audio[p]) for p in positions if p < len(audio) and valid[p]}
        x = np.nonzero(valid)[0]
        slope = float(np.polyfit(x, audio[x], 1)[0] * 1000) if len(x) > 1 else float("nan")
        quarter = max(1, len(x) // 4)
        text = self.losses[0]
        t = np.nonzero(~np.isnan(text))[0]
        text_quarter = max(1, len(t) // 4)
        return {
            "text_loss_at": {str(p): float(text[p]) for p in positions if p < len(text) and not np.isnan(text[p])},
            "text_loss_mean": float(text[t].mean()) if len(t) else float("nan"),
            "text_early_quarter_mean": float(text[t[:text_quarter]].mean()) if len(t) else float("nan"),
            "text_late_quarter_mean": float(text[t[-text_quarter:]].mean()) if len(t) else float("nan"),
            "audio_loss_at": at,
            "audio_loss_mean": float(audio[x].mean()) if len(x) else float("nan"),
            "slope_per_1000_frames": slope,
            "early_quarter_mean": float(audio[x[:quarter]].mean()) if len(x) else float("nan"),
            "late_quarter_mean": float(audio[x[-quarter:]].mean()) if len(x) else float("nan"),
            "documents": int(self.counts.max()) if len(self.counts) else 0,
        }


def evaluate_documents(lm, documents: tp.Sequence[torch.Tensor], name: str, *, window: int = 1,
                       batch_size: int = 1, max_frames: int | None = None) -> PositionCurve:
    """`position_losses` over documents (codes [K, T] each), batched by similar length."""
    device = next(lm.parameters()).device
    docs = [d[:, :max_frames] if max_frames else d for d in documents]
    length = max(d.shape[1] for d in docs)
    sums = np.zeros((1 + lm.dep_q, length))
    counts = np.zeros((1 + lm.dep_q, length))
    changes: dict[str, list[float]] = {}
    order = sorted(range(len(docs)), key=lambda i: docs[i].shape[1])
    for start in tqdm(range(0, len(order), batch_size), desc=f"loss by position ({name})", unit="batch"):
        batch = [docs[i] for i in order[start:start + batch_size]]
        frames = max(d.shape[1] for d in batch)
        codes = torch.full((len(batch), lm.num_codebooks, frames), lm.zero_token_id, dtype=torch.long)
        for row, doc in enumerate(batch):
            codes[row, :, :doc.shape[1]] = doc
        losses, fast = position_losses(lm, codes.to(device), window)
        alone = scored_alone(lm, [d.shape[1] for d in batch], frames, losses.device)
        losses = torch.where(alone, losses, float("nan")).cpu().numpy()
        seen = ~np.isnan(losses)
        sums[:, :frames] += np.where(seen, losses, 0).sum(0)
        counts[:, :frames] += seen.sum(0)
        for layer, norms in fast.items():
            changes.setdefault(layer, []).extend(norms.tolist())
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return PositionCurve(name, mean, counts.max(0), changes)


def write_curves(curves: list[PositionCurve], out: Path, *, positions: tp.Sequence[int], context: int | None,
                 smooth: int = 25) -> dict[str, tp.Any]:
    """loss_by_position.csv, .json and .png in `out`; returns the JSON's content."""
    out.mkdir(parents=True, exist_ok=True)
    length = max(c.losses.shape[1] for c in curves)
    with atomic_file(out / "loss_by_position.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        header = ["position"]
        for c in curves:
            header += [f"{c.name}/text"] + [f"{c.name}/audio_{k}" for k in range(c.losses.shape[0] - 1)]
            header += [f"{c.name}/audio_mean", f"{c.name}/documents"]
        writer.writerow(header)
        for t in range(length):
            row: list[tp.Any] = [t]
            for c in curves:
                reached = t < c.losses.shape[1]
                losses = list(c.losses[:, t]) + [c.audio[t]] if reached else [float("nan")] * (len(c.losses) + 1)
                row += [f"{v:.5f}" for v in losses] + [int(c.counts[t]) if reached else 0]
            writer.writerow(row)
    result = {
        "context": context,
        "positions": list(positions),
        "summary": {c.name: c.summary(positions) for c in curves},
        "fast_weight_change": {c.name: c.fast_weight_change for c in curves},
        "curves": {c.name: {"audio_mean": _nan_to_none(c.audio), "text": _nan_to_none(c.losses[0]),
                            "documents": c.counts.astype(int).tolist()} for c in curves},
    }
    with atomic_file(out / "loss_by_position.json") as tmp:
        tmp.write_text(json.dumps(result))
    plot_curves(curves, out / "loss_by_position.png", context=context, smooth=smooth)
    return result


def plot_curves(curves: list[PositionCurve], path: Path, *, context: int | None, smooth: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for ax, stream in zip(axes, ("audio", "text")):
        for c in curves:
            values = c.audio if stream == "audio" else c.losses[0]
            x = np.nonzero(~np.isnan(values))[0]
            if not len(x):
                continue
            kernel = np.ones(min(smooth, len(x))) / min(smooth, len(x))
            ax.plot(x[:len(x) - len(kernel) + 1] + len(kernel) // 2, np.convolve(values[x], kernel, mode="valid"),
                    label=c.name)
        if context is not None:
            ax.axvline(context, color="black", linestyle="--", linewidth=1, label=f"attention context ({context})")
        ax.set_ylabel(f"{stream} cross-entropy\n(moving average of {smooth})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("position (frames, 12.5 per second)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else round(float(v), 6) for v in values]
