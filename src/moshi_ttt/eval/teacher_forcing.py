"""Per-position cross-entropy of a Moshi teacher-forced on codes, carried through streaming.

`LMModel.forward` scores a whole sequence at once, which for long audio means
attention far past its context and memory growing with the length. Here the
sequence goes through moshi's streaming state window by window: the KV cache and
the fast weights carry from one window to the next, exactly as in a live
conversation. With `window=1` it is the step-by-step stream LMGen runs.

moshi's ring KV cache holds `context` positions; a window of W positions written
at once would evict keys its first queries still need, so for W > 1 the caches
are given `context + W` slots. The attention mask keeps `context`, unchanged.
"""

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from moshi.models.lm_utils import _delay_sequence, _undelay_sequence
from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention

from ..models.convert import ttt_layers


@torch.no_grad()
def position_losses(lm: LMModel, codes: torch.Tensor, window: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy [B, 1 + dep_q, T] of the text and model audio codebooks at every position.

    codes: [B, K, T], -1 where there is no token (NaN in the result). Also returns,
    per TTT layer, the norm of each sample's fast-weight change at the end, read
    from the streaming state (eta * ||delta||_F).
    """
    if window < 1:
        raise ValueError(f"window={window}: expected an integer >= 1")
    B, K, T = codes.shape
    if K != lm.num_codebooks:
        raise ValueError(f"codes have {K} streams: this model expects {lm.num_codebooks}")
    inputs, targets = delayed_inputs(lm, codes)
    scored = 1 + lm.dep_q
    losses = torch.full((B, scored, T), float("nan"), device=codes.device)
    with lm.streaming(B):
        if window > 1:
            widen_kv_caches(lm, window)
        for start in range(0, T, window):
            end = min(start + window, T)
            hidden, text_logits = lm.forward_text(inputs[:, :, start:end])
            audio_logits = lm.forward_depformer_training(targets[:, :, start:end], hidden)
            losses[:, :1, start:end] = _cross_entropy(text_logits, targets[:, :1, start:end])
            losses[:, 1:, start:end] = _cross_entropy(audio_logits, targets[:, 1:scored, start:end])
        fast_weights = {name: layer.fast_weight_change_norms() for name, layer in ttt_layers(lm)}
    losses, _ = _undelay_sequence(lm.delays[:scored], losses, fill_value=float("nan"))
    losses = torch.where(codes[:, :scored] == lm.zero_token_id, float("nan"), losses)
    return losses, fast_weights


def delayed_inputs(lm: LMModel, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's inputs and targets for codes [B, K, T], each [B, K, T]: the streams
    delayed, the initial token first. The input at t predicts the target at t."""
    initial = lm._get_initial_token().expand(codes.shape[0], -1, -1)
    delayed = torch.cat([initial, _delay_sequence(lm.delays, codes, initial)], dim=2)
    return delayed[:, :, :-1], delayed[:, :, 1:]


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE [B, k, w] for logits [B, k, w, card]; NaN where the target is no token or the
    initial token (the delay's padding)."""
    valid = (targets >= 0) & (targets < logits.shape[-1])
    ce = F.cross_entropy(logits.float().flatten(0, 2), torch.where(valid, targets, 0).flatten(), reduction="none")
    return torch.where(valid, ce.view(targets.shape), float("nan"))


def widen_kv_caches(lm: LMModel, window: int) -> None:
    """Give every streaming KV cache `context + window` slots (the mask still keeps `context`)."""
    for module in lm.transformer.modules():
        if not isinstance(module, StreamingMultiheadAttention):
            continue
        state = module._streaming_state
        if state is None or state.kv_cache is None:
            continue
        old = state.kv_cache
        _, batch, heads, capacity, dim = old.cache.shape
        state.kv_cache = RingKVCache(batch, heads, dim, capacity + window, respect_exec_mask=old.respect_exec_mask,
                                     device=old.cache.device, dtype=old.cache.dtype)
