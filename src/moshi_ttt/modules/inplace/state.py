"""Per-sample streaming state of In-Place TTT, and its one-token update rule.

The fast weight of sample b is `W0 + eta * delta[b]` (plus the pending chunk
below); `delta` is float32 and never a parameter. A token step must work under
moshi's CUDA graphs, where a Python branch is frozen at capture, so the step
has no branch on data and a constant cost:

- The tokens of the current chunk are buffered (Z and targets V) in one half
  of a two-chunk ring; when the chunk completes, the halves swap roles.
- The completed previous chunk is folded into `delta` over the C steps of the
  next chunk, ceil(d / C) rows of `delta` per step. Until a row is folded, its
  contribution reaches the output through the dual form
  `(z Z_prev^T) V_prev`, so every token of chunk i sees exactly the updates of
  chunks < i, as in the parallel form. With a forgetting factor lambda < 1, a row
  is multiplied by lambda when it is folded, and read times lambda until then.
- Targets are computed as the embeddings arrive; the target of position q is
  final once position q+K-1-P (or the chunk's end) is seen, P the conv's taps on
  the past. The squared norm of the chunk's delta, for the clip, accumulates the
  same way.
- A gate (`modules.inplace.gate`) sums the layer's input over the chunk and sets the
  chunk's decay (the lambda of its fold) and write strength at its end. The delta rule
  (objective "l2") keeps every position's fast read; at the chunk's end the targets
  become the rule's errors `V - a * read`, and the chunk's Gram bound, accumulated a row
  at a time, its step factor. The fold and the reads are then those of the additive rule.

Every write is masked by `exec_mask` and done in place, as CUDA graphs need.
The buffered Z and V keep the model's dtype (they are exact there); for a bf16
model on CUDA, `delta` (float32) also has a bf16 copy that the output reads,
kept up to date row by row as rows are folded.
"""

from dataclasses import dataclass

import torch
from moshi.modules.streaming import State

from ...ops.common import bmm_acc, compute_dtype, operand_dtype
from ...ops.inplace import clip_scales, future_conv_partial_rows
from ...ops.inplace.step_kernels import kernels_enabled, token_step
from .gate import ChunkGate


