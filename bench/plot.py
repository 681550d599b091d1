"""Plot benchmark results (JSON written by layer.py / streaming.py) as PNGs beside them.

    python bench/plot.py bench/results/layer.json bench/results/streaming.json
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_layer(data: dict, out: Path) -> None:
    lengths = sorted({r["T"] for r in data["results"]})
    impls = [i for i in dict.fromkeys(r["impl"] for r in data["results"]) if i != "plain"]
    panels = [(key, label) for key, label in (("time_ratio", "fwd+bwd time / plain MLP"),
                                             ("memory_ratio", "peak memory / plain MLP"),
                                             ("flop_ratio", "matmul FLOPs / plain MLP"))
              if any(r.get(key) is not None for r in data["results"])]  # estimates on meta have no times
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for impl in impls:
            points = [(r["T"], r[key]) for r in data["results"] if r["impl"] == impl and r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(t) for t in lengths])
        ax.set_xlabel("sequence length T (frames)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"In-Place TTT layer, d={data['dim']}, h={data['hidden']}, C={data['chunk']}, "
                 f"{data['dtype']}\n{data['device']}, {data['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_streaming(data: dict, out: Path) -> None:
    batches = sorted({r["batch"] for r in data["results"]})
    fig, ax = plt.subplots(figsize=(5, 4))
    models = [m for m in ("plain", "ttt", "ttt-kernels") if any(r["model"] == m for r in data["results"])]
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        values = [next(r["median_ms"] for r in data["results"] if r["model"] == model and r["batch"] == b)
                  for b in batches]
        ax.bar([x + i * width for x in range(len(batches))], values, width, label=model)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("LMGen step, median ms")
    ax.legend()
    ax.set_title(f"Moshi 7B streaming step, TTT on {len(data['ttt_layers'])} layers\n"
                 f"{data['device']}, {data['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    for name in sys.argv[1:]:
        path = Path(name)
        data = json.loads(path.read_text())
        plot = plot_layer if "hidden" in data else plot_streaming
        plot(data, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
