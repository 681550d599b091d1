"""In-Place TTT over a whole sequence: a scan over blocks, the dual form inside each.

With blocks of L = k*C positions, block b reads the fast-weight state S_b (the
sum of the updates of every earlier block) and, in dual form, the earlier chunks
of its own block; then its updates join the state:

    Y_b = Z_b S_b^T + dual(Z_b, c V_b),   S_{b+1} = S_b + (c V_b)^T Z_b

(c: each chunk's clip factor, 1 without a clip). With a forgetting factor lambda < 1
the state decays by lambda every chunk (`S_{i+1} = lambda S_i + c_i V_i^T Z_i`): chunk
i reads chunk j's update with weight lambda^(i-1-j) = read(i) * write(j), factors
relative to the block's first chunk (`_Forget`), so the dual form keeps its shape.
One block covering the sequence
is the pure dual form (cost ~ T^2 (h + d)); blocks of one chunk are the pure chunk
scan (cost ~ T d h, but a d x h float32 state read and written every chunk).
Blocks of a few chunks keep the linear cost and cut the state traffic.

Memory is what this module is built around. The term is added to the slow
output chunk by chunk, each chunk's sum in float32 and rounded once; the clip
scales score columns and chunk rows, so no clipped copy of V exists. Z and V
are saved, and the scores of blocks up to `kept_scores` positions. The
backward writes every gradient row from float32 sums of one chunk, so no
float32 buffer the size of Z or V exists; and it holds one d x h state at a
time: a first pass in block order replays S_b and writes the term `dY_b S_b`
of dZ, a second pass in reverse order accumulates the state's gradient G (what
later blocks read) and adds the rest. G's final sum is the slow weight's
gradient, which so costs no product of its own.
"""

import math

import torch
import torch.nn.functional as F

from ..common import baddbmm_acc_, bmm_acc, compute_dtype, linear_dtype, operand_dtype, without_autocast
from .chunking import chunk_decay, chunk_delta_sq_norms, chunk_grams, clip_scales, expand_chunk_values
from .dual import KEPT_SCORES, block_score_grads, block_scores, dual_backward_chunk, dual_forward_chunk


def _blocks(length: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, length)) for start in range(0, length, block_size)]


def _chunks(start: int, end: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(q, min(q + chunk_size, end)) for q in range(start, end, chunk_size)]


