"""Model benchmark: peak memory of a Moshi 7B training step, plain against TTT Moshi.

Estimated on the meta device (no GPU, no weights: torch's MemTracker counts what
a step would allocate): LMModel.forward on T frames and the backward of its text
and audio logits, every parameter trained, bf16, batch 1, no activation
checkpointing; TTT on every 6th layer from 0 at C=512.

    python bench/model_memory.py --lengths 1024 3072
"""

import argparse
import sys
from pathlib import Path

import torch
from moshi.models import loaders

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, markdown_table, peak_memory_gib, write_results  # noqa: E402

from moshi_ttt import TTTConfig, apply_ttt  # noqa: E402


def step_peak_gib(lm, length: int) -> float:
    codes = torch.zeros(1, lm.num_codebooks, length, dtype=torch.long, device="meta")

    def step():
        for p in lm.parameters():
            p.grad = None
        out = lm(codes)
        (out.logits.float().sum() + out.text_logits.float().sum()).backward()
    return peak_memory_gib(step, torch.device("meta"), tracked=(lm,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 3072])
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_memory.json"))
    args = parser.parse_args()
    lm = loaders.get_moshi_lm(None, device="meta", dtype=torch.bfloat16)
    plain = {T: step_peak_gib(lm, T) for T in args.lengths}
    apply_ttt(lm, TTTConfig(chunk_size=args.chunk_size, init="normal", init_std=0.02, x0_source="input"))
    ttt = {T: step_peak_gib(lm, T) for T in args.lengths}
    results = [{"T": T, "plain_gib": plain[T], "ttt_gib": ttt[T], "ratio": ttt[T] / plain[T]} for T in args.lengths]
    env = environment(torch.device("meta"))
    write_results(args.out, {**env, "chunk_size": args.chunk_size, "ttt_layers": lm.ttt_config.layer_indices(32),
                             "results": results})
    print(f"{env['device']}, torch {env['torch']}, {env['date']}; Moshi 7B training step, bf16, batch 1")
    print(markdown_table(["T", "plain GiB", "TTT GiB", "TTT / plain"],
                         [[r["T"], r["plain_gib"], r["ttt_gib"], r["ratio"]] for r in results]))


if __name__ == "__main__":
    main()
