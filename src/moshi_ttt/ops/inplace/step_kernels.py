"""Triton kernels for the streaming token step, five or six launches instead of ~70 small ops.

A streaming step of In-Place TTT touches little data per operation, so its cost
on a GPU is the number of kernels (moshi replays them in a CUDA graph, which
removes the launch cost but not the per-kernel latency). These kernels do the
same work as the PyTorch step in `modules.inplace.state`:

1. `_prev_scores`: scores of the token against the previous chunk's Z.
2. `_token_output`: `eta * (delta z + pending)`, the token's fast-weight term;
   rows of delta not yet folded (those from this step's fold on) take the
   previous chunk's update in dual form, `(scores * c) V_prev`.
3. `_fold_rows`: adds this step's rows of the previous chunk's update to delta
   (and its low-precision copy), and buffers z in the current chunk.
4. `_targets`: the target rows that the new embedding completes or extends
   (conv, then W_target), written into the current chunk's V.
5. `_clip_terms` (with a clip only): the Gram terms that the rows made final
   add to the current chunk's ||V^T Z||_F^2, from the rows written above.
6. `_advance`: position, ring slot, clip factor and norm, the embedding tail.

They run in this order: kernels 1-4 read only state that no earlier kernel of
the step has written (the output reads delta's rows before the fold adds to
them), kernel 5 reads the rows that 3 and 4 wrote, kernel 6 moves the state on.
Every write is masked by `exec_mask`, nothing
branches on the host, so the step can be captured in a CUDA graph. On a machine
without a GPU, the tests run these kernels through Triton's interpreter
(`TRITON_INTERPRET=1`) against the PyTorch step.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch step serves without Triton
    triton = None


# Triton 3.5's interpreter gets bf16 dot products wrong; there (as for float32 models) the
# products run in float32, which is exact for bf16 and fp16 operands.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the streaming step of a state on `device` with model `dtype` uses these kernels.

    CUDA with Triton installed, a float16/bfloat16/float32 model, and MOSHI_TTT_KERNELS=1:
    opt-in until they are measured on a GPU (so far they ran in Triton's interpreter only).
    """
    return (triton is not None and device.type == "cuda" and os.environ.get("MOSHI_TTT_KERNELS") == "1"
            and dtype in (torch.float32, torch.bfloat16, torch.float16))


