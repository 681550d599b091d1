"""One token of TTT-MLP in the primal form, for streaming.

The state keeps the fast weights of the mini-batch's start (as a delta from the initial
weights) and the running sum of the lr-weighted gradients of the mini-batch's tokens so
far, so token t reads `W - s_t * sums` (the dual form's W_t, `dual.py`) with no buffer of
past tokens. At a mini-batch's last token the delta takes that step and the sums restart.
Which samples end their mini-batch is a tensor, not a Python branch: the step can be
captured in a CUDA graph.
"""

import torch

from ..common import without_autocast
from .dual import TTTMLPState, mini_batch_sums
from .inner import InnerWeights, gelu, head_layer_norm, reconstruction_grads


def ttt_mlp_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, scale: torch.Tensor,
                 ends: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, initial: InnerWeights,
                 state: TTTMLPState) -> tuple[torch.Tensor, TTTMLPState]:
    """(output, next state) of one token per sample.

    q, k, v: [B, H, f]; lr: [B, H]; scale: [B], the scale of each sample's position in its
    mini-batch; ends: [B] bool, whether that position is the mini-batch's last. The output
    and the state have the state's dtype (float32, or float64), autocast off.
    """
    with without_autocast(q.device):
        return _step(q, k, v, lr, scale, ends, ln_weight, ln_bias, initial, state)


def _step(q, k, v, lr, scale, ends, ln_weight, ln_bias, initial, state):
    dtype = state.delta.w1.dtype
    q, k, v, lr, scale = (t.to(dtype)[..., None, :] if t.dim() == 3 else t.to(dtype) for t in (q, k, v, lr, scale))
    w = InnerWeights(*(t.to(dtype) for t in initial)) + state.delta
    x2, g_z1, g_z2 = reconstruction_grads(w, k, v, ln_weight, ln_bias)
    sums = state.sums + mini_batch_sums(lr[..., None], k, x2, g_z1, g_z2)
    w_t = w - sums.scaled(scale)
    x2_bar = gelu(q @ w_t.w1 + w_t.b1[..., None, :])
    z2 = x2_bar @ w_t.w2 + w_t.b2[..., None, :]
    out = (q + head_layer_norm(z2, ln_weight, ln_bias))[..., 0, :]
    stepped = TTTMLPState(state.delta - sums.scaled(scale), sums.zeros_like())
    return out, TTTMLPState(stepped.delta.where(ends, state.delta), stepped.sums.where(ends, sums))
