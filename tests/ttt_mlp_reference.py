"""A slow, obviously correct TTT-MLP: token by token, gradients by autograd, float64.

Written from the update rule of Sun et al. 2024 alone, sharing no code with the package:
in each mini-batch of b tokens, token t reads `W - s_t * sum_{u <= t} lr_u grad l(W; u)`
with every gradient taken at the mini-batch's start W; the next mini-batch starts from
the last token's weights.
"""

import torch
import torch.nn.functional as F


def reference_ttt_mlp(q, k, v, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2):
    """Outputs [B, H, T, f]: q, k, v [B, H, T, f]; lr [B, H, T]; token_scale [b]; ln_* [H, f];
    w1 [H, f, 4f], b1 [H, 4f], w2 [H, 4f, f], b2 [H, f] (the initial weights)."""
    q, k, v, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2 = (
        t.detach().double() for t in (q, k, v, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2))
    B, H, T, f = q.shape
    b = token_scale.shape[0]
    out = torch.zeros(B, H, T, f, dtype=torch.float64)

    def model(weights, x, head):
        h1 = F.gelu(x @ weights[0] + weights[1], approximate="tanh")
        y = h1 @ weights[2] + weights[3]
        return F.layer_norm(y, (f,), ln_weight[head], ln_bias[head], eps=1e-6)

    for s in range(B):
        for head in range(H):
            start_weights = [w1[head], b1[head], w2[head], b2[head]]
            for begin in range(0, T, b):
                grads = []
                for t in range(begin, min(begin + b, T)):
                    weights = [w.clone().requires_grad_(True) for w in start_weights]
                    loss = 0.5 * (model(weights, k[s, head, t], head) - (v[s, head, t] - k[s, head, t])).pow(2).sum()
                    grads.append(torch.autograd.grad(loss, weights))
                    position = t - begin
                    summed = [sum(lr[s, head, begin + u] * g[i] for u, g in enumerate(grads)) for i in range(4)]
                    current = [w - token_scale[position] * g for w, g in zip(start_weights, summed)]
                    out[s, head, t] = q[s, head, t] + model(current, q[s, head, t], head)
                if len(grads) == b:
                    start_weights = current
    return out