if triton is not None:

    @triton.jit
    def _rows_times_vector(matrix, rows, row_ok, vector, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        """[BLOCK_R] float32: matrix[rows] @ vector over H columns (rows: offsets of row starts)."""
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(vector + h, mask=h < H, other=0.0).to(tl.float32)
            w = tl.load(matrix + rows[:, None] + h[None, :], mask=row_ok[:, None] & (h[None, :] < H), other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        return acc

    @triton.jit
    def _prev_scores(z_ring, z, slot, scores, C, H, s_ring, s_z,
                     BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rows = (1 - tl.load(slot + b)) * C + c
        acc = _rows_times_vector(z_ring + b * s_ring, rows * H, c < C, z + b * s_z, H, BLOCK_C, BLOCK_H)
        tl.store(scores + b * C + c, acc, mask=c < C)

    @triton.jit
    def _token_output(delta_read, z, scores, v_ring, slot, pos, prev_scale, out, eta, C, D, H, R,
                      s_delta, s_z, s_ring, s_out,
                      BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = _rows_times_vector(delta_read + b * s_delta, d * H, d < D, z + b * s_z, H, BLOCK_D, BLOCK_H)
        prev_start = (1 - tl.load(slot + b)) * C
        pending = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            s = tl.load(scores + b * C + c, mask=c < C, other=0.0)
            v = tl.load(v_ring + b * s_ring + (prev_start + c)[:, None] * D + d[None, :],
                        mask=(c[:, None] < C) & (d[None, :] < D), other=0.0)
            pending += tl.sum(s[:, None] * v.to(tl.float32), axis=0)
        unfolded = d >= tl.load(pos + b) * R
        result = eta * (acc + tl.where(unfolded, pending * tl.load(prev_scale + b), 0.0))
        tl.store(out + b * s_out + d, result, mask=d < D)

    @triton.jit
    def _fold_rows(delta, delta_read, v_ring, z_ring, z, slot, pos, prev_scale, run, C, D, H, R,
                   s_delta, s_v, s_ring, s_z, SEPARATE_READ: tl.constexpr, IEEE: tl.constexpr,
                   R_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        p = tl.load(pos + b)
        slot_b = tl.load(slot + b)
        runs = tl.load(run + b) != 0
        prev_start = (1 - slot_b) * C
        j = tl.arange(0, R_PAD)
        rows = p * R + j
        row_ok = (j < R) & (rows < D)
        acc = tl.zeros([R_PAD, BLOCK_H], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            vt = tl.load(v_ring + b * s_v + (prev_start + c)[None, :] * D + rows[:, None],
                         mask=row_ok[:, None] & (c[None, :] < C), other=0.0)
            zk = tl.load(z_ring + b * s_ring + (prev_start + c)[:, None] * H + h[None, :],
                         mask=(c[:, None] < C) & (h[None, :] < H), other=0.0)
            if IEEE:
                acc += tl.dot(vt.to(tl.float32), zk.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(vt, zk)
        coef = tl.where(runs, tl.load(prev_scale + b), 0.0)
        where = b * s_delta + rows[:, None] * H + h[None, :]
        mask = row_ok[:, None] & (h[None, :] < H) & runs
        folded = tl.load(delta + where, mask=mask, other=0.0) + coef * acc
        tl.store(delta + where, folded, mask=mask)
        if SEPARATE_READ:
            tl.store(delta_read + where, folded.to(delta_read.dtype.element_ty), mask=mask)
        zq = tl.load(z + b * s_z + h, mask=h < H, other=0.0)
        tl.store(z_ring + b * s_ring + (slot_b * C + p) * H + h, zq.to(z_ring.dtype.element_ty),
                 mask=(h < H) & runs)

    @triton.jit
    def _targets(x0_tail, x0, conv, proj, v_ring, slot, pos, run, B, C, D, K,
                 s_tail, s_x0, s_v, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # row m: sample m // K, position p - m % K
        m_ok = m < B * K
        b = (m // K).to(tl.int64)
        j = m % K
        d_out = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for i0 in range(0, D, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            conv_rows = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
            for k in range(0, K):
                window = K - 1 - j + k  # the embeddings p-K+1 .. p: the tail, then x0
                take = m_ok & (k <= j)
                in_tail = take & (window < K - 1)
                x = tl.load(x0_tail + b[:, None] * s_tail + window[:, None] * D + i[None, :],
                            mask=in_tail[:, None] & (i[None, :] < D), other=0.0).to(tl.float32)
                x += tl.load(x0 + b[:, None] * s_x0 + i[None, :],
                             mask=(take & (window == K - 1))[:, None] & (i[None, :] < D), other=0.0).to(tl.float32)
                w = tl.load(conv + i * K + k, mask=i < D, other=0.0).to(tl.float32)
                conv_rows += x * w[None, :]
            w_t = tl.load(proj + d_out[None, :] * D + i[:, None],
                          mask=(i[:, None] < D) & (d_out[None, :] < D), other=0.0)
            rows_in = conv_rows.to(w_t.dtype)
            if IEEE:
                acc += tl.dot(rows_in.to(tl.float32), w_t.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(rows_in, w_t)
        p = tl.load(pos + b, mask=m_ok, other=0)
        slot_b = tl.load(slot + b, mask=m_ok, other=0)
        runs = tl.load(run + b, mask=m_ok, other=0) != 0
        row_pos = p - j
        ok = m_ok & runs & (row_pos >= 0)
        v = acc.to(proj.dtype.element_ty).to(v_ring.dtype.element_ty)
        tl.store(v_ring + b[:, None] * s_v + (slot_b * C + row_pos)[:, None] * D + d_out[None, :], v,
                 mask=ok[:, None] & (d_out[None, :] < D))

    @triton.jit
    def _row_grams(matrix, rows_a, ok_a, rows_b, ok_b, F, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_F: tl.constexpr):
        """[BLOCK_A, BLOCK_B] float32: dot products of rows a and b of a matrix of F columns."""
        acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            a = tl.load(matrix + rows_a[:, None] + f[None, :], mask=ok_a[:, None] & (f[None, :] < F), other=0.0)
            b = tl.load(matrix + rows_b[:, None] + f[None, :], mask=ok_b[:, None] & (f[None, :] < F), other=0.0)
            acc += tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
        return acc

    @triton.jit
    def _clip_terms(z_ring, v_ring, slot, pos, partial, C, D, H, K, s_ring, s_v,
                    K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        """partial[b, tile, j] = the terms of candidate row q = p - j against this tile's rows r
        of the current chunk: 2 (v_q.v_r)(z_q.z_r) for r < q, (v_q.v_q)(z_q.z_q) for r = q."""
        b = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, K_PAD)
        q = tl.load(pos + b) - j
        candidate = (j < K) & (q >= 0)
        cur = tl.load(slot + b) * C
        gv = _row_grams(v_ring + b * s_v, (cur + q) * D, candidate, (cur + r) * D, r < C, D, K_PAD, BLOCK_R, BLOCK_F)
        gz = _row_grams(z_ring + b * s_ring, (cur + q) * H, candidate, (cur + r) * H, r < C, H, K_PAD, BLOCK_R,
                        BLOCK_F)
        weight = tl.where(r[None, :] < q[:, None], 2.0, tl.where(r[None, :] == q[:, None], 1.0, 0.0))
        terms = tl.sum(tl.where(candidate[:, None], weight * gv * gz, 0.0), axis=1)
        tl.store(partial + (b * tl.num_programs(1) + tile) * K_PAD + j, terms)

    @triton.jit
    def _advance(x0_tail, x0, pos, slot, prev_scale, cur_sq_norm, partial, run, eta, tau, C, D, K, n_tiles,
                 s_tail, s_x0, CLIP: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        if tl.load(run + b) != 0:
            for i in range(0, K - 1):  # tail row i <- window row i + 1
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    if i + 1 < K - 1:
                        x = tl.load(x0_tail + b * s_tail + (i + 1) * D + d, mask=d < D, other=0.0)
                    else:
                        x = tl.load(x0 + b * s_x0 + d, mask=d < D, other=0.0)
                    tl.store(x0_tail + b * s_tail + i * D + d, x.to(x0_tail.dtype.element_ty), mask=d < D)
            p = tl.load(pos + b)
            tl.store(pos + b, (p + 1) % C)
            scale = 1.0
            if CLIP:
                j = tl.arange(0, K_PAD)
                terms = tl.zeros([K_PAD], dtype=tl.float32)
                for tile in range(0, n_tiles):
                    terms += tl.load(partial + (b * n_tiles + tile) * K_PAD + j)
                sq_norm = tl.load(cur_sq_norm + b)
                # Row p-K+1 is final now; at the chunk's end, every row is.
                tl.store(cur_sq_norm + b, tl.where(p == C - 1, 0.0, sq_norm + tl.sum(tl.where(j == K - 1, terms, 0.0))))
                total = sq_norm + tl.sum(terms)
                scale = tau / tl.sqrt(tl.maximum(total * eta * eta, tau * tau))
            if p == C - 1:
                tl.store(slot + b, 1 - tl.load(slot + b))
                tl.store(prev_scale + b, scale)


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(n)))


def token_step(state, z: torch.Tensor, x0: torch.Tensor, conv: torch.Tensor, proj: torch.Tensor,
               eta: float, clip_tau: float | None) -> torch.Tensor:
    """The streaming step of `FastWeightState` with these kernels; returns [B, d] float32.

    z: [B, h], x0: [B, d]; conv: [d, K] and proj: [d, d], the target generator's weights.
    """
    if state.past:
        raise ValueError("the step kernels read forward targets only: a conv with kernel_past > 0 steps in PyTorch")
    B, D, H = state.delta.shape
    C, R = state.chunk_size, state.rows_per_step
    K = conv.shape[1]
    z_ring, v_ring, x0_tail = state.z_ring, state.v_ring, state.x0_tail
    run = state.exec_mask
    ieee = z_ring.dtype == torch.float32 or _INTERPRETED
    assert z.stride(-1) == 1 and x0.stride(-1) == 1 and conv.is_contiguous() and proj.is_contiguous()
    if not x0_tail.numel():
        x0_tail = x0  # K = 1: no tail, never read; any valid pointer
    scores = torch.empty(B, C, dtype=torch.float32, device=z.device)
    out = torch.empty(B, D, dtype=torch.float32, device=z.device)
    block_h, block_d = _pow2(H, 16, 256), 32
    _prev_scores[(B, triton.cdiv(C, 4))](  # 4 rows a program: enough programs at batch 1
        z_ring, z, state.slot, scores, C, H, z_ring.stride(0), z.stride(0), BLOCK_C=4, BLOCK_H=block_h)
    _token_output[(B, triton.cdiv(D, block_d))](
        state.delta_read, z, scores, v_ring, state.slot, state.pos, state.prev_scale, out, eta, C, D, H, R,
        state.delta_read.stride(0), z.stride(0), v_ring.stride(0), out.stride(0),
        BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_C=16)
    fold_h = _pow2(H, 16, 64)
    _fold_rows[(B, triton.cdiv(H, fold_h))](
        state.delta, state.delta_read, v_ring, z_ring, z, state.slot, state.pos, state.prev_scale, run,
        C, D, H, R, state.delta.stride(0), v_ring.stride(0), z_ring.stride(0), z.stride(0),
        SEPARATE_READ=state.delta_read is not state.delta, IEEE=ieee,
        R_PAD=_pow2(R, 16, 1 << 20), BLOCK_C=16, BLOCK_H=fold_h)
    block_m, target_d, block_i = 16, _pow2(D, 16, 32), _pow2(D, 16, 64)
    _targets[(triton.cdiv(B * K, block_m), triton.cdiv(D, target_d))](
        x0_tail, x0, conv, proj, v_ring, state.slot, state.pos, run, B, C, D, K,
        x0_tail.stride(0), x0.stride(0), v_ring.stride(0), IEEE=ieee,
        BLOCK_M=block_m, BLOCK_D=target_d, BLOCK_I=block_i)
    k_pad, block_r = _pow2(K, 2, 1 << 20), 16
    n_tiles = triton.cdiv(C, block_r)
    partial = scores  # any float32 buffer: not read without a clip
    if clip_tau is not None:
        partial = torch.empty(B, n_tiles, k_pad, dtype=torch.float32, device=z.device)
        _clip_terms[(B, n_tiles)](z_ring, v_ring, state.slot, state.pos, partial, C, D, H, K,
                                  z_ring.stride(0), v_ring.stride(0), K_PAD=k_pad, BLOCK_R=block_r, BLOCK_F=32)
    _advance[(B,)](x0_tail, x0, state.pos, state.slot, state.prev_scale, state.cur_sq_norm, partial, run,
                   eta, 1.0 if clip_tau is None else clip_tau, C, D, K, n_tiles, x0_tail.stride(0), x0.stride(0),
                   CLIP=clip_tau is not None, K_PAD=k_pad, BLOCK_D=_pow2(D, 16, 1024))
    return out
