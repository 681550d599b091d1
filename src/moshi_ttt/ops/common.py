"""What every fast-weight method shares: the dtype policy, float32 sums, chunks.

The fast-weight math needs float32 sums, not float32 operands: on CUDA, bf16 and
fp16 operands go to the tensor cores with float32 accumulation and output
(`out_dtype`); elsewhere the operands are upcast to the compute dtype. The meta
device, which holds no data, stands in for CUDA in memory estimates.
"""

import contextlib

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Fast-weight math runs in float32, or float64 when the inputs are float64."""
    return torch.promote_types(dtype, torch.float32)


def operand_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype matmul operands are kept in: low precision on CUDA (and meta), else the compute dtype."""
    if device.type in ("cuda", "meta") and dtype in _LOW_PRECISION:
        return dtype
    return compute_dtype(dtype)


def bmm_acc(a: torch.Tensor, b: torch.Tensor, op: torch.dtype) -> torch.Tensor:
    """a @ b for [B, n, k] x [B, k, m], operands in `op`, result in float32 (or float64)."""
    a, b = a.to(op), b.to(op)
    if op in _LOW_PRECISION:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a, b)


def baddbmm_acc_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, op: torch.dtype,
                 alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * a @ b in place, returns out; `out` is float32 (or float64), operands in `op`."""
    a, b = a.to(op), b.to(op)
    if op in _LOW_PRECISION:
        if out.is_meta:
            return out  # no data to compute; torch 2.9's meta baddbmm rejects out_dtype
        return torch.baddbmm(out, a, b, alpha=alpha, out_dtype=torch.float32, out=out)
    return out.baddbmm_(a, b, alpha=alpha)


def linear_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a linear layer computes in: autocast's where it is on, else `dtype`."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the ops choose their dtypes themselves (it would round their float32 sums)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def pad_to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, D] -> [B, n_chunks, chunk_size, D], zero-padding the last chunk."""
    B, T, D = x.shape
    n_chunks = -(-T // chunk_size)
    x = F.pad(x, (0, 0, 0, n_chunks * chunk_size - T))
    return x.view(B, n_chunks, chunk_size, D)