@dataclass
class FastWeightState(State):
    delta: torch.Tensor         # [B, d, h] folded chunk deltas (clipped, not eta-scaled), float32
    delta_read: torch.Tensor    # delta in the matmul operand dtype (delta itself when that is float32)
    z_ring: torch.Tensor        # [B, 2C, h] Z of the previous and the current chunk
    v_ring: torch.Tensor        # [B, 2C, d] targets, same rows
    x0_tail: torch.Tensor       # [B, K-1, d] embeddings of the K-1 positions before this one
    pos: torch.Tensor           # [B] position in the current chunk
    slot: torch.Tensor          # [B] ring half holding the current chunk (0 or 1)
    prev_scale: torch.Tensor    # [B] clip factor of the previous chunk, 0 when there is none
    cur_sq_norm: torch.Tensor   # [B] ||V^T Z||_F^2 over the final rows of the current chunk
    prev_keep: torch.Tensor     # [B] factor of delta's rows not yet folded: lambda (or the gate's decay)
                                # after a chunk, 1 after settle(), 0 before the first chunk ends (delta is 0)
    read_ring: torch.Tensor     # [B, 2C, d] the fast term each position read (l2; [B, 0, d] otherwise)
    x_sum: torch.Tensor         # [B, d] the layer's input summed over the current chunk (gate; [B, 0])
    gram_rows: torch.Tensor     # [B, C] sum_s |z_s . z_t| over the current chunk so far, per row t (l2; [B, 0])
    use_kernels: bool = False   # token steps through the Triton kernels (`ops.inplace.step_kernels`)
    past: int = 0               # the target conv's taps on the past
    forget: float = 1.0         # lambda, the forgetting factor of each chunk's fold (1: none)
    objective: str = "dot"      # "l2": the delta rule (`ops.inplace.recurrence`)
    gated: bool = False         # a ChunkGate sets each chunk's decay (and write strength)

    @classmethod
    def zeros(cls, batch_size: int, dim: int, hidden: int, chunk_size: int, kernel_size: int,
              device: torch.device, model_dtype: torch.dtype, past: int = 0,
              forget: float = 1.0, objective: str = "dot", gated: bool = False) -> "FastWeightState":
        cd = compute_dtype(model_dtype)
        op = operand_dtype(model_dtype, device)

        def z(*shape, dt=cd):
            return torch.zeros(*shape, device=device, dtype=dt)
        delta = z(batch_size, dim, hidden)
        l2 = objective == "l2"
        return cls(
            batch_size, device,
            delta=delta,
            delta_read=delta if op == cd else z(batch_size, dim, hidden, dt=op),
            z_ring=z(batch_size, 2 * chunk_size, hidden, dt=model_dtype),
            v_ring=z(batch_size, 2 * chunk_size, dim, dt=model_dtype),
            x0_tail=z(batch_size, kernel_size - 1, dim),
            pos=z(batch_size, dt=torch.long),
            slot=z(batch_size, dt=torch.long),
            prev_scale=z(batch_size),
            cur_sq_norm=z(batch_size),
            prev_keep=z(batch_size),
            read_ring=z(batch_size, 2 * chunk_size if l2 else 0, dim),
            x_sum=z(batch_size, dim if gated else 0),
            gram_rows=z(batch_size, chunk_size if l2 else 0),
            # The kernels read forward targets only, add every update and never forget.
            use_kernels=(kernels_enabled(device, model_dtype) and past == 0 and forget == 1.0 and not l2
                         and not gated),
            past=past,
            forget=forget,
            objective=objective,
            gated=gated,
        )

    @property
    def chunk_size(self) -> int:
        return self.z_ring.shape[1] // 2

    @property
    def rows_per_step(self) -> int:
        """Rows of delta folded per step: the previous chunk is folded within one chunk."""
        return -(-self.delta.shape[1] // self.chunk_size)

    @property
    def op(self) -> torch.dtype:
        return self.delta_read.dtype

    @property
    def forgets(self) -> bool:
        """Whether the fold multiplies delta's rows by a decay (a fixed lambda < 1, or a gate's)."""
        return self.forget != 1.0 or self.gated

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        for t in (self.delta, self.delta_read, self.z_ring, self.v_ring, self.x0_tail, self.pos,
                  self.slot, self.prev_scale, self.cur_sq_norm, self.prev_keep, self.read_ring, self.x_sum,
                  self.gram_rows):
            mask = reset_mask.view(-1, *([1] * (t.dim() - 1)))
            t.masked_fill_(mask, 0)

    def _prev_rows(self) -> torch.Tensor:
        """[B, 2C] bool: the ring rows holding the previous chunk."""
        C = self.chunk_size
        ring_half = torch.arange(2 * C, device=self.pos.device) // C
        return ring_half[None] != self.slot[:, None]

    def _sync_read_copy(self) -> None:
        if self.delta_read is not self.delta:
            self.delta_read.copy_(self.delta)

    def _unfolded(self) -> torch.Tensor:
        """[B, d] bool: the rows of delta the previous chunk's update has not reached yet."""
        dim = self.delta.shape[1]
        return torch.arange(dim, device=self.pos.device)[None] >= (self.pos * self.rows_per_step)[:, None]

    def pending_delta(self) -> torch.Tensor:
        """[B, d, h]: the part of the previous chunk's delta not yet folded."""
        prev = self._prev_rows().to(self.v_ring.dtype)
        full = bmm_acc((self.v_ring * prev[..., None]).transpose(1, 2), self.z_ring, self.op)
        return full * (self._unfolded() * self.prev_scale[:, None])[..., None]

    def _kept_delta(self) -> torch.Tensor:
        """[B, d, h]: delta with its unfolded rows already multiplied by lambda."""
        if not self.forgets:
            return self.delta
        keep = torch.where(self._unfolded(), self.prev_keep[:, None], 1.0)
        return self.delta * keep[..., None]

    def fast_weight_change(self) -> torch.Tensor:
        """[B, d, h]: W - W0 of every sample, divided by eta (folded and pending updates)."""
        return self._kept_delta() + self.pending_delta()

    def settle(self) -> None:
        """Fold the rest of the previous chunk now (eager only: outside CUDA graphs)."""
        run = self.exec_mask
        if not self.forgets:
            self.delta.add_(self.pending_delta() * run[:, None, None])
        else:
            self.delta.copy_(torch.where(run[:, None, None], self.fast_weight_change(), self.delta))
            self.prev_keep.masked_fill_(run, 1.0)
        self.prev_scale.masked_fill_(run, 0)
        self._sync_read_copy()

    def absorb(self, final_delta: torch.Tensor) -> None:
        """Take the delta after whole chunks run in parallel from this state's, after settle():
        `final_delta` of `inplace_ttt_add_` with initial_delta=delta."""
        self.delta.copy_(torch.where(self.exec_mask[:, None, None], final_delta, self.delta))
        self._sync_read_copy()

    def step(self, z: torch.Tensor, x0: torch.Tensor, targets, eta: float,
             clip_tau: float | None, gate: ChunkGate | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        """Advance by one token. z: [B, h], x0: [B, d] -> fast-weight term [B, d].

        `targets` is the layer's `LMAlignedTargets`; `gate` its ChunkGate (with a gated state),
        which reads x: [B, d], the layer's input. The result is the token's
        `eta * z (delta, its unfolded rows times lambda, + updates not yet folded)^T`, in
        float32 (float64). (Kept in
        eager mode: under torch.compile the step ran slower on an H100.) On CUDA, the
        Triton kernels of `ops.inplace.step_kernels` can do the same in five or six launches.
        """
        if self.use_kernels:
            return token_step(self, z, x0, targets.conv, targets.proj.weight, eta, clip_tau)
        run = self.exec_mask
        is_prev = self._prev_rows()
        self._fold_rows(is_prev, run)
        out = self._read(z, eta, is_prev, run)
        row = self.slot * self.chunk_size + self.pos
        _masked_write_row(self.z_ring, row, z, run)
        window = torch.cat([self.x0_tail, x0.to(self.x0_tail.dtype)[:, None]], dim=1)  # positions p-K+1 .. p
        v_rows, row_pos = self._write_targets(window, targets, run)
        at_end = run & (self.pos == self.chunk_size - 1)
        self._track_clip(v_rows, row_pos, is_prev, eta, clip_tau, at_end, run)
        if self.objective == "l2":
            _masked_write_row(self.read_ring, row, out, run)
            self._track_gram_bound(z, run)
        if self.gated:
            self.x_sum.add_(x.to(self.x_sum.dtype) * run[:, None])
        self._end_chunk(at_end, eta, gate)
        self._advance(window, at_end, run)
        return out

    def _track_gram_bound(self, z: torch.Tensor, run: torch.Tensor) -> None:
        """Add row p (this token, already in z_ring) to the sums |z_s . z_t| of the current chunk."""
        C = self.chunk_size
        steps = torch.arange(C, device=z.device)[None]
        rows = (self.slot[:, None] * C + steps)[..., None].expand(-1, -1, self.z_ring.shape[-1])
        products = bmm_acc(torch.gather(self.z_ring, 1, rows), z[..., None], self.op).squeeze(-1).abs()
        products = products * (steps <= self.pos[:, None])  # later rows hold an older chunk
        own = steps == self.pos[:, None]
        added = torch.where(own, products.sum(-1, keepdim=True), products)
        self.gram_rows.add_(added * run[:, None])

    def _end_chunk(self, at_end: torch.Tensor, eta: float, gate: ChunkGate | None) -> None:
        """At a chunk's end: its decay and write strength from the gate, the delta rule's step
        factor, and its targets turned into the rule's errors; the chunk's sums start again."""
        if not (self.forgets or self.objective == "l2"):
            return
        keep = torch.full_like(self.prev_keep, self.forget)
        scale = self.prev_scale  # the clip's factor, 1 without a clip, just set for a chunk at its end
        if self.gated:
            decay, write = gate.factors((self.x_sum / self.chunk_size)[:, None])
            keep = decay[:, 0].to(keep.dtype)
            if write is not None:
                scale = scale * write[:, 0].to(scale.dtype)
            self.x_sum.masked_fill_(at_end[:, None], 0)
        if self.objective == "l2":
            bound = self.gram_rows.amax(-1)
            scale = scale / torch.clamp(eta * bound, min=1.0)
            C = self.chunk_size
            cur = torch.arange(2 * C, device=keep.device)[None] // C == self.slot[:, None]
            errors = self.v_ring - (keep[:, None, None] * self.read_ring).to(self.v_ring.dtype)
            self.v_ring.copy_(torch.where((cur & at_end[:, None])[..., None], errors, self.v_ring))
            self.gram_rows.masked_fill_(at_end[:, None], 0)
        self.prev_scale.copy_(torch.where(at_end, scale, self.prev_scale))
        self.prev_keep.copy_(torch.where(at_end, keep, self.prev_keep))

    def _fold_rows(self, is_prev: torch.Tensor, run: torch.Tensor) -> None:
        """Fold rows [p r, (p + 1) r) of the previous chunk's delta into delta (and its copy)."""
        B, dim, hidden = self.delta.shape
        C, r = self.chunk_size, self.rows_per_step
        fold_rows = self.pos[:, None] * r + torch.arange(r, device=self.pos.device)[None]
        valid_rows = fold_rows < dim
        fold_rows = fold_rows.clamp(max=dim - 1)
        v_cols = torch.gather(self.v_ring, 2, fold_rows[:, None, :].expand(B, 2 * C, r))
        prev = is_prev.to(self.v_ring.dtype)
        folded = bmm_acc((v_cols * prev[..., None]).transpose(1, 2), self.z_ring, self.op)
        folded = folded * (valid_rows * (self.prev_scale * run)[:, None])[..., None]
        row_index = fold_rows[..., None].expand(B, r, hidden)
        if self.forgets:  # the rows folded now are multiplied by lambda: add (lambda - 1) row
            keep = torch.where(valid_rows & run[:, None], self.prev_keep[:, None], 1.0)
            folded = folded + (keep - 1.0)[..., None] * self.delta.gather(1, row_index)
        self.delta.scatter_add_(1, row_index, folded)
        if self.delta_read is not self.delta:
            self.delta_read.scatter_(1, row_index, self.delta.gather(1, row_index).to(self.op))

    def _read(self, z: torch.Tensor, eta: float, is_prev: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """The token's output: folded rows from delta, the others in dual form."""
        op = self.op
        out = bmm_acc(self.delta_read, z[..., None], op).squeeze(-1)
        scores = bmm_acc(self.z_ring, z[..., None], op).squeeze(-1) * is_prev * self.prev_scale[:, None]
        pending = bmm_acc(scores[:, None, :], self.v_ring, op).squeeze(1)
        n_folded = (self.pos + run.long()) * self.rows_per_step
        unfolded = torch.arange(self.delta.shape[1], device=z.device)[None] >= n_folded[:, None]
        if self.forgets:
            out = out * torch.where(unfolded, self.prev_keep[:, None], 1.0)
        return eta * (out + pending * unfolded)

    def _write_targets(self, window: torch.Tensor, targets, run: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets of positions p-F .. p from the embeddings seen so far (zero before the chunk),
        written to the current chunk's rows of v_ring; F, the conv's taps on later positions,
        is how many rows before p still change. Returns the rows [B, F+1, d] and, for row j,
        its position p - j ([B, F+1], negative before the chunk)."""
        K = window.shape[1]
        F = K - 1 - self.past
        p = self.pos
        seen = window
        if self.past:
            in_chunk = torch.arange(K - 1, -1, -1, device=p.device)[None] <= p[:, None]  # slot i: position p-K+1+i
            seen = window * in_chunk[..., None]
        v_rows = targets.project(future_conv_partial_rows(seen, targets.conv.to(window.dtype), self.past))
        row_pos = p[:, None] - torch.arange(F + 1, device=p.device)[None]
        row_ok = row_pos >= 0
        cur_start = self.slot * self.chunk_size
        for j in range(F + 1):
            _masked_write_row(self.v_ring, cur_start + row_pos[:, j].clamp(min=0), v_rows[:, j],
                              run & row_ok[:, j])
        return v_rows, row_pos

    def _track_clip(self, v_rows: torch.Tensor, row_pos: torch.Tensor, is_prev: torch.Tensor, eta: float,
                    clip_tau: float | None, at_end: torch.Tensor, run: torch.Tensor) -> None:
        """Add the rows made final to the current chunk's ||V^T Z||_F^2; at the chunk's end, its
        clip factor (1 without a clip) becomes prev_scale, the factor of its fold and reads."""
        if clip_tau is None:
            self.prev_scale.masked_fill_(at_end, 1.0)
            return
        B, n_rows = row_pos.shape
        C = self.chunk_size
        op = self.op
        # Gram terms of each candidate row q against the current chunk's rows < q.
        rows = (self.slot[:, None] * C + row_pos.clamp(min=0))[..., None].expand(B, n_rows, self.delta.shape[2])
        z_rows = torch.gather(self.z_ring, 1, rows)
        gram = (bmm_acc(v_rows, self.v_ring.transpose(1, 2), op)
                * bmm_acc(z_rows, self.z_ring.transpose(1, 2), op))
        ring = torch.arange(2 * C, device=row_pos.device)
        earlier = (~is_prev)[:, None, :] & ((ring % C)[None, None, :] < row_pos[..., None])
        v_sq = v_rows.to(self.delta.dtype).square().sum(-1)
        z_sq = z_rows.to(self.delta.dtype).square().sum(-1)
        terms = (2 * (gram * earlier).sum(-1) + v_sq * z_sq) * (row_pos >= 0)  # [B, F+1]
        # Row p-F becomes final now; at the chunk's end all F+1 rows are.
        sq_norm_now = self.cur_sq_norm + terms[:, -1]
        end_scale = clip_scales(self.cur_sq_norm + terms.sum(-1), eta, clip_tau)
        self.cur_sq_norm.copy_(torch.where(at_end, 0.0, torch.where(run, sq_norm_now, self.cur_sq_norm)))
        self.prev_scale.copy_(torch.where(at_end, end_scale, self.prev_scale))

    def _advance(self, window: torch.Tensor, at_end: torch.Tensor, run: torch.Tensor) -> None:
        """On to the next position; at a chunk's end the ring halves swap roles."""
        self.slot.copy_(torch.where(at_end, 1 - self.slot, self.slot))
        self.pos.copy_(torch.where(run, (self.pos + 1) % self.chunk_size, self.pos))
        self.x0_tail.copy_(torch.where(run[:, None, None], window[:, 1:], self.x0_tail))


def _masked_write_row(buffer: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor) -> None:
    """buffer[b, rows[b]] = values[b] where mask[b]; one row per sample, in place."""
    index = rows[:, None, None].expand(-1, 1, buffer.shape[-1])
    old = torch.gather(buffer, 1, index)
    buffer.scatter_(1, index, torch.where(mask[:, None, None], values[:, None].to(buffer.dtype), old))
