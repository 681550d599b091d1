import os

# moshi compiles its gating kernel lazily; on the CPU that only costs time.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run (slowly, at test sizes) through Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F  # noqa: E402

from moshi_ttt import InPlaceTTTGating  # noqa: E402
from moshi_ttt.ops.inplace import KEPT_SCORES  # noqa: E402


@pytest.fixture
def make_layer():
    """A small float64 TTT layer with random target weights, seeded; scan blocks of two
    chunks or so (8 positions), so the scan mixes its state with the dual form. At test
    sizes a 2048-position span of the target conv would hold the whole sequence: spans of 8.
    A gate gets random weights, so that every chunk decays and writes by its own factors."""
    def make(dim=8, hidden=12, chunk_size=4, eta=0.5, kernel_size=2, kernel_past=0, clip_tau=None,
             init="normal", init_std=0.3, algorithm="auto", scan_block=8, forget=1.0, seed=0,
             dtype=torch.float64, kept_scores=KEPT_SCORES, conv_span=8, objective="dot", gate="none"):
        torch.manual_seed(seed)
        layer = InPlaceTTTGating(dim, hidden, F.silu, chunk_size=chunk_size, eta=eta, kernel_size=kernel_size,
                                 kernel_past=kernel_past, clip_tau=clip_tau, init=init,
                                 init_std=init_std, algorithm=algorithm, scan_block=scan_block, forget=forget,
                                 kept_scores=kept_scores, conv_span=conv_span, objective=objective, gate=gate,
                                 dtype=dtype)
        if layer.ttt_gate is not None:
            with torch.no_grad():
                for p in layer.ttt_gate.parameters():
                    p.add_(torch.randn_like(p), alpha=0.5)
        return layer.eval()
    return make


@pytest.fixture(params=["kept", "recomputed"])
def scores_kept_or_recomputed(request):
    """A test's `kept_scores`: the dual form's scores kept from the forward (the default), and recomputed (0)."""
    return KEPT_SCORES if request.param == "kept" else 0


@pytest.fixture
def finetune_data(tmp_path):
    """(checkpoint directory, data directory with train.jsonl) of moshi-finetune's format."""
    from assets import write_finetune_data
    return write_finetune_data(tmp_path)
