"""Layer benchmark: forward+backward time and peak memory against the plain gated MLP.

Compares, in one run on one device: moshi's ActivationGating (plain), our
InPlaceTTTGating with each exact form (dual; the block scan with several block
sizes; and the automatic choice),
a reference that materialises one float32 weight per chunk, as the earlier
codebase (and the paper's code) computed it, and the second method, a TTT-MLP block
(Sun et al. 2024; as many heads as Moshi's attention, mini-batches of 16) with its scan
checkpointed in groups of 16 mini-batches and without checkpoints. Ratios are to the plain MLP.

    python bench/layer.py                    # Moshi's size on the GPU: d=4096, h=11264, C=512, bf16
    python bench/layer.py --size small       # CPU-sized: d=256, h=704, C=64, float32
    python bench/layer.py --device meta      # Moshi's size, peak memory only, estimated on any machine
    python bench/layer.py --device meta --dtype float32   # ... and the matmul FLOPs of each candidate

Each candidate is measured with only its own weights allocated (plus the shared
inputs x, x0 and the output gradient), so memory ratios are the layers' own.
"""

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from moshi.modules.gating import ActivationGating

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, markdown_table, peak_memory_gib, time_ms, write_results  # noqa: E402

from moshi_ttt import InPlaceTTTGating, TTTMLPBlock  # noqa: E402
from moshi_ttt.ops import block_size_for  # noqa: E402
from moshi_ttt.ops.common import pad_to_chunks  # noqa: E402

SIZES = {
    "moshi": dict(dim=4096, dim_feedforward=int(4.125 * 4096), chunk=512, lengths=[3072, 12288, 49152],
                  dtype="bfloat16", heads=32),
    "small": dict(dim=256, dim_feedforward=int(4.125 * 256), chunk=64, lengths=[512, 2048], dtype="float32",
                  heads=4),
}


