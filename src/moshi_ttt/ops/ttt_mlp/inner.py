"""The inner model of TTT-MLP and the gradient of its reconstruction loss, in closed form.

Per head, the fast weights W = (W1, b1, W2, b2) define `f(x) = gelu(x W1 + b1) W2 + b2`
(f -> 4f -> f, GELU with the tanh approximation, as ttt-lm-pytorch). The inner loss of a
token is `l(W; k, v) = 1/2 ||LN(f(k)) - (v - k)||^2`, LN a per-head LayerNorm with learned
scale and shift. Its gradient is written out (not taken with autograd) so the outer
training can differentiate through it; tests compare it with autograd's.
"""

import typing as tp

import torch
import torch.nn.functional as F

LN_EPS = 1e-6
_SQRT_2_OVER_PI = 0.7978845608028654


class InnerWeights(tp.NamedTuple):
    """Fast weights of every head: w1 [.., H, f, 4f], b1 [.., H, 4f], w2 [.., H, 4f, f], b2 [.., H, f]."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def __add__(self, other: "InnerWeights") -> "InnerWeights":  # type: ignore[override]
        return InnerWeights(*(a + b for a, b in zip(self, other)))

    def __sub__(self, other: "InnerWeights") -> "InnerWeights":
        return InnerWeights(*(a - b for a, b in zip(self, other)))

    def scaled(self, factor: torch.Tensor) -> "InnerWeights":
        """Every tensor times `factor`, [B]: one factor per sample."""
        return InnerWeights(*(t * factor.view(-1, *([1] * (t.dim() - 1))) for t in self))

    def where(self, mask: torch.Tensor, other: "InnerWeights") -> "InnerWeights":
        """self where the per-sample `mask` [B] holds, else `other`."""
        return InnerWeights(*(torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b) for a, b in zip(self, other)))

    def zeros_like(self) -> "InnerWeights":
        return InnerWeights(*(torch.zeros_like(t) for t in self))


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    """d gelu(x) / dx for the tanh approximation."""
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)


def head_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis with one (weight, bias) per head: x [B, H, ..., f], weight [H, f]."""
    shape = (weight.shape[0],) + (1,) * (x.dim() - 3) + (weight.shape[1],)
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + LN_EPS) * weight.view(shape) + bias.view(shape)


def layer_norm_l2_grad(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    """d/dz of 1/2 ||LN(z) - target||^2, row by row: z, target [B, H, n, f]; weight, bias [H, f]."""
    shape = (weight.shape[0],) + (1,) * (z.dim() - 3) + (weight.shape[1],)
    f = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    std = torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + LN_EPS)
    z_hat = (z - mu) / std
    g_hat = (z_hat * weight.view(shape) + bias.view(shape) - target) * weight.view(shape)
    return (f * g_hat - g_hat.sum(-1, keepdim=True) - z_hat * (g_hat * z_hat).sum(-1, keepdim=True)) / (f * std)


def reconstruction_grads(w: InnerWeights, k: torch.Tensor, v: torch.Tensor, ln_weight: torch.Tensor,
                         ln_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X2, dl/dZ1, dl/dZ2) of every token's inner loss at the weights w.

    k, v: [B, H, n, f]; w's tensors [B, H, ...]. The gradients of the weights follow:
    dl/dW1 = k^T dZ1, dl/db1 = dZ1, dl/dW2 = X2^T dZ2, dl/db2 = dZ2.
    """
    z1 = k @ w.w1 + w.b1[..., None, :]
    x2 = gelu(z1)
    z2 = x2 @ w.w2 + w.b2[..., None, :]
    g_z2 = layer_norm_l2_grad(z2, v - k, ln_weight, ln_bias)
    g_z1 = (g_z2 @ w.w2.transpose(-1, -2)) * gelu_derivative(z1)
    return x2, g_z1, g_z2


def inner_loss(w: InnerWeights, k: torch.Tensor, v: torch.Tensor, ln_weight: torch.Tensor,
               ln_bias: torch.Tensor) -> torch.Tensor:
    """[B, H, n]: every token's inner loss 1/2 ||LN(f(k)) - (v - k)||^2 at the weights w."""
    z2 = gelu(k @ w.w1 + w.b1[..., None, :]) @ w.w2 + w.b2[..., None, :]
    return 0.5 * (head_layer_norm(z2, ln_weight, ln_bias) - (v - k)).pow(2).sum(-1)
