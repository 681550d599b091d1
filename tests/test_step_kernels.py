"""The Triton streaming step against the PyTorch step and the parallel form.

On a GPU the kernels run compiled; without one, on CPU tensors through Triton's
interpreter (set in conftest).
"""

import pytest
import torch

from moshi_ttt.ops.inplace import step_kernels

pytestmark = [pytest.mark.skipif(step_kernels.triton is None, reason="Triton is not installed"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # from Triton's interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STATE = ("delta", "delta_read", "z_ring", "v_ring", "x0_tail", "pos", "slot", "prev_scale", "cur_sq_norm")


@pytest.fixture
def kernel_layer(make_layer):
    """A d=20 layer (several rows folded per step at C=4) on DEVICE."""
    def make(dtype, kernel_size, chunk_size=4, clip_tau=None):
        return make_layer(dim=20, hidden=24, chunk_size=chunk_size, eta=0.3, kernel_size=kernel_size,
                          clip_tau=clip_tau, init_std=0.2, dtype=dtype).to(DEVICE)
    return make


def run_steps(layer, x, x0, kernels, masks):
    """Token steps with the given exec masks; outputs and the final state."""
    outs = []
    x, x0 = x.to(DEVICE), x0.to(DEVICE)
    with torch.no_grad(), layer.streaming(x.shape[0]):
        state = layer._streaming_state
        state.use_kernels = kernels
        for t in range(x.shape[1]):
            state.set_exec_mask(masks[t].to(DEVICE))
            outs.append(layer(x[:, t:t + 1], x0[:, t:t + 1]))
        final = {name: getattr(state, name).cpu() for name in STATE}
    return torch.cat(outs, dim=1).cpu(), final


@pytest.mark.parametrize("dtype, kernel_size, batch, clip_tau", [
    (torch.float32, 1, 3, None), (torch.float32, 2, 3, None), (torch.float32, 3, 7, None),
    (torch.bfloat16, 1, 3, None), (torch.bfloat16, 2, 3, None), (torch.bfloat16, 3, 7, None),
    (torch.float32, 1, 3, 0.05), (torch.float32, 2, 3, 0.05), (torch.float32, 3, 3, 0.05),
    (torch.bfloat16, 2, 3, 0.05)])
def test_kernel_step_equals_pytorch_step(kernel_layer, dtype, kernel_size, batch, clip_tau):
    """Five chunks (d=20 > C=4: several rows folded per step), one sample paused at times;
    batch 7 with K=3 gives 21 target rows, more than one tile of the target kernel."""
    layer = kernel_layer(dtype, kernel_size, clip_tau=clip_tau)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 22, 20, generator=g).to(dtype)
    x0 = torch.randn(batch, 22, 20, generator=g).to(dtype)
    masks = [torch.tensor([True, t % 3 != 1] + [True] * (batch - 2)) for t in range(22)]
    out_ref, state_ref = run_steps(layer, x, x0, kernels=False, masks=masks)
    out, state = run_steps(layer, x, x0, kernels=True, masks=masks)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    ran = torch.stack(masks, dim=1)  # a paused sample's output is not used
    torch.testing.assert_close(out[ran].float(), out_ref[ran].float(), **tol)
    for name in STATE:
        torch.testing.assert_close(state[name].float(), state_ref[name].float(), **tol, msg=name)
    assert state_ref["pos"].tolist() != [22 % 4] * batch  # the paused sample is behind
    if clip_tau is not None:
        assert (state_ref["prev_scale"] < 0.9).all()  # the clip binds


def test_kernel_step_keeps_the_low_precision_copy(kernel_layer, monkeypatch):
    """On CUDA a bf16 model's output reads a bf16 copy of delta, which the fold keeps up to date."""
    from moshi_ttt.modules.inplace import state as fast_weights
    layer = kernel_layer(torch.bfloat16, kernel_size=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 17, 20, generator=g).bfloat16()
    x0 = torch.randn(2, 17, 20, generator=g).bfloat16()
    masks = [torch.tensor([True, True])] * 17
    out_ref, state_ref = run_steps(layer, x, x0, kernels=False, masks=masks)
    monkeypatch.setattr(fast_weights, "operand_dtype", lambda dtype, device: torch.bfloat16)
    out, state = run_steps(layer, x, x0, kernels=True, masks=masks)
    assert state["delta_read"].dtype == torch.bfloat16
    # Equal up to one bf16 step: Triton's interpreter truncates where the GPU rounds to nearest.
    torch.testing.assert_close(state["delta_read"].float(), state["delta"], rtol=2**-7, atol=0)
    assert state["delta"].abs().amax() > 0
    torch.testing.assert_close(out, out_ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("clip_tau", [None, 0.05])
def test_kernel_step_equals_parallel_form(kernel_layer, clip_tau):
    layer = kernel_layer(torch.float32, kernel_size=2, chunk_size=5, clip_tau=clip_tau)
    g = torch.Generator().manual_seed(2)
    x, x0 = torch.randn(2, 23, 20, generator=g), torch.randn(2, 23, 20, generator=g)
    with torch.no_grad():
        expected = layer(x.to(DEVICE), x0.to(DEVICE)).cpu()
        assert (expected - layer.linear_out(layer.gated(x.to(DEVICE))).cpu()).abs().amax() > 1e-3  # TTT acts
        if clip_tau is not None:  # and the clip binds
            layer.clip_tau = None
            assert (expected - layer(x.to(DEVICE), x0.to(DEVICE)).cpu()).abs().amax() > 1e-3
            layer.clip_tau = clip_tau
    out, _ = run_steps(layer, x, x0, kernels=True, masks=[torch.tensor([True, True])] * 23)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_kernels_serve_cuda_only_when_asked(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.delenv("MOSHI_TTT_KERNELS", raising=False)
    assert not step_kernels.kernels_enabled(cuda, torch.bfloat16)
    monkeypatch.setenv("MOSHI_TTT_KERNELS", "1")
    assert step_kernels.kernels_enabled(cuda, torch.bfloat16)
    assert not step_kernels.kernels_enabled(torch.device("cpu"), torch.float32)
    assert not step_kernels.kernels_enabled(cuda, torch.float64)


@pytest.mark.parametrize("clip_tau", [None, 0.05])
def test_kernel_steps_mixed_with_whole_chunks(kernel_layer, clip_tau):
    """Token steps (kernels) and multi-token steps (whole chunks in parallel form) share the state."""
    layer = kernel_layer(torch.float32, kernel_size=2, chunk_size=4, clip_tau=clip_tau)
    g = torch.Generator().manual_seed(4)
    x, x0 = torch.randn(2, 31, 20, generator=g).to(DEVICE), torch.randn(2, 31, 20, generator=g).to(DEVICE)
    with torch.no_grad():
        expected = layer(x, x0)
        outs, t = [], 0
        with layer.streaming(2):
            layer._streaming_state.use_kernels = True
            for size in [3, 1, 8, 2, 5, 4, 8]:
                outs.append(layer(x[:, t:t + size], x0[:, t:t + size]))
                t += size
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, rtol=1e-5, atol=1e-5)