def materialized_ttt(layer: InPlaceTTTGating, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """In-Place TTT with one float32 d x h weight per chunk (the costly way, for reference)."""
    z = layer.gated(x)
    v = layer.ttt_target(x0, layer.chunk_size)
    T = x.shape[1]
    zc = pad_to_chunks(z.float(), layer.chunk_size)
    vc = pad_to_chunks(v.float(), layer.chunk_size)
    deltas = torch.einsum("bncd,bnch->nbdh", vc, zc)
    before = torch.cumsum(deltas, dim=0) - deltas
    weights = layer.linear_out.weight.float() + layer.eta * before
    out = torch.einsum("bnch,nbdh->bncd", zc, weights)
    return out.reshape(x.shape[0], -1, x.shape[2])[:, :T].to(x.dtype)


def ttt_forward(layer: InPlaceTTTGating, algorithm: str, block: int | None, x, x0):
    """The layer with `algorithm` and, for the scan, blocks of `block` positions (None: its default)."""
    layer.algorithm, layer.scan_block = algorithm, block
    return layer(x, x0)


def measure(forward, module, x, x0, grad_out, device):
    def step():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        forward().backward(grad_out)
    try:
        ms = None if device.type == "meta" else time_ms(step, device)
        gib = peak_memory_gib(step, device, tracked=(module, x, x0, grad_out))
        flops = matmul_flops(step) if device.type == "meta" and x.dtype == torch.float32 else None
    except torch.OutOfMemoryError:
        return None, None, None
    finally:
        for p in module.parameters():
            p.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ms, gib, flops


def matmul_flops(fn) -> int:
    """FLOPs of the matrix products `fn` runs (float32 on meta: low-precision products
    with float32 outputs are not dispatched there)."""
    from torch.utils.flop_counter import FlopCounterMode

    def baddbmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        batch, n, k = a_shape
        return 2 * batch * n * k * b_shape[-1]
    # torch's table counts baddbmm, not its in-place form, which the TTT ops use.
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: baddbmm_}) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="moshi")
    parser.add_argument("--lengths", type=int, nargs="*")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: the size's (bf16 for moshi)")
    parser.add_argument("--clip-tau", type=float, default=None, help="clip each chunk's update (off by default)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/layer[-SIZE][-meta][-DTYPE].json)")
    args = parser.parse_args()
    size = SIZES[args.size]
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or size["dtype"])
    torch.manual_seed(0)
    gating = ActivationGating(size["dim"], size["dim_feedforward"], F.silu, device=device, dtype=dtype)
    hidden = gating.linear_out.weight.shape[1]
    default_block = block_size_for("scan", 1, size["dim"], hidden, size["chunk"])
    scan_blocks = sorted({size["chunk"], default_block, 2 * default_block})
    rows, results = [], []
    lengths = args.lengths or size["lengths"]
    # Per length: the plain MLP, the In-Place TTT forms (auto, dual, each scan block, materialized), TTT-MLP twice.
    progress = tqdm(total=len(lengths) * (6 + len(scan_blocks)), desc="layer benchmark", unit="measurement")

    def measured_one(name: str, T: int, *args) -> tuple:
        result = measure(*args)
        progress.set_postfix_str(f"T={T} {name}")
        progress.update()
        return result
    for T in lengths:
        x = torch.randn(1, T, size["dim"], device=device, dtype=dtype, requires_grad=True)
        x0 = torch.randn(1, T, size["dim"], device=device, dtype=dtype)
        grad_out = torch.randn(1, T, size["dim"], device=device, dtype=dtype)
        measured = {"plain": measured_one("plain", T, lambda: gating(x), gating, x, x0, grad_out, device)}
        # Made after the plain MLP is measured, so that its target generator is not counted there.
        layer = InPlaceTTTGating.from_gating(gating, chunk_size=size["chunk"], eta=1e-3, init="normal",
                                             init_std=0.02, clip_tau=args.clip_tau)
        candidates = {"ttt-auto": ("auto", None), "ttt-dual": ("dual", None)}
        candidates.update({f"ttt-scan-{block}": ("scan", block) for block in scan_blocks})
        for name, (algorithm, block) in candidates.items():
            measured[name] = measured_one(name, T, lambda a=algorithm, b=block, m=layer: ttt_forward(m, a, b, x, x0),
                                          layer, x, x0, grad_out, device)
        measured["materialized"] = measured_one("materialized", T, lambda m=layer: materialized_ttt(m, x, x0), layer,
                                                x, x0, grad_out, device)
        del layer
        block = TTTMLPBlock(size["dim"], size["heads"], torch.nn.LayerNorm(size["dim"], device=device, dtype=dtype),
                            device=device, dtype=dtype).train()
        for name, group in (("ttt-mlp", block.scan_group), ("ttt-mlp-no-checkpoint", 0)):
            block.scan_group = group
            measured[name] = measured_one(name, T, lambda m=block: m(x), block, x, x0, grad_out, device)
        del block
        plain_ms, plain_gib, plain_flops = measured["plain"]
        for name, (ms, gib, flops) in measured.items():
            entry = {"T": T, "impl": name, "ms": ms, "peak_gib": gib,
                     "time_ratio": ms / plain_ms if ms and plain_ms else None,
                     "memory_ratio": gib / plain_gib if gib and plain_gib else None,
                     "flop_ratio": flops / plain_flops if flops and plain_flops else None}
            results.append(entry)
            out_of_memory = gib is None and device.type == "cuda"
            rows.append([T, name, "OOM" if out_of_memory else (ms if ms is not None else "-"),
                         gib if gib is not None else "-", entry["time_ratio"] or "-", entry["memory_ratio"] or "-",
                         entry["flop_ratio"] or "-"])
    progress.close()
    env = environment(device)
    config = {"dim": size["dim"], "hidden": hidden, "chunk": size["chunk"], "dtype": str(dtype).split(".")[-1], "batch": 1,
              "clip_tau": args.clip_tau}
    name = "layer" + ("" if args.size == "moshi" else f"-{args.size}") + ("-meta" if device.type == "meta" else "")
    out = args.out or Path("bench/results") / (f"{name}-{args.dtype}.json" if args.dtype else f"{name}.json")
    write_results(out, {**env, **config, "results": results})
    print(f"{env['device']}, torch {env['torch']}, {env['date']}; {config}")
    print(markdown_table(["T", "impl", "fwd+bwd ms", "peak GiB", "time / plain", "memory / plain", "FLOPs / plain"],
                         rows))


if __name__ == "__main__":
    main()
