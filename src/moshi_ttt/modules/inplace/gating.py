"""`InPlaceTTTGating`: moshi's gated MLP with a test-time-trained down-projection.

A drop-in replacement for `moshi.modules.gating.ActivationGating`: the same
`linear_in` ([W_gate; W_up]) and `linear_out` (W0 = W_down) parameters, so a
pretrained layer loads as it is, plus the target generator `ttt_target`.

    Z = act(H W_gate^T) * (H W_up^T)
    O_[i] = Z_[i] (W0 + eta * sum_{j<i} lambda^(i-1-j) c_j V_[j]^T Z_[j])^T,   V = Conv1D_K(X0) W_target^T

(lambda, the forgetting factor, is 1 unless set: the fast weights then keep every update.)
Two options generalise the update (`ops.inplace.recurrence`): the delta rule (objective
"l2", each chunk writes its targets' error under the fast weights, so a key written again
replaces its value), and a gate that sets each chunk's decay and write strength from the
chunk's own input (`gate.py`).

Outside streaming, whole sequences go through the dual form (`ops.inplace`); inside
`streaming(...)`, every sample keeps its own fast weights (`FastWeightState`).
"""

import typing as tp
import warnings
from typing import NamedTuple

import torch
from torch import nn
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import StreamingModule

from ...ops.common import compute_dtype
from ...ops.inplace import (ALGORITHMS, KEPT_SCORES, check_forget, chunk_delta_sq_norms, clip_scales,
                            clipped_targets, inplace_ttt_add_, inplace_ttt_down)
from ...ops.inplace.recurrence import check_objective, chunk_recurrence, l2_step_scales, recurrence_trace
from ...ops.inplace.target_conv import SPAN
from ..fast_weight import FastWeightLayer, check_positive_int, check_sequence, common_position, document_spans
from .gate import GATES, ChunkGate
from .state import FastWeightState
from .targets import LMAlignedTargets, TargetInit


class ChunkRecord(NamedTuple):
    """What a whole-sequence forward captures of one document, for diagnostics: Z [B, T, h],
    V [B, T, d], and each chunk's decay and write strength ([B, n] or None: 1)."""
    z: torch.Tensor
    v: torch.Tensor
    decay: torch.Tensor | None
    write: torch.Tensor | None


class TTTInactiveWarning(UserWarning):
    """Training sequences that fit in one chunk: TTT has no earlier chunk to learn from."""