class _Clip:
    """Each chunk's clip factor c = tau / max(eta ||V^T Z||_F, tau), from C x C Gram matrices."""

    def __init__(self, z: torch.Tensor, v: torch.Tensor, eta: float, tau: float, chunk_size: int,
                 op: torch.dtype):
        self.chunk_size, self.op = chunk_size, op
        self.sq_norms = chunk_delta_sq_norms(z, v, chunk_size)  # [B, n_chunks]
        self.clipped = self.sq_norms * (eta * eta) > tau * tau
        self.scales = clip_scales(self.sq_norms, eta, tau)

    def positions(self, start: int, end: int) -> torch.Tensor:
        """[B, end - start]: the factor of each position in [start, end), start a chunk start."""
        C = self.chunk_size
        return expand_chunk_values(self.scales[:, start // C:-(-end // C)], C, end - start)[..., 0]

    def chunk(self, q: int) -> torch.Tensor:
        """[B, 1, 1]: the factor of the chunk starting at q."""
        return self.scales[:, q // self.chunk_size, None, None]

    def add_grad_(self, dz_q, dv_q, z, v, q, end, grad_scale) -> None:
        """dZ_q, dV_q += the gradient through this chunk's factor, given dLoss/dc ([B])."""
        i = q // self.chunk_size
        # dc / d||.||^2 = -c / (2 ||.||^2) where clipped, 0 where not; d||.||^2/dZ = 2 Gv Z, /dV = 2 Gz V.
        coef = torch.where(self.clipped[:, i], -grad_scale * self.scales[:, i] / self.sq_norms[:, i], 0.0)
        gram_z, gram_v = chunk_grams(z, v, q, end, self.op)
        baddbmm_acc_(dz_q, gram_v * coef[:, None, None], z[:, q:end], self.op)
        baddbmm_acc_(dv_q, gram_z * coef[:, None, None], v[:, q:end], self.op)


class _Forget:
    """The forgetting factor's weights inside a block, chunks counted from the block's first.

    Chunk i reads the update of chunk j < i (same block) with weight lambda^(i-1-j)
    = read(i) write(j), read(i) = lambda^i and write(j) = lambda^(-j-1); it reads the
    state S_0 the block starts from with read(i). The state after a block of n chunks is
    lambda^n (S_0 + sum_j write(j) U_j). write() grows to lambda^-n: `max_block` keeps it
    within float32's range.
    """

    def __init__(self, forget: float, chunk_size: int):
        self.forget, self.chunk_size = forget, chunk_size

    def read(self, start: int, end: int, like: torch.Tensor) -> torch.Tensor:
        """[1, end - start]: read() of each position of the block [start, end), in like's compute dtype."""
        return chunk_decay(self.forget, self.chunk_size, end - start).to(like.device, compute_dtype(like.dtype))[None]

    def write(self, start: int, end: int, like: torch.Tensor) -> torch.Tensor:
        """[1, end - start]: write() of each position of the block [start, end), in like's compute dtype."""
        decay = chunk_decay(self.forget, self.chunk_size, end - start)
        return (1 / (self.forget * decay)).to(like.device, compute_dtype(like.dtype))[None]

    def read_chunk(self, q: int, start: int) -> float:
        """read() of the chunk at position q of a block starting at `start`."""
        return self.forget ** ((q - start) // self.chunk_size)

    def span(self, start: int, end: int) -> float:
        """lambda^n for the n chunks of [start, end)."""
        return self.forget ** (-(-(end - start) // self.chunk_size))


def max_block(forget: float, chunk_size: int, dtype: torch.dtype = torch.float32) -> int | None:
    """The longest block (positions) whose write() factors stay below 2^64 (2^8 for float16
    targets, which the factors scale); None without forgetting."""
    if forget == 1.0:
        return None
    bits = 8 if dtype == torch.float16 else 64
    return chunk_size * max(1, int(bits * math.log(2) / -math.log(forget)))


def _key_scales(clip: _Clip | None, forget: _Forget | None, start: int, end: int,
                like: torch.Tensor) -> torch.Tensor | None:
    """[B or 1, end - start]: the factors of the targets of the block [start, end) as keys of the
    dual form and as updates of the state (the clip's times write()), None when there are none."""
    scales = None if clip is None else clip.positions(start, end)
    if forget is not None:
        write = forget.write(start, end, like)
        scales = write if scales is None else scales * write
    return scales


def _read(forget: _Forget | None, q: int, start: int) -> float:
    return 1.0 if forget is None else forget.read_chunk(q, start)


def _advance_state(state, z, v, scales, forget, start, end, op) -> torch.Tensor:
    """The state after the block [start, end): lambda^n (state + sum_j write(j) c_j V_j^T Z_j)."""
    state = _add_update(state, z[:, start:end], _scaled(v, scales, start, end), op)
    if forget is not None:
        state.mul_(forget.span(start, end))
    return state


def _scaled(v: torch.Tensor, scales: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of v times `scales` (those rows' factors), in v's dtype."""
    if scales is None:
        return v[:, start:end]
    return (v[:, start:end] * scales[..., None]).to(v.dtype)


def _scan_forward_(z, v, out, chunk_size, eta, clip, forget, block_size, op, kept_scores
                   ) -> list[torch.Tensor | None]:
    """out += eta * (the fast-weight term), chunk by chunk, without autograd; returns the
    blocks' scores for the backward (those of blocks up to `kept_scores` positions)."""
    B, T, _ = z.shape
    state = None  # float32 [B, d, h]: the updates of the blocks before this one
    saved = []
    for start, end in _blocks(T, block_size):
        state_t = None  # the last block's copy goes before this one's is made
        if state is not None:
            state_t = state.to(op).transpose(1, 2)
        scores = block_scores(B, end - start, chunk_size, z.device, op, kept_scores)
        saved.append(scores)
        key_scales = _key_scales(clip, forget, start, end, out)
        for q, q_end in _chunks(start, end, chunk_size):
            if state_t is None and q == start:
                continue  # the first chunk reads nothing
            acc = None if state_t is None else bmm_acc(z[:, q:q_end], state_t, op)
            acc = dual_forward_chunk(acc, z[:, q:q_end], z[:, start:q], v[:, start:q], op,
                                     None if key_scales is None else key_scales[:, :q - start],
                                     None if scores is None else scores[:, q - start:q_end - start, :q - start])
            out[:, q:q_end].add_(acc, alpha=eta * _read(forget, q, start))
        if end < T:
            state = _advance_state(state, z, v, key_scales, forget, start, end, op)
    return saved


def _scan_backward(dout, z, v, saved_scores, chunk_size, eta, clip, forget, block_size, op, weight=None,
                   weight_grad=False):
    """dZ and dV of `out += eta * fast term`, and the float32 sums of the slow weight's gradient.

    With the slow weight W given, dZ includes `dout W`. With `weight_grad`, more than
    one block and no forgetting, the third result is `dout_b^T Z_b` summed over the
    blocks, [B, d, h] (the state's gradient is the partial sums of the same products),
    else None.
    """
    T = z.shape[1]
    blocks = _blocks(T, block_size)
    dz = torch.empty_like(z)
    dv = torch.empty_like(v)

    # Pass 1, block order: dZ_b = eta read dY_b S_b, with S_b replayed as in the forward.
    state = state_op = None
    for start, end in blocks:
        if state is not None:
            state_op = None  # as above: one copy at a time
            state_op = state.to(op)
            for q, q_end in _chunks(start, end, chunk_size):
                dz[:, q:q_end] = bmm_acc(dout[:, q:q_end].to(op) * (eta * _read(forget, q, start)), state_op, op)
        if end < T:
            state = _advance_state(state, z, v, _key_scales(clip, forget, start, end, dout), forget, start, end, op)
    del state, state_op

    # Pass 2, reverse order: the dual form inside each block, and P (d x h, float32),
    # the state's gradient: the sum over later blocks of read dout^T Z (each decayed
    # by the blocks between). eta P is the gradient of this block's update. Without
    # forgetting, summed over every block and the batch, P is also dLoss/dW.
    share_weight_grad = weight_grad and forget is None
    grad_sum = None
    weight_op = None if weight is None else weight.to(op).expand(z.shape[0], -1, -1)
    for (start, end), scores in zip(reversed(blocks), reversed(saved_scores)):
        if forget is None:
            dy = dout[:, start:end].to(op) * eta
        else:  # dY read(i) for the rows of the block, in the operand dtype
            read = forget.read(start, end, dout)[..., None]
            dy = (dout[:, start:end] * (eta * read)).to(op)
        grad_op = None  # the last block's copy goes before this one's is made
        if grad_sum is not None:
            if forget is not None:
                grad_sum.mul_(forget.span(start, end))
            grad_op = grad_sum.to(op)
        zb, vb = z[:, start:end], v[:, start:end]
        scales = _key_scales(clip, forget, start, end, dout)
        score_grads = None if scores is None else block_score_grads(vb, dy, chunk_size, op, scales)
        for q, q_end in _chunks(start, end, chunk_size):
            dz_q, dv_q = dual_backward_chunk(zb, vb, dy, q - start, q_end - start, op, scales, scores, score_grads)
            if grad_op is not None:
                q_scales = None if scales is None else scales[:, q - start:q_end - start]
                baddbmm_acc_(dz_q, _scaled(v, q_scales, q, q_end), grad_op, op, alpha=eta)
                baddbmm_acc_(dv_q, z[:, q:q_end], grad_op.transpose(1, 2), op, alpha=eta)
            if weight_op is not None:
                baddbmm_acc_(dz_q, dout[:, q:q_end], weight_op, op)
            if start > 0:
                dz_q.add_(dz[:, q:q_end])  # the state term of pass 1
            if forget is not None:  # dv_q so far is the gradient of the rows c write V_q
                dv_q.mul_(1 / (forget.forget * forget.read_chunk(q, start)))
            if clip is not None:  # dv_q so far is the gradient of the clipped rows c V_q
                grad_scale = (dv_q * v[:, q:q_end]).sum((1, 2))
                dv_q.mul_(clip.chunk(q))
                clip.add_grad_(dz_q, dv_q, z, v, q, q_end, grad_scale)
            dz[:, q:q_end] = dz_q
            dv[:, q:q_end] = dv_q
        if start > 0 or (share_weight_grad and grad_sum is not None):
            grad_sum = _add_update(grad_sum, zb, dout[:, start:end] if forget is None else dout[:, start:end] * read,
                                   op)
    return dz, dv, grad_sum if share_weight_grad else None


def _weight_grad(sums: torch.Tensor | None, dout: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dLoss/dW of `Z W^T`: the backward's per-sample sums added over the batch (in place),
    or the product itself where there were none."""
    if sums is None:
        return dout.flatten(0, -2).transpose(0, 1) @ z.flatten(0, -2)
    for b in range(1, sums.shape[0]):
        sums[0].add_(sums[b])
    return sums[0].to(dtype)


def _add_update(state: torch.Tensor | None, z: torch.Tensor, v: torch.Tensor, op: torch.dtype) -> torch.Tensor:
    """state + V^T Z (a new float32 [B, d, h] state when there is none yet)."""
    if state is None:
        return bmm_acc(v.transpose(1, 2), z, op)
    return baddbmm_acc_(state, v.transpose(1, 2), z, op)


def _setup(ctx, z, v, chunk_size, eta, clip_tau, forget, block_size):
    op = operand_dtype(z.dtype, z.device)
    clip = None if clip_tau is None else _Clip(z, v, eta, clip_tau, chunk_size, op)
    ctx.args = (chunk_size, eta, clip, None if forget == 1.0 else _Forget(forget, chunk_size), block_size, op)
    return ctx.args


class _ScanAdd(torch.autograd.Function):
    """out += eta * fast term, in place on out (any slow output, e.g. a LoRA layer's)."""

    @staticmethod
    def forward(ctx, z, v, out, chunk_size, eta, clip_tau, forget, block_size, kept_scores):
        kept_scores = kept_scores if any(ctx.needs_input_grad[:2]) else 0
        with without_autocast(z.device):
            scores = _scan_forward_(z, v, out, *_setup(ctx, z, v, chunk_size, eta, clip_tau, forget, block_size),
                                    kept_scores)
        ctx.mark_dirty(out)
        ctx.save_for_backward(z, v, *scores)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        z, v, *scores = ctx.saved_tensors
        dz, dv, _ = _scan_backward(dout, z, v, scores, *ctx.args)
        return dz, dv, dout, None, None, None, None, None, None


class _ScanDown(torch.autograd.Function):
    """Z W^T + eta * fast term: the whole down-projection, so that dZ is one tensor."""

    @staticmethod
    def forward(ctx, z, v, weight, chunk_size, eta, clip_tau, forget, block_size, kept_scores):
        kept_scores = kept_scores if any(ctx.needs_input_grad[:2]) else 0
        dtype = linear_dtype(z.device, weight.dtype)
        with without_autocast(z.device):
            out = F.linear(z.to(dtype), weight.to(dtype))
            scores = _scan_forward_(z, v, out, *_setup(ctx, z, v, chunk_size, eta, clip_tau, forget, block_size),
                                    kept_scores)
        ctx.save_for_backward(z, v, weight, *scores)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        z, v, weight, *scores = ctx.saved_tensors
        dz, dv, sums = _scan_backward(dout, z, v, scores, *ctx.args, weight=weight,
                                      weight_grad=ctx.needs_input_grad[2])
        grad_weight = _weight_grad(sums, dout, z, weight.dtype) if ctx.needs_input_grad[2] else None
        return dz, dv, grad_weight, None, None, None, None, None, None


def _checked_block(block_size: int, chunk_size: int, forget: float, dtype: torch.dtype) -> int:
    """block_size, checked, and capped where forgetting needs shorter blocks (`max_block`)."""
    if block_size % chunk_size:
        raise ValueError(f"block_size={block_size} must be a multiple of chunk_size={chunk_size}")
    check_forget(forget)
    limit = max_block(forget, chunk_size, dtype)
    return block_size if limit is None else min(block_size, limit)


MIN_FORGET = 1e-6  # below it, one chunk's write() factor (1 / lambda) leaves float16's and bf16's comfort


def check_forget(forget: float, name: str = "forget") -> None:
    """A clear error unless `forget` is a number in [MIN_FORGET, 1]."""
    number = isinstance(forget, (int, float)) and not isinstance(forget, bool)
    if not (number and MIN_FORGET <= forget <= 1):
        raise ValueError(f"{name}={forget!r}: expected a number in (0, 1] (1: never forget), at least {MIN_FORGET}")


def scan_add_(z: torch.Tensor, v: torch.Tensor, out: torch.Tensor, chunk_size: int, eta: float,
              clip_tau: float | None = None, forget: float = 1.0, *, block_size: int,
              kept_scores: int = KEPT_SCORES) -> torch.Tensor:
    """out += eta * Z_i (sum_{j<i} forget^(i-1-j) c_j V_j^T Z_j)^T for every chunk i, in place; returns out.

    z: [B, T, h]; v: [B, T, d]; out: [B, T, d] (the slow output, any float dtype).
    c_j = tau / max(eta ||V_j^T Z_j||_F, tau) with tau = clip_tau (1 without a clip).
    `block_size` is a multiple of `chunk_size`; >= T gives the pure dual form. The
    backward reuses the scores of blocks up to `kept_scores` positions, and recomputes
    those of longer ones. Differentiable in z, v and out.
    """
    block_size = _checked_block(block_size, chunk_size, forget, v.dtype)
    return _ScanAdd.apply(z, v, out, chunk_size, float(eta), clip_tau, float(forget), block_size, kept_scores)


def scan_down(z: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, chunk_size: int, eta: float,
              clip_tau: float | None = None, forget: float = 1.0, *, block_size: int,
              kept_scores: int = KEPT_SCORES) -> torch.Tensor:
    """Z W^T plus the fast-weight term of `scan_add_`: the layer's output.

    Like `scan_add_(z, v, F.linear(z, weight), ...)`, but dZ of both terms is
    summed in one buffer. z: [B, T, h]; v: [B, T, d]; weight: [d, h].
    """
    block_size = _checked_block(block_size, chunk_size, forget, v.dtype)
    return _ScanDown.apply(z, v, weight, chunk_size, float(eta), clip_tau, float(forget), block_size, kept_scores)
