"""A PNG of a run's losses, beside its metrics.jsonl."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(run_dir: Path) -> Path | None:
    """losses.png from the run's metrics.jsonl; None when nothing was logged yet."""
    metrics = run_dir / "metrics.jsonl"
    entries = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "text_loss", "audio_loss", "eval/loss", "eval_ttt_off/loss"):
        points = [(e["step"], e[key]) for e in entries if key in e]
        if points:
            ax.plot(*zip(*points), label=key.replace("eval/loss", "validation loss").replace(
                "eval_ttt_off/loss", "validation loss, TTT off (diagnostic)"), marker="o" if "/" in key else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (weighted)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "losses.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
