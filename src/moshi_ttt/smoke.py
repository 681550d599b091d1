"""`moshi-ttt smoke`: build a tiny TTT Moshi, stream it with moshi's LMGen, check it.

The check replays the transformer inputs LMGen produced through the parallel
(training) path and compares: streaming and parallel In-Place TTT must agree.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from moshi.models.lm import LMGen
from tqdm import tqdm

from .models import TTTConfig, build_lm, tiny_lm_config, ttt_layers
from .utils.atomic import atomic_file


def smoke(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="moshi-ttt smoke", description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="LMGen steps (frames)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/smoke"), help="where summary.json goes")
    args = parser.parse_args(argv)

    # X0 is the transformer input, so that the replay through the transformer alone has it.
    ttt = TTTConfig(every=2, chunk_size=args.chunk_size, init="normal", init_std=0.05, eta=0.05, x0_source="input")
    lm = build_lm(tiny_lm_config(), ttt, seed=args.seed)
    gen = LMGen(lm, temp=0.8, temp_text=0.7)
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = lm.transformer.register_forward_hook(lambda m, a, out: recorded.append((a[0], out)))
    generator = torch.Generator().manual_seed(args.seed)
    user_codes = torch.randint(0, lm.card, (args.batch, lm.n_q - lm.dep_q, args.steps), generator=generator)
    start = time.perf_counter()
    with torch.no_grad(), gen.streaming(args.batch):
        for t in tqdm(range(args.steps), desc="LMGen steps", unit="frame"):
            gen.step(user_codes[:, :, t:t + 1])
        fast_weight_norms = {name: layer.fast_weight_change_norms().norm().item() for name, layer in ttt_layers(lm)}
    seconds = time.perf_counter() - start
    hook.remove()

    inputs = torch.cat([x for x, _ in recorded], dim=1)
    streamed = torch.cat([y for _, y in recorded], dim=1)
    with torch.no_grad():
        parallel = lm.transformer(inputs)
    summary = {
        "layers": lm.ttt_config.layer_indices(len(lm.transformer.layers)),
        "chunk_size": args.chunk_size,
        "steps": args.steps,
        "batch": args.batch,
        "ms_per_step": 1000 * seconds / args.steps,
        "fast_weight_change_norm": fast_weight_norms,
        "max_abs_diff_streaming_vs_parallel": (streamed - parallel).abs().max().item(),
    }
    with atomic_file(args.out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"summary written to {args.out / 'summary.json'}")
    if not summary["max_abs_diff_streaming_vs_parallel"] < 1e-3:
        raise SystemExit("streaming and parallel In-Place TTT disagree")
    return summary
