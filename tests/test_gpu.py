"""GPU behaviour: bf16 numerics and moshi's CUDA graphs. Needs a CUDA device."""

import pytest
import torch
import torch.nn.functional as F
from moshi.models.lm import LMGen
from moshi.utils.compile import CUDAGraphed, no_cuda_graph

from helpers import random_inputs, stream
from moshi_ttt import InPlaceTTTGating, TTTConfig, build_lm, tiny_lm_config, ttt_layers
from reference import reference_for_layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_layer(dtype, chunk_size=16, clip_tau=None, algorithm="auto", forget=1.0):
    torch.manual_seed(0)
    return InPlaceTTTGating(64, 176, F.silu, chunk_size=chunk_size, eta=0.05, clip_tau=clip_tau,
                            init="normal", init_std=0.1, algorithm=algorithm, forget=forget, device="cuda",
                            dtype=dtype).eval()


@pytest.mark.parametrize("clip_tau", [None, 0.5])
@pytest.mark.parametrize("algorithm", ["dual", "scan"])
@pytest.mark.parametrize("forget", [1.0, 0.7])
def test_bf16_matches_reference(clip_tau, algorithm, forget):
    layer = cuda_layer(torch.bfloat16, clip_tau=clip_tau, algorithm=algorithm, forget=forget)
    x, x0 = (t.to("cuda", torch.bfloat16) for t in random_inputs(3, 5 * 16 + 3, 64))
    ref = reference_for_layer(layer.cpu(), x.cpu(), x0.cpu())
    layer.cuda()
    out = layer(x, x0).double().cpu()
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()
    streamed = stream(layer, x, x0, [1]).double().cpu()
    assert (streamed - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("algorithm", ["dual", "scan"])
def test_bf16_gradients_match_float64(algorithm, scores_kept_or_recomputed):
    """bf16 operands with float32 sums: gradients within bf16 distance of float64 ones."""
    layer = cuda_layer(torch.bfloat16, algorithm=algorithm).train()
    layer.kept_scores = scores_kept_or_recomputed
    x, x0 = (t.to("cuda", torch.bfloat16) for t in random_inputs(2, 4 * 16 + 5, 64))
    grads = []
    for dtype in (torch.bfloat16, torch.float64):
        layer.zero_grad()
        layer.to(dtype)(x.to(dtype), x0.to(dtype)).float().square().sum().backward()
        grads.append([p.grad.double() for p in layer.parameters()])
    for low, high in zip(*grads):
        assert (low - high).abs().max() <= 0.03 * high.abs().max()


@pytest.mark.parametrize("clip_tau,forget", [(None, 1.0), (0.5, 1.0), (None, 0.7)])
def test_token_step_under_cuda_graph(clip_tau, forget):
    """The step is captured once and replayed: every chunk update (and its forgetting) must still happen."""
    layer = cuda_layer(torch.float32, chunk_size=8, clip_tau=clip_tau, forget=forget)
    x, x0 = (t.to("cuda", torch.float32) for t in random_inputs(2, 6 * 8 + 3, 64))
    eager = stream(layer, x, x0, [1])
    step = CUDAGraphed(layer)
    with layer.streaming(2):
        graphed = torch.cat([step(x[:, t:t + 1], x0[:, t:t + 1]).clone() for t in range(x.shape[1])], dim=1)
        assert step._graph is not None
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


def run_lmgen(lm, user_codes, graphs: bool, reset_at: int | None = None):
    logits = []
    gen = LMGen(lm, use_sampling=False, on_text_logits_hook=lambda t: logits.append(t.float().clone()))
    B, _, steps = user_codes.shape
    with torch.no_grad(), gen.streaming(B):
        for t in range(steps):
            if t == reset_at:
                gen.reset_streaming(torch.tensor([False, True], device="cuda"))
            if graphs:
                gen.step(user_codes[:, :, t:t + 1])
            else:
                with no_cuda_graph():
                    gen.step(user_codes[:, :, t:t + 1])
        delta_norms = [layer._streaming_state.delta.norm().item() for _, layer in ttt_layers(lm)]
    return torch.cat(logits, dim=2), delta_norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x0_source", ["input", "text_user"])  # text_user: X0 from embedding hooks in the graph
def test_lmgen_cuda_graphs_match_eager(dtype, x0_source):
    ttt = TTTConfig(every=2, chunk_size=8, init="normal", init_std=0.05, eta=0.05, clip_tau=1.0, x0_source=x0_source)
    lm = build_lm(tiny_lm_config(), ttt, device="cuda", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    user_codes = torch.randint(0, lm.card, (2, lm.n_q - lm.dep_q, 60), generator=g).cuda()
    eager, eager_norms = run_lmgen(lm, user_codes, graphs=False, reset_at=37)
    graphed, graphed_norms = run_lmgen(lm, user_codes, graphs=True, reset_at=37)
    assert min(eager_norms) > 0
    torch.testing.assert_close(graphed_norms, eager_norms, rtol=1e-3, atol=1e-6)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(graphed, eager, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, clip_tau", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 0.5)])
def test_kernel_step_under_cuda_graph_equals_pytorch_step(dtype, clip_tau, monkeypatch):
    layer = cuda_layer(dtype, chunk_size=8, clip_tau=clip_tau)
    x, x0 = (t.to("cuda", dtype) for t in random_inputs(2, 6 * 8 + 3, 64))
    eager = stream(layer, x, x0, [1]).float()  # the PyTorch step
    monkeypatch.setenv("MOSHI_TTT_KERNELS", "1")
    step = CUDAGraphed(layer)
    with layer.streaming(2):
        assert layer._streaming_state.use_kernels
        graphed = torch.cat([step(x[:, t:t + 1], x0[:, t:t + 1]).clone() for t in range(x.shape[1])], dim=1)
        assert step._graph is not None
    scale = 1e-4 if dtype == torch.float32 else 2e-2
    assert (graphed.float() - eager).abs().max() <= scale * eager.abs().max()


@pytest.mark.parametrize("algorithm", ["dual", "scan"])
def test_autocast_with_float32_weights_on_cuda(algorithm):
    layer = cuda_layer(torch.float32, clip_tau=0.5, algorithm=algorithm).train()
    x, x0 = (t.to("cuda", torch.float32) for t in random_inputs(2, 4 * 16 + 5, 64))
    grads = []
    for enabled in (False, True):
        layer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            layer(x, x0).float().square().sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    for full, mixed in zip(*grads):
        assert mixed.dtype == torch.float32
        assert (mixed - full).abs().max() <= 0.05 * full.abs().max()


def cuda_block(dtype, mini_batch=4):
    from moshi_ttt import TTTMLPBlock
    torch.manual_seed(0)
    block = TTTMLPBlock(64, 4, torch.nn.LayerNorm(64, device="cuda", dtype=dtype), mini_batch=mini_batch,
                        base_lr=1.0, conv_kernel=4, gate_init=0.5, device="cuda", dtype=dtype)
    return block.eval()


def test_ttt_mlp_bf16_matches_float64():
    block = cuda_block(torch.bfloat16)
    x = torch.randn(3, 5 * 4 + 3, 64, device="cuda", dtype=torch.bfloat16)
    ref = block.double()(x.double())
    block.bfloat16()
    for out in (block(x), _block_stream(block, x)):
        assert (out.double() - ref).abs().max() <= 0.03 * ref.abs().max()


def _block_stream(block, x):
    with block.streaming(x.shape[0]):
        return torch.cat([block(x[:, t:t + 1]) for t in range(x.shape[1])], dim=1)


def test_ttt_mlp_step_under_cuda_graph():
    """The TTT-MLP token step captured once and replayed: every mini-batch update must still happen."""
    block = cuda_block(torch.float32)
    x = torch.randn(2, 6 * 4 + 3, 64, device="cuda")
    eager = _block_stream(block, x)
    step = CUDAGraphed(block)
    with block.streaming(2):
        graphed = torch.cat([step(x[:, t:t + 1]).clone() for t in range(x.shape[1])], dim=1)
        assert step._graph is not None
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


def test_ttt_mlp_under_autocast_keeps_its_inner_loop_in_float32():
    block = cuda_block(torch.float32).train()
    x = torch.randn(2, 4 * 4 + 3, 64, device="cuda")
    grads = []
    for enabled in (False, True):
        block.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            block(x).float().square().sum().backward()
        grads.append([p.grad for p in block.parameters()])
    for full, mixed in zip(*grads):
        assert (mixed - full).abs().max() <= 0.05 * full.abs().max()


def test_fsdp_bf16_policy_trains_like_autocast(tmp_path, monkeypatch):
    """One NCCL process: the sharded model (bf16 gathers, float32 reduction and masters) and
    the plain one under autocast take close steps from the same weights."""
    import torch.distributed as dist
    from moshi_ttt.models import document_segments
    from moshi_ttt.train.fsdp import shard_model
    from moshi_ttt.train.loss import loss_weights, weighted_losses
    from moshi_ttt.train.modes import apply_mode
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29541"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    dist.init_process_group("nccl")
    try:
        models = []
        for sharded in (False, True):
            lm = build_lm(tiny_lm_config(), TTTConfig(every=2, chunk_size=16, init="normal", init_std=0.05),
                          seed=0, device="cuda", dtype=torch.bfloat16).train()
            apply_mode(lm, "ttt_layers")
            for p in lm.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            if sharded:
                shard_model(lm, 1, torch.device("cuda"), bf16=True)
            models.append(lm)
        codes = torch.randint(0, 32, (2, models[0].num_codebooks, 96), device="cuda")
        losses, norms = [], []
        for lm in models:
            weights = loss_weights(lm, codes, 100.0, 0.5)
            with torch.autocast("cuda", dtype=torch.bfloat16), document_segments(lm, None):
                loss = (weighted_losses(lm(codes), codes, weights) / weights.totals()).sum()
            loss.backward()
            losses.append(loss.item())
            grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                     for p in lm.parameters() if p.grad is not None]
            norms.append(torch.stack([g.float().norm() for g in grads]).norm().item())
        assert losses[1] == pytest.approx(losses[0], rel=2e-2)
        assert norms[1] == pytest.approx(norms[0], rel=5e-2) and norms[0] > 0
    finally:
        dist.destroy_process_group()
