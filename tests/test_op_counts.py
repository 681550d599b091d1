"""The matrix products of a forward and backward, counted, against the cost model
that `docs/benchmarks.md` and `ops.block_size_for` rely on.

For T positions, blocks of L = k C positions, d = dim, h = hidden:
  plain gated MLP                      18 T d h
  the scan's state, across blocks      12 (T - L) d h   (the slow weight's gradient is shared)
  the dual form inside each block      C^2 k (k - 1) (3h + 3d) per block, kept scores
                                       C^2 k (k - 1) (4h + 4d) per block, recomputed
  the target generator (d x d)         6 T d^2
  a forgetting factor < 1              2 (T - L) d h    (the slow weight's gradient is its own
                                                          product: the state's gradient decays)
"""

import sys
from pathlib import Path

import pytest
import torch

from helpers import random_inputs

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from layer import matmul_flops  # noqa: E402

DIM, HIDDEN, C, T = 16, 40, 8, 48


def expected_flops(block: int, per_pair: int, forgets: bool = False) -> int:
    k = block // C
    dual = (T // block) * C * C * k * (k - 1) * per_pair
    state = (14 if forgets else 12) * (T - block) * DIM * HIDDEN
    return 18 * T * DIM * HIDDEN + state + dual + 6 * T * DIM * DIM


def counted_flops(layer) -> int:
    x, x0 = random_inputs(1, T, DIM, dtype=torch.float32)
    x.requires_grad_(True)
    return matmul_flops(lambda: layer(x, x0).backward(torch.ones(1, T, DIM)))


@pytest.mark.parametrize("block", [C, 2 * C, 3 * C, T])
def test_scan_and_dual_products(make_layer, block):
    layer = make_layer(dim=DIM, hidden=HIDDEN, chunk_size=C, algorithm="scan", scan_block=block,
                       dtype=torch.float32).train()
    assert counted_flops(layer) == expected_flops(block, 3 * HIDDEN + 3 * DIM)


@pytest.mark.parametrize("block", [C, 2 * C, 3 * C, T])
def test_forgetting_costs_the_shared_weight_gradient(make_layer, block):
    layer = make_layer(dim=DIM, hidden=HIDDEN, chunk_size=C, algorithm="scan", scan_block=block, forget=0.5,
                       dtype=torch.float32).train()
    assert counted_flops(layer) == expected_flops(block, 3 * HIDDEN + 3 * DIM, forgets=True)


def test_recomputed_scores_cost_a_product_more(make_layer):
    layer = make_layer(dim=DIM, hidden=HIDDEN, chunk_size=C, algorithm="dual", kept_scores=0,
                       dtype=torch.float32).train()
    assert counted_flops(layer) == expected_flops(T, 4 * HIDDEN + 4 * DIM)


def test_the_layer_benchmark_shows_its_progress_on_the_meta_device(tmp_path):
    """bench/layer.py --device meta runs on any machine; it says how far it is and how long is left."""
    import subprocess
    script = Path(__file__).parents[1] / "bench" / "layer.py"
    done = subprocess.run([sys.executable, str(script), "--device", "meta", "--size", "small", "--lengths", "64",
                           "--out", str(tmp_path / "layer.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "layer benchmark: 100%" in done.stderr and "9/9" in done.stderr
    assert (tmp_path / "layer.json").is_file() and "| 64 | ttt-dual |" in done.stdout
