"""In-Place TTT over a whole sequence: a scan over blocks, the dual form inside each.

With blocks of L = k*C positions, block b reads the fast-weight state S_b (the
sum of the updates of every earlier block) and, in dual form, the earlier chunks
of its own block; then its updates join the state:

    Y_b = Z_b S_b^T + dual(Z_b, V_b),   S_{b+1} = S_b + V_b^T Z_b

One block covering the sequence is the pure dual form (cost ~ T^2 (h + d));
blocks of one chunk are the pure chunk scan (cost ~ T d h, but a d x h float32
state read and written every chunk). Blocks of a few chunks keep the linear
cost and cut the state traffic. Only Z and V are saved for the backward, which
rebuilds the last state with one matmul, then walks the blocks in reverse,
taking each block's update back out of the state while it accumulates the
state's gradient G. Memory: two d x h float32 matrices at most.
"""

import torch

from .chunking import compute_dtype
from .dual import dual_backward_, dual_forward_
from .matmul import baddbmm_acc_, bmm_acc, operand_dtype


class _BlockScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, v: torch.Tensor, chunk_size: int, block_size: int) -> torch.Tensor:
        op = operand_dtype(z.dtype, z.device)
        zo, vo = z.to(op), v.to(op)
        B, T, hidden = z.shape
        dim = v.shape[-1]
        y = torch.zeros(B, T, dim, dtype=compute_dtype(op), device=v.device)
        state = None
        for start in range(0, T, block_size):
            end = min(start + block_size, T)
            zb, vb = zo[:, start:end], vo[:, start:end]
            if state is not None:
                baddbmm_acc_(y[:, start:end], zb, state.to(op).transpose(1, 2), op)
            dual_forward_(y[:, start:end], zb, vb, chunk_size, op)
            if end < T:
                if state is None:
                    state = torch.zeros(B, dim, hidden, dtype=y.dtype, device=y.device)
                baddbmm_acc_(state, vb.transpose(1, 2), zb, op)
        ctx.save_for_backward(zo, vo)
        ctx.sizes, ctx.op, ctx.dtypes = (chunk_size, block_size), op, (z.dtype, v.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        zo, vo = ctx.saved_tensors
        (chunk_size, block_size), op = ctx.sizes, ctx.op
        T = zo.shape[1]
        starts = list(range(0, T, block_size))
        z_dtype, v_dtype = ctx.dtypes
        dz = torch.empty(zo.shape, dtype=z_dtype, device=dy.device)
        dv = torch.empty(vo.shape, dtype=v_dtype, device=dy.device)
        state = grad_state = None
        if len(starts) > 1:
            last = starts[-1]
            state = bmm_acc(vo[:, :last].transpose(1, 2), zo[:, :last], op)  # read by the last block
            grad_state = torch.zeros_like(state)  # d loss / d S_{b+1}: sum over later blocks
        for start in reversed(starts):
            end = min(start + block_size, T)
            block = slice(start, end)
            zb, vb, dyb = zo[:, block], vo[:, block], dy[:, block].to(op)
            # Only this iteration writes the block's gradients: sum them in float32 here.
            if end < T:
                grad_op = grad_state.to(op)
                dv_block = bmm_acc(zb, grad_op.transpose(1, 2), op)
                dz_block = bmm_acc(vb, grad_op, op)
            else:
                dv_block = torch.zeros(vb.shape, dtype=dy.dtype, device=dy.device)
                dz_block = torch.zeros(zb.shape, dtype=dy.dtype, device=dy.device)
            dual_backward_(dz_block, dv_block, zb, vb, dyb, chunk_size, op)
            if start > 0:
                baddbmm_acc_(dz_block, dyb, state.to(op), op)
                baddbmm_acc_(grad_state, dyb.transpose(1, 2), zb, op)
                previous = slice(start - block_size, start)
                baddbmm_acc_(state, vo[:, previous].transpose(1, 2), zo[:, previous], op, alpha=-1.0)
            dz[:, block] = dz_block
            dv[:, block] = dv_block
        return dz, dv, None, None


def block_scan(z: torch.Tensor, v: torch.Tensor, chunk_size: int, block_size: int) -> torch.Tensor:
    """The strictly-earlier-chunks term `Z_i (sum_{j<i} V_j^T Z_j)^T` for every chunk i.

    z: [B, T, h], v: [B, T, d] -> [B, T, d] float32 (float64 for float64 inputs).
    `block_size` is a multiple of `chunk_size`; >= T gives the pure dual form.
    """
    if block_size % chunk_size:
        raise ValueError(f"block_size={block_size} must be a multiple of chunk_size={chunk_size}")
    return _BlockScan.apply(z, v, chunk_size, block_size)
