"""`TTTMLPBlock`: a gated residual TTT-MLP block (Sun et al. 2024) for Moshi's transformer.

    y = x + tanh(alpha) * O(post_norm(TTT-MLP(norm(x))))

alpha per channel and small at first (0.1), so a converted pretrained Moshi starts close
to itself and alpha = 0 is exactly the plain model (as ttt-video-dit gates its TTT
blocks). Inside, per head of size f: queries, keys and values from linear projections
(keys and queries optionally through a causal depthwise convolution), an inner MLP
f -> 4f -> f whose weights are the fast weights, started from learned values and trained
on every mini-batch of b tokens to map keys to `values - keys` through a per-head
LayerNorm; the output for a query is `q + LN(f(q))`. The inner learning rate of a token
is `base_lr * sigmoid(x theta_h + c_h) / f`.

Outside streaming, whole sequences go through `ops.ttt_mlp.ttt_mlp`; inside
`streaming(...)`, every sample keeps its own inner weights (`TTTMLPStreamState`).
"""

import torch
import torch.nn.functional as F
from torch import nn
from moshi.modules.streaming import StreamingModule

from ...ops.ttt_mlp import InnerWeights, ttt_mlp, ttt_mlp_step
from ..fast_weight import FastWeightLayer, check_positive_int, check_sequence, common_position, document_spans
from .state import TTTMLPStreamState