class InPlaceTTTGating(FastWeightLayer, StreamingModule[FastWeightState]):
    """Gated MLP whose down-projection adapts chunk by chunk to the sequence.

    Args:
        dim: model dimension d.
        hidden: MLP hidden size h (`linear_in` is 2h x d, `linear_out` d x h).
        activation: the gate's activation, as in moshi (e.g. `F.silu`).
        chunk_size: C, tokens per fast-weight update.
        eta: fast-weight learning rate; 0 makes the layer the plain MLP.
        kernel_size: K, the target conv reads tokens t .. t+K-1 ...
        kernel_past: ... or, with P taps on the past, t-P .. t+K-1-P.
        clip_tau: if set, each chunk's update `eta * V^T Z` is scaled down to
            Frobenius norm tau when it is larger (the paper evaluated with 1e-5).
        forget: lambda in (0, 1]: every chunk, the fast weights' change decays toward W0,
            `W <- W0 + lambda (W - W0) + eta c V^T Z`; 1 keeps every update forever. With a
            gate, the decay every chunk starts from.
        objective: "dot" (the paper's update, V^T Z) or "l2" (the delta rule: the error of
            the targets under the fast weights, `(V - Z (W - W0)^T)^T Z`, with a step bounded
            for stability; no clip).
        gate: "none", "decay" (each chunk's decay from its mean input, starting at `forget`
            < 1) or "decay_write" (also its write strength, starting at 1); no clip.
        init, init_std: how the target generator starts, see `LMAlignedTargets`.
        algorithm: exact form for whole sequences: "dual" (short), "scan" (long) or
            "auto" (the one with fewer operations for the length at hand).
        scan_block: positions per block of the scan (rounded down to whole chunks);
            None picks one from the layer's size (`ops.block_size_for`).
        kept_scores: the longest block (positions) whose dual-form scores the backward
            keeps from the forward; longer ones are recomputed (0: always).
        conv_span: positions per float32 span of the target conv (rounded down to whole chunks).
    """

    method = "inplace"
    own_parameters = ("ttt_target", "ttt_gate")  # linear_in and linear_out are Moshi's own
    _fsdp_final = True  # as moshi's ActivationGating: a whole FSDP unit or inside one, never split

    def __init__(self, dim: int, hidden: int, activation: tp.Callable, *, chunk_size: int = 512,
                 eta: float = 1.0, kernel_size: int = 2, kernel_past: int = 0, clip_tau: float | None = None,
                 init: TargetInit = "warm", init_std: float = 0.02, algorithm: str = "auto",
                 scan_block: int | None = None, forget: float = 1.0, kept_scores: int = KEPT_SCORES,
                 conv_span: int = SPAN, objective: str = "dot", gate: str = "none", device=None, dtype=None):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("hidden", hidden)
        check_positive_int("chunk_size", chunk_size)
        check_positive_int("kernel_size", kernel_size)
        if not (eta >= 0 and eta < float("inf")):
            raise ValueError(f"eta={eta!r}: expected a finite number >= 0")
        if clip_tau is not None and not clip_tau > 0:
            raise ValueError(f"clip_tau={clip_tau!r}: expected None (no clip) or a number > 0")
        if not init_std > 0:
            raise ValueError(f"init_std={init_std!r}: expected a number > 0")
        check_forget(forget)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={algorithm!r}: expected one of {ALGORITHMS}")
        if scan_block is not None:
            check_positive_int("scan_block", scan_block)
        if isinstance(kept_scores, bool) or not isinstance(kept_scores, int) or kept_scores < 0:
            raise ValueError(f"kept_scores={kept_scores!r}: expected an integer >= 0")
        check_positive_int("conv_span", conv_span)
        check_objective(objective)
        if gate not in GATES:
            raise ValueError(f"gate={gate!r}: expected one of {GATES}")
        if clip_tau is not None and (objective != "dot" or gate != "none"):
            raise ValueError(f"clip_tau={clip_tau!r} with objective={objective!r}, gate={gate!r}: the clip is "
                             "for the additive update without a gate (the delta rule bounds its own steps)")
        self.dim = dim
        self.hidden = hidden
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.linear_out = nn.Linear(hidden, dim, bias=False, device=device, dtype=dtype)
        self.activation = activation
        self.ttt_target = LMAlignedTargets(dim, kernel_size, init, init_std, past=kernel_past,
                                           device=device, dtype=dtype)
        self.ttt_gate = (None if gate == "none" else
                         ChunkGate(dim, forget, gate == "decay_write", device=device, dtype=dtype))
        self.objective = objective
        self.chunk_size = chunk_size
        self.eta = float(eta)
        self.clip_tau = None if clip_tau is None else float(clip_tau)
        self.forget = float(forget)
        self.algorithm = algorithm
        self.scan_block = scan_block
        self.kept_scores = kept_scores
        self.conv_span = conv_span
        self.ttt_enabled = True
        # Diagnostics: when a list, whole-sequence forwards append a ChunkRecord of every document.
        self.capture: list[ChunkRecord] | None = None

    @classmethod
    def from_gating(cls, gating: nn.Module, **kwargs) -> "InPlaceTTTGating":
        """Take over the linears of a moshi `ActivationGating` (shared, not copied)."""
        if not isinstance(gating, ActivationGating):
            raise TypeError(f"expected a moshi ActivationGating, got {type(gating).__name__}")
        if not (isinstance(gating.linear_in, nn.Linear) and isinstance(gating.linear_out, nn.Linear)):
            raise TypeError("quantized or LoRA-wrapped gating cannot be converted: "
                            f"linear_in is {type(gating.linear_in).__name__}")
        w_out = gating.linear_out.weight
        layer = cls(w_out.shape[0], w_out.shape[1], gating.activation,
                    device="meta", dtype=w_out.dtype, **kwargs)
        layer.linear_in, layer.linear_out = gating.linear_in, gating.linear_out
        layer.ttt_target.to_empty(device=w_out.device)
        layer.ttt_target.reset_parameters(kwargs.get("init", "warm"), kwargs.get("init_std", 0.02))
        if layer.ttt_gate is not None:
            layer.ttt_gate.to_empty(device=w_out.device)
            layer.ttt_gate.reset_parameters()
        return layer.train(gating.training)

    @property
    def kernel_size(self) -> int:
        return self.ttt_target.kernel_size

    @property
    def kernel_past(self) -> int:
        return self.ttt_target.past

    @property
    def ttt_active(self) -> bool:
        return self.ttt_enabled and self.eta > 0

    @property
    def gate(self) -> str:
        if self.ttt_gate is None:
            return "none"
        return "decay" if self.ttt_gate.write is None else "decay_write"

    @property
    def recurrent(self) -> bool:
        """Whether the update reads the fast weights or the data decides the decay: the chunk
        recurrence then computes the term, not the dual form."""
        return self.objective == "l2" or self.ttt_gate is not None

    @property
    def frames_per_update(self) -> int:
        return self.chunk_size

    def extra_repr(self) -> str:
        return (f"chunk_size={self.chunk_size}, eta={self.eta}, kernel_size={self.kernel_size}, "
                f"kernel_past={self.kernel_past}, "
                f"clip_tau={self.clip_tau}, forget={self.forget}, objective={self.objective}, gate={self.gate}, "
                f"algorithm={self.algorithm}, scan_block={self.scan_block}, ttt_enabled={self.ttt_enabled}")

    def _init_streaming_state(self, batch_size: int) -> FastWeightState:
        weight = self.ttt_target.proj.weight
        return FastWeightState.zeros(batch_size, self.dim, self.hidden, self.chunk_size,
                                     self.kernel_size, weight.device, weight.dtype, past=self.kernel_past,
                                     forget=self.forget, objective=self.objective, gated=self.ttt_gate is not None)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """Z = act(x W_gate^T) * (x W_up^T), [B, T, h]."""
        h = self.linear_in(x)
        B, T, _ = h.shape
        h = h.view(B, T, 2, -1)
        return self.activation(h[..., 0, :]) * h[..., 1, :]

    def forward(self, x: torch.Tensor, x0: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d] MLP input (hidden states); x0: [B, T, d] token embeddings.

        segments: optional [B, T] document ids of packed sequences (whole sequences
        only); each document gets its own fast weights, starting from W0.
        """
        self._check_inputs(x, x0, segments)
        if not self.ttt_active:
            return self.linear_out(self.gated(x))
        if self._streaming_state is not None:
            z = self.gated(x)
            return self.linear_out(z).add_(self._streaming_update(z, x0, x))  # the sum in float32, rounded once
        return self._parallel_output(x, x0, segments)

    def _parallel_output(self, x: torch.Tensor, x0: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
        """The output for whole sequences, each document's fast weights starting from W0."""
        spans = document_spans(segments, x.shape[1])
        longest = max(end - start for row in spans for start, end in row)
        if self.training and longest <= self.chunk_size:
            warnings.warn(
                f"In-Place TTT cannot act on a training sequence of {longest} tokens with chunk_size="
                f"{self.chunk_size}: a chunk only sees the updates of earlier chunks, so a sequence "
                "that fits in one chunk gets the plain MLP and the target generator no gradient. "
                "Use sequences longer than one chunk, or a smaller chunk_size.",
                TTTInactiveWarning, stacklevel=2)
        if all(len(row) == 1 for row in spans):
            documents = [[(slice(None), slice(None))]]
        else:
            documents = [[(slice(b, b + 1), slice(start, end)) for start, end in row] for b, row in enumerate(spans)]
        # Targets before Z: autograd runs the later-made nodes first, so the targets'
        # backward then comes after the gated MLP's, once its activations are freed.
        targets = [[self.ttt_target(x0[doc], self.chunk_size, self.conv_span) for doc in row] for row in documents]
        z = self.gated(x)
        rows = [[self._document_output(z[doc], v, x[doc]) for doc, v in zip(row, row_targets)]
                for row, row_targets in zip(documents, targets)]
        if len(rows) == 1 and len(rows[0]) == 1:
            return rows[0][0]
        return torch.cat([torch.cat(row, dim=1) for row in rows], dim=0)

    def _document_output(self, z: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output for whole documents that start at position 0, from Z, their targets and
        the layer's input x (which the gate reads)."""
        factors = self.chunk_factors(z, v, x) if self.recurrent else None
        if self.capture is not None:
            with torch.no_grad():
                recorded = factors or self.chunk_factors(z, v, x)
            self.capture.append(ChunkRecord(z.detach(), v.detach(), *(
                None if f is None else f.detach() for f in recorded)))
        if self.recurrent:
            term, _ = chunk_recurrence(z, v, self.chunk_size, self.eta, self.objective, *factors,
                                       block_chunks=self._block_chunks())
            # Nothing reads the last chunk's update and factors: with weight 0 the targets and the
            # factors stay in the graph of a one-chunk document, so that every FSDP process reduces
            # the same gradients.
            unread = sum(t.sum() for t in (v, *factors) if t is not None)
            out = self.linear_out(z)
            return out + (term + 0 * unread).to(out.dtype)
        args = (self.chunk_size, self.eta, self.clip_tau, self.forget)
        if type(self.linear_out) is nn.Linear and self.linear_out.bias is None:
            return inplace_ttt_down(z, v, self.linear_out.weight, *args, **self._form())
        # Another slow layer (moshi's LoRA): its output, then the fast-weight term added in place.
        return inplace_ttt_add_(z, v, self.linear_out(z), *args, **self._form())

    def _form(self) -> dict:
        """The ops' keywords that choose how the term is computed (not what it is)."""
        return dict(algorithm=self.algorithm, scan_block=self.scan_block, kept_scores=self.kept_scores)

    def _block_chunks(self) -> int | None:
        """Chunks per checkpointed block of the recurrence: scan_block's, else its default."""
        return None if self.scan_block is None else max(1, self.scan_block // self.chunk_size)

    def chunk_factors(self, z: torch.Tensor, v: torch.Tensor, x: torch.Tensor
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each chunk's decay a_i and write strength c_i, [B, n] each (None: 1), of a document
        from position 0: the gate's (or the fixed forgetting factor), the clip's, the delta
        rule's step bound; differentiable."""
        decay = write = None
        if self.ttt_gate is not None:
            decay, write = self.ttt_gate(x, self.chunk_size)
        elif self.forget != 1.0:
            decay = z.new_full((z.shape[0], -(-z.shape[1] // self.chunk_size)), self.forget,
                               dtype=compute_dtype(z.dtype))
        if self.clip_tau is not None:
            cd = compute_dtype(z.dtype)
            write = clip_scales(chunk_delta_sq_norms(z.to(cd), v.to(cd), self.chunk_size), self.eta, self.clip_tau)
        if self.objective == "l2":
            scales = l2_step_scales(z, self.chunk_size, self.eta)
            write = scales if write is None else write * scales
        return decay, write

    def _streaming_update(self, z: torch.Tensor, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Fast-weight term of a streaming step of any length."""
        state = self._streaming_state
        assert state is not None
        if z.shape[0] != state.batch_size:
            raise ValueError(f"streaming with batch size {state.batch_size}, got a batch of {z.shape[0]}")
        T = z.shape[1]
        C = self.chunk_size
        pieces = []
        t = 0
        start = common_position(state.pos) if T > 1 else None
        if start is not None:
            # All samples at the same chunk position: step to the next chunk start,
            # then take whole chunks in parallel, then step through the rest.
            head = min((C - start) % C, T)
            pieces += [self._step(state, z[:, i], x0[:, i], x[:, i]) for i in range(head)]
            t = head
            n_whole = (T - t) // C * C
            if n_whole:
                whole = slice(t, t + n_whole)
                pieces.append(self._whole_chunks(state, z[:, whole], x0[:, whole], x[:, whole]))
                t += n_whole
        pieces += [self._step(state, z[:, i], x0[:, i], x[:, i]) for i in range(t, T)]
        return torch.cat(pieces, dim=1)

    def _step(self, state: FastWeightState, z: torch.Tensor, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return state.step(z, x0, self.ttt_target, self.eta, self.clip_tau, self.ttt_gate, x)[:, None]

    def _whole_chunks(self, state: FastWeightState, z: torch.Tensor, x0: torch.Tensor,
                      x: torch.Tensor) -> torch.Tensor:
        """Chunk-aligned tokens of every sample at once, from the state's fast weights."""
        state.settle()
        if self.recurrent:
            v = self.ttt_target(x0, self.chunk_size, self.conv_span)
            term, final_delta = chunk_recurrence(z, v, self.chunk_size, self.eta, self.objective,
                                                 *self.chunk_factors(z, v, x), initial_delta=state.delta,
                                                 block_chunks=self._block_chunks())
            state.absorb(final_delta)
            return term
        v = clipped_targets(z, self.ttt_target(x0, self.chunk_size, self.conv_span), self.chunk_size, self.eta,
                            self.clip_tau)
        update = z.new_zeros(*z.shape[:2], self.dim, dtype=compute_dtype(z.dtype))
        _, final_delta = inplace_ttt_add_(z, v, update, self.chunk_size, self.eta, forget=self.forget, **self._form(),
                                          initial_delta=state.delta, output_final_delta=True)
        state.absorb(final_delta)
        return update

    def fast_weight_change_norms(self) -> torch.Tensor:
        """[B]: ||W - W0||_F of each sample's fast weights now, read from the streaming state."""
        if self._streaming_state is None:
            raise RuntimeError("fast weights live in the streaming state: call inside `streaming(...)`")
        return self.eta * self._streaming_state.fast_weight_change().flatten(1).norm(dim=1)

    def chunk_update_norms(self, record: ChunkRecord) -> torch.Tensor:
        """eta * ||c_i E_i^T Z_i||_F, the norm of every chunk's update of a captured document, [B, n_chunks]."""
        if self.recurrent:
            return recurrence_trace(record.z, record.v, self.chunk_size, self.eta, self.objective, record.decay,
                                    record.write).update_norms
        cd = compute_dtype(record.z.dtype)
        vc = clipped_targets(record.z, record.v, self.chunk_size, self.eta, self.clip_tau)
        return self.eta * chunk_delta_sq_norms(record.z.to(cd), vc.to(cd), self.chunk_size).sqrt()

    def _check_inputs(self, x: torch.Tensor, x0: torch.Tensor, segments: torch.Tensor | None) -> None:
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 (token embeddings) must be a tensor, got {type(x0).__name__}")
        for name, t in (("x", x), ("x0", x0)):
            if t.dim() != 3:
                raise ValueError(f"{name} has shape {tuple(t.shape)}: expected [batch, time, {self.dim}]")
            if t.shape[-1] != self.dim:
                raise ValueError(f"{name} has feature size {t.shape[-1]}: expected {self.dim}")
        if x.shape[:2] != x0.shape[:2]:
            raise ValueError(f"hidden states {tuple(x.shape)} and token embeddings {tuple(x0.shape)} "
                             "must have the same batch and length")
        if x.device != x0.device:
            raise ValueError(f"hidden states on {x.device} but token embeddings on {x0.device}")
        check_sequence(x, segments, self._streaming_state is not None)
