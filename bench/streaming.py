"""Streaming benchmark: moshi's LMGen step latency, plain Moshi 7B against TTT Moshi 7B.

Random weights in the real 7B config (bf16, CUDA graphs as moshi uses them), with
In-Place TTT on every 6th layer from 0 (six layers) at C=512, its token step in
PyTorch ("ttt") and with the Triton kernels ("ttt-kernels"). Each step is timed
on its own, over more than one chunk, so a per-chunk cost would show in the max.

    python bench/streaming.py --batch 1 8 --steps 600
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.models.lm import LMGen

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, markdown_table, write_results  # noqa: E402

from moshi_ttt import TTTConfig, apply_ttt  # noqa: E402


def step_times(lm, batch: int, steps: int, warmup: int = 8) -> list[float]:
    gen = LMGen(lm)
    user = torch.randint(0, lm.card, (batch, lm.n_q - lm.dep_q, 1), device="cuda")
    times = []
    with torch.no_grad(), gen.streaming(batch):
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            gen.step(user)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench/results/streaming.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, device="cuda", dtype=torch.bfloat16)
    runs = {}
    for batch in args.batch:
        runs[("plain", batch)] = step_times(lm, batch, args.steps)
    apply_ttt(lm, TTTConfig(chunk_size=args.chunk_size, init="normal", init_std=0.02, eta=1e-3, x0_source="input"))
    for batch in args.batch:
        runs[("ttt", batch)] = step_times(lm, batch, args.steps)
    os.environ["MOSHI_TTT_KERNELS"] = "1"
    for batch in args.batch:
        runs[("ttt-kernels", batch)] = step_times(lm, batch, args.steps)
    rows, results = [], []
    for (kind, batch), times in runs.items():
        median = statistics.median(times)
        plain = statistics.median(runs[("plain", batch)])
        results.append({"model": kind, "batch": batch, "median_ms": median, "max_ms": max(times),
                        "ratio_to_plain": median / plain, "steps": len(times)})
        rows.append([kind, batch, median, max(times), median / plain])
    env = environment(torch.device("cuda"))
    write_results(args.out, {**env, "chunk_size": args.chunk_size, "ttt_layers": lm.ttt_config.layer_indices(32),
                             "results": results})
    print(f"{env['device']}, torch {env['torch']}, {env['date']}; Moshi 7B config, bf16, CUDA graphs")
    print(markdown_table(["model", "batch", "median ms/step", "max ms/step", "median / plain"], rows))


if __name__ == "__main__":
    main()