class TTTMLPBlock(FastWeightLayer, StreamingModule[TTTMLPStreamState]):
    """Args:
        dim: model dimension d (heads of size d / num_heads).
        num_heads: H.
        norm: the pre-norm (a copy of the transformer layer's own, when converting).
        mini_batch: b, tokens per inner update (16 in the paper).
        base_lr: the inner learning rate's scale (0.1 for TTT-MLP in the paper).
        conv_kernel: K of the causal convolutions on queries and keys; 0 for none.
        gate_init: alpha's initial value.
        scan_group: mini-batches per checkpointed group of the scan in training.
    """

    method = "ttt_mlp"
    own_parameters = ("",)  # the whole block is new
    _fsdp_final = True  # as moshi's layers: a whole FSDP unit or inside one, never split

    def __init__(self, dim: int, num_heads: int, norm: nn.Module, *, mini_batch: int = 16, base_lr: float = 0.1,
                 conv_kernel: int = 0, gate_init: float = 0.1, scan_group: int = 16, device=None, dtype=None):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        check_positive_int("mini_batch", mini_batch)
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not a multiple of num_heads={num_heads}")
        if not (base_lr >= 0 and base_lr < float("inf")):
            raise ValueError(f"base_lr={base_lr!r}: expected a finite number >= 0")
        if isinstance(conv_kernel, bool) or not isinstance(conv_kernel, int) or conv_kernel < 0:
            raise ValueError(f"conv_kernel={conv_kernel!r}: expected 0 (no convolution) or an integer >= 1")
        if isinstance(scan_group, bool) or not isinstance(scan_group, int) or scan_group < 0:
            raise ValueError(f"scan_group={scan_group!r}: expected an integer >= 0")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.mini_batch = mini_batch
        self.base_lr = float(base_lr)
        self.gate_init = float(gate_init)
        self.conv_kernel = conv_kernel
        self.scan_group = scan_group
        f, H = self.head_dim, num_heads
        self.norm = norm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(dim, dim, bias=False, **factory) for _ in range(4))
        if conv_kernel:
            self.conv_q = nn.Conv1d(dim, dim, conv_kernel, groups=dim, **factory)
            self.conv_k = nn.Conv1d(dim, dim, conv_kernel, groups=dim, **factory)
        self.lr_weight = nn.Parameter(torch.empty(H, dim, **factory))
        self.lr_bias = nn.Parameter(torch.zeros(H, **factory))
        self.token_scale_bias = nn.Parameter(torch.zeros(mini_batch, **factory))
        self.w1 = nn.Parameter(torch.empty(H, f, 4 * f, **factory))
        self.b1 = nn.Parameter(torch.zeros(H, 4 * f, **factory))
        self.w2 = nn.Parameter(torch.empty(H, 4 * f, f, **factory))
        self.b2 = nn.Parameter(torch.zeros(H, f, **factory))
        self.ln_weight = nn.Parameter(torch.ones(H, f, **factory))
        self.ln_bias = nn.Parameter(torch.zeros(H, f, **factory))
        self.post_norm = nn.LayerNorm(dim, eps=1e-6, **factory)
        self.gate = nn.Parameter(torch.full((dim,), float(gate_init), **factory))
        self.ttt_enabled = True
        # Diagnostics: when a list, whole-sequence forwards append [B, H, n, 5] `ttt_mlp` diagnostics
        # (l0, lprev, lafter, update and change norms) of each document's n whole mini-batches.
        self.capture: list[torch.Tensor] | None = None
        if self.w1.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initial values of ttt-lm-pytorch (normal(0, 0.02) weights, zero biases, unit
        LayerNorm scales) and the gate at `gate_init`; the pre-norm is the layer's own."""
        with torch.no_grad():
            for weight in (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_proj.weight,
                           self.lr_weight, self.w1, self.w2):
                nn.init.normal_(weight, std=0.02)
            for bias in (self.lr_bias, self.token_scale_bias, self.b1, self.b2, self.ln_bias):
                bias.zero_()
            self.ln_weight.fill_(1.0)
            self.gate.fill_(self.gate_init)
            self.post_norm.reset_parameters()
            if self.conv_kernel:
                self.conv_q.reset_parameters()
                self.conv_k.reset_parameters()

    @property
    def ttt_active(self) -> bool:
        return self.ttt_enabled and self.base_lr > 0

    @property
    def frames_per_update(self) -> int:
        return self.mini_batch

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, mini_batch={self.mini_batch}, base_lr={self.base_lr}, "
                f"conv_kernel={self.conv_kernel}, ttt_enabled={self.ttt_enabled}")

    def initial_weights(self) -> InnerWeights:
        return InnerWeights(self.w1, self.b1, self.w2, self.b2)

    def token_scales(self) -> torch.Tensor:
        """[b]: the scale of each in-mini-batch position, 1 / (t + 1) plus a learned bias, >= 0."""
        t = torch.arange(1, self.mini_batch + 1, device=self.token_scale_bias.device)
        return (1.0 / t + self.token_scale_bias).clamp_min(0.0)

    def _init_streaming_state(self, batch_size: int) -> TTTMLPStreamState:
        return TTTMLPStreamState.zeros(batch_size, self.initial_weights(), self.dim, self.conv_kernel,
                                       self.w1.device)

    def forward(self, x: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d] the residual stream; segments: optional [B, T] document ids of packed
        sequences (whole sequences only): each document starts from the initial weights."""
        self._check_input(x, segments)
        h = self.norm(x)
        if self._streaming_state is not None:
            y = self._streaming_output(h)
        else:
            y = self._parallel_output(h, segments)
        update = self.o_proj(self.post_norm(y.to(x.dtype)))
        return x + torch.tanh(self.gate) * update

    # Whole sequences.
    def _parallel_output(self, h: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
        spans = document_spans(segments, h.shape[1])
        if all(len(row) == 1 for row in spans):
            return self._documents(h)
        rows = [torch.cat([self._documents(h[b:b + 1, start:end]) for start, end in row], dim=1)
                for b, row in enumerate(spans)]
        return torch.cat(rows, dim=0)

    def _documents(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, d] the TTT-MLP output of whole documents that start at position 0."""
        q, k, v, lr = self._heads(h, *self._conv_inputs(h))
        losses = [] if self.capture is not None else None
        out, _ = ttt_mlp(q, k, v, lr, self.token_scales(), self.ln_weight, self.ln_bias, self.initial_weights(),
                         checkpoint_group=self.scan_group if self.training else 0, losses=losses)
        if self.capture is not None:  # [B, H, 0, 5] for a document shorter than a mini-batch
            self.capture.append(torch.stack(losses, dim=2) if losses else q.new_zeros(*q.shape[:2], 0, 5))
        return _merge_heads(out)

    def _conv_inputs(self, h: torch.Tensor, state: TTTMLPStreamState | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys before the heads split: projections, then the causal convolutions,
        which read the state's last inputs (zeros at a document's start)."""
        q, k = self.q_proj(h), self.k_proj(h)
        if not self.conv_kernel:
            return q, k
        B, _, d = q.shape
        pad = self.conv_kernel - 1
        outs = []
        for conv, x, tail in ((self.conv_q, q, None if state is None else state.q_tail),
                              (self.conv_k, k, None if state is None else state.k_tail)):
            before = tail.to(x.dtype) if tail is not None else x.new_zeros(B, pad, d)
            window = torch.cat([before, x], dim=1)
            if tail is not None:
                run = state.exec_mask[:, None, None]
                tail.copy_(torch.where(run, window[:, window.shape[1] - pad:].to(tail.dtype), tail))
            outs.append(F.conv1d(window.transpose(1, 2), conv.weight, conv.bias, groups=d).transpose(1, 2))
        return outs[0], outs[1]

    def _heads(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v [B, H, T, f] and the inner learning rates [B, H, T]."""
        def split(t):
            return t.view(*t.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)
        base_lr = self.base_lr if self.ttt_enabled else 0.0
        gate = torch.einsum("btd,hd->bht", h, self.lr_weight) + self.lr_bias[:, None]
        lr = base_lr * torch.sigmoid(gate) / self.head_dim
        return split(q), split(k), split(self.v_proj(h)), lr

    # Streaming.
    def _streaming_output(self, h: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        assert state is not None
        if h.shape[0] != state.batch_size:
            raise ValueError(f"streaming with batch size {state.batch_size}, got a batch of {h.shape[0]}")
        q, k, v, lr = self._heads(h, *self._conv_inputs(h, state))
        T, b = h.shape[1], self.mini_batch
        pieces = []
        t = 0
        start = common_position(state.pos) if T > 1 else None
        if start is not None:
            # All samples at the same position: step to the next mini-batch's start, then take
            # whole mini-batches in parallel, then step through the rest.
            head = min((b - start) % b, T)
            pieces += [self._step(state, q, k, v, lr, i) for i in range(head)]
            t = head
            n_whole = (T - t) // b * b
            if n_whole:
                piece = slice(t, t + n_whole)
                out, inner = ttt_mlp(q[:, :, piece], k[:, :, piece], v[:, :, piece], lr[:, :, piece],
                                     self.token_scales(), self.ln_weight, self.ln_bias, self.initial_weights(),
                                     initial_delta=state.inner.delta)
                state.update(inner, state.pos)
                pieces.append(out)
                t += n_whole
        pieces += [self._step(state, q, k, v, lr, i) for i in range(t, T)]
        return _merge_heads(torch.cat(pieces, dim=2))

    def _step(self, state: TTTMLPStreamState, q, k, v, lr, i: int) -> torch.Tensor:
        scales = self.token_scales()
        out, inner = ttt_mlp_step(q[:, :, i], k[:, :, i], v[:, :, i], lr[:, :, i], scales[state.pos],
                                  state.pos == self.mini_batch - 1, self.ln_weight, self.ln_bias,
                                  self.initial_weights(), state.inner)
        state.update(inner, (state.pos + 1) % self.mini_batch)
        return out[:, :, None]

    def fast_weight_change_norms(self) -> torch.Tensor:
        """[B]: the Frobenius norm of every sample's inner-weight change (W1, b1, W2, b2 at the
        start of its current mini-batch, less their initial values), read from the streaming state."""
        if self._streaming_state is None:
            raise RuntimeError("fast weights live in the streaming state: call inside `streaming(...)`")
        return torch.stack([t.flatten(1).square().sum(1) for t in self._streaming_state.inner.delta]).sum(0).sqrt()

    def _check_input(self, x: torch.Tensor, segments: torch.Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected [batch, time, {self.dim}]")
        check_sequence(x, segments, self._streaming_state is not None)


def _merge_heads(y: torch.Tensor) -> torch.Tensor:
    B, H, T, f = y.shape
    return y.transpose(1, 2).reshape(B, T, H * f)
