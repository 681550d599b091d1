"""TTT-MLP over whole sequences: the dual form inside each mini-batch, a scan across them.

Token t of a mini-batch reads the weights of the mini-batch's start W minus its share of
the gradients so far, all taken at W (Sun et al. 2024, eq. 4-6):

    W_t = W - s_t * sum_{u <= t} lr_u * grad l(W; k_u, v_u)

s_t the learnable scale of in-mini-batch position t (1/(t+1) to start with, which makes
the sum a running mean), lr_u the token's inner learning rate. The dual form computes
every `f_{W_t}(q_t)` of a mini-batch with (n x n) products instead of n weight copies; the
next mini-batch starts from `W_{b-1}`. Across mini-batches only the weights travel, and in
training the scan is checkpointed in groups of mini-batches, so the backward keeps one set
of weights per group, not per mini-batch.
"""

import typing as tp

import torch
from torch.utils.checkpoint import checkpoint

from ..common import without_autocast
from .inner import InnerWeights, gelu, head_layer_norm, inner_loss, reconstruction_grads


class TTTMLPState(tp.NamedTuple):
    """Where a stream stands: `delta`, the fast weights minus their initial values at the
    start of the current mini-batch, and `sums`, the lr-weighted gradients of the current
    mini-batch's tokens so far (0 at a mini-batch boundary). Tensors [B, H, ...], float32."""

    delta: InnerWeights
    sums: InnerWeights


def mini_batch_sums(lr: torch.Tensor, k: torch.Tensor, x2: torch.Tensor, g_z1: torch.Tensor,
                    g_z2: torch.Tensor) -> InnerWeights:
    """sum_u lr_u * grad l(W; token u) over the tokens of one mini-batch (axis -2)."""
    lr = lr[..., None]
    return InnerWeights((lr * k).transpose(-1, -2) @ g_z1, (lr * g_z1).sum(-2),
                        (lr * x2).transpose(-1, -2) @ g_z2, (lr * g_z2).sum(-2))


def mini_batch_dual(w: InnerWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                    scale: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor
                    ) -> tuple[torch.Tensor, InnerWeights]:
    """Outputs `q + LN(f_{W_t}(q_t))` of n <= b tokens that start a mini-batch at the weights w,
    and the sums of their gradients (`mini_batch_sums`).

    q, k, v: [B, H, n, f]; lr: [B, H, n]; scale: [n], the scales of positions 0 .. n-1.
    """
    x2, g_z1, g_z2 = reconstruction_grads(w, k, v, ln_weight, ln_bias)
    eta = torch.tril(scale[:, None] * lr[..., None, :])  # [B, H, n, n]: s_t lr_u for u <= t
    z1 = q @ w.w1 + w.b1[..., None, :] - (eta * (q @ k.transpose(-1, -2) + 1)) @ g_z1
    x2_bar = gelu(z1)
    z2 = x2_bar @ w.w2 + w.b2[..., None, :] - (eta * (x2_bar @ x2.transpose(-1, -2) + 1)) @ g_z2
    return q + head_layer_norm(z2, ln_weight, ln_bias), mini_batch_sums(lr, k, x2, g_z1, g_z2)


def ttt_mlp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, token_scale: torch.Tensor,
            ln_weight: torch.Tensor, ln_bias: torch.Tensor, initial: InnerWeights,
            initial_delta: InnerWeights | None = None, checkpoint_group: int = 0,
            losses: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, TTTMLPState]:
    """TTT-MLP over a sequence that starts at a mini-batch boundary: (outputs, final state).

    q, k, v: [B, H, T, f]; lr: [B, H, T] inner learning rates; token_scale: [b] the scale of
    each in-mini-batch position (b, the mini-batch size, is its length); ln_weight, ln_bias:
    [H, f]; initial: the learned initial fast weights, [H, ...]; initial_delta: the streaming
    state's delta, [B, H, ...] (None: every sample starts at `initial`).
    checkpoint_group: when > 0 and gradients are on, mini-batches per checkpointed group.
    losses: when a list, gets one [B, H, 5] tensor per whole mini-batch: the mean inner loss
    of its tokens under `initial`, before its update and after it (l0, lprev, lafter), the
    norm of its update and of the weights' change from `initial` after it (a diagnostic:
    the scan then runs without checkpoints).
    The final state holds the delta after the last whole mini-batch and the sums of the
    tokens after it. Outputs and state are float32 (float64 for float64 inputs): the
    arithmetic runs at that precision, with autocast off.
    """
    B, H, T, f = q.shape
    if T == 0:
        raise ValueError("empty sequence: q has 0 time steps")
    with without_autocast(q.device):
        return _scan(q, k, v, lr, token_scale, ln_weight, ln_bias, initial, initial_delta, checkpoint_group, losses)


def _scan(q, k, v, lr, token_scale, ln_weight, ln_bias, initial, initial_delta, checkpoint_group, losses):
    B, H, T, f = q.shape
    b = token_scale.shape[0]
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, lr = (t.to(dtype) for t in (q, k, v, lr))
    initial = InnerWeights(*(t.to(dtype) for t in initial))
    if initial_delta is None:
        initial_delta = InnerWeights(*(q.new_zeros(B, *t.shape) for t in initial))

    def run(start: int, end: int, *delta_tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        delta = InnerWeights(*delta_tensors)
        outs = []
        sums = None
        for s in range(start, end, b):
            n = min(b, end - s)
            w = initial + delta
            piece = slice(s, s + n)
            out, sums = mini_batch_dual(w, q[:, :, piece], k[:, :, piece], v[:, :, piece], lr[:, :, piece],
                                        token_scale[:n], ln_weight, ln_bias)
            outs.append(out)
            if n == b:
                update = sums.scaled(token_scale[-1].expand(B))
                delta = delta - update
                if losses is not None:
                    losses.append(_diagnostics(initial, w, delta, update, k[:, :, piece], v[:, :, piece],
                                               ln_weight, ln_bias))
                sums = None
        sums = sums if sums is not None else delta.zeros_like()
        return (torch.cat(outs, dim=2), *delta, *sums)

    group = checkpoint_group * b
    use_checkpoint = group > 0 and torch.is_grad_enabled() and T > group and losses is None
    outs = []
    state = tuple(initial_delta)
    for start in range(0, T, group if use_checkpoint else T):
        end = min(T, start + group) if use_checkpoint else T
        if use_checkpoint:
            result = checkpoint(run, start, end, *state, use_reentrant=False)
        else:
            result = run(start, end, *state)
        outs.append(result[0])
        state = result[1:5]
    final = TTTMLPState(InnerWeights(*result[1:5]), InnerWeights(*result[5:9]))
    return torch.cat(outs, dim=2), final


def _diagnostics(initial: InnerWeights, before: InnerWeights, delta: InnerWeights, update: InnerWeights,
                 k: torch.Tensor, v: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        start = InnerWeights(*(t.expand(k.shape[0], *t.shape) for t in initial))
        losses = [inner_loss(w, k, v, ln_weight, ln_bias).mean(-1) for w in (start, before, initial + delta)]
        norms = [sum(t.flatten(2).square().sum(-1) for t in weights).sqrt() for weights in (update, delta)]
        return torch.stack(losses + norms, -1)
