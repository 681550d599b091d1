"""LM-aligned targets of In-Place TTT: `V = Conv1D_K(X0) W_target^T`.

X0 are token embeddings. The convolution is depthwise and by default looks
forward: the target at position t mixes the embeddings of tokens t .. t+K-1, so
with K=2 the fast weights are pushed towards the next token. With `past` = P it
reads t-P .. t+K-1-P instead (the official code: K=5, P=2). It is zero-padded at
both ends of every chunk, so a chunk's update reads no token of another chunk.
"""

import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.inplace.target_conv import SPAN, future_conv_targets

TargetInit = tp.Literal["warm", "next_token", "normal", "official"]
TARGET_INITS: tuple[str, ...] = tp.get_args(TargetInit)


class LMAlignedTargets(nn.Module):
    """The target generator: a depthwise conv `conv` ([d, K]) then `proj` (d x d).

    Init modes:
      - "warm": conv = 0, proj = identity. V = 0, so the layer starts exactly as
        the plain MLP, and the conv still gets a gradient through proj.
      - "next_token": the paper's next-token target, proj = identity and the conv
        copies the next token's embedding (tap P+1); needs kernel_size - P >= 2.
      - "normal": conv taps and proj entries drawn from N(0, init_std^2).
      - "official": as the official In-Place TTT code: conv = 0, proj zero but for a
        diagonal drawn from N(0, init_std^2). V = 0 at first, like "warm".
    """

    def __init__(self, dim: int, kernel_size: int, init: TargetInit = "warm",
                 init_std: float = 0.02, past: int = 0, device=None, dtype=None):
        super().__init__()
        if not (isinstance(past, int) and 0 <= past < kernel_size):
            raise ValueError(f"kernel_past={past!r}: expected an integer in [0, kernel_size={kernel_size})")
        self.past = past
        self.conv = nn.Parameter(torch.empty(dim, kernel_size, device=device, dtype=dtype))
        self.proj = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.reset_parameters(init, init_std)

    @property
    def kernel_size(self) -> int:
        return self.conv.shape[1]

    @torch.no_grad()
    def reset_parameters(self, init: TargetInit, init_std: float = 0.02) -> None:
        if init not in TARGET_INITS:
            raise ValueError(f"init={init!r}: expected one of {TARGET_INITS}")
        if init == "normal":
            nn.init.normal_(self.conv, std=init_std)
            nn.init.normal_(self.proj.weight, std=init_std)
            return
        self.conv.zero_()
        if init == "official":
            self.proj.weight.zero_()
            self.proj.weight.diagonal().normal_(std=init_std)
            return
        nn.init.eye_(self.proj.weight)
        if init == "next_token":
            if self.kernel_size - self.past < 2:
                raise ValueError(
                    f"init='next_token' needs a tap on the next token: kernel_size - kernel_past >= 2, "
                    f"got kernel_size={self.kernel_size}, kernel_past={self.past}")
            self.conv[:, self.past + 1] = 1.0

    def project(self, conv_out: torch.Tensor) -> torch.Tensor:
        """Apply W_target in the module's dtype (like any other linear of the model)."""
        return F.linear(conv_out.to(self.proj.weight.dtype), self.proj.weight)

    def forward(self, x0: torch.Tensor, chunk_size: int, span: int = SPAN) -> torch.Tensor:
        """x0: [B, T, d] -> V: [B, T, d], chunk by chunk (the conv summed `span` positions at a time)."""
        return future_conv_targets(x0, self.conv, self.proj.weight, chunk_size, self.past, span)
