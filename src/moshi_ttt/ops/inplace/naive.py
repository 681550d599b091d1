"""A slow, obviously correct In-Place TTT: explicit loops over chunks and taps, float64.

Written from the layer's equations alone, sharing no code with the other ops, which the
tests hold to it.
"""

import torch


def naive_targets(x0, conv, proj, chunk_size, past=0):
    """V = Conv1D_K(X0) W_target^T, [B, T, d] float64: tap k of conv ([d, K]) reads t+k-past
    where that is inside t's chunk; proj: [d, d]."""
    x0, conv, proj = (t.detach().double() for t in (x0, conv, proj))
    B, T, d = x0.shape
    targets = torch.zeros(B, T, d, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            start = t // chunk_size * chunk_size
            conv_out = torch.zeros(d, dtype=torch.float64)
            for k in range(conv.shape[1]):
                source = t + k - past
                if start <= source < min(start + chunk_size, T):
                    conv_out += conv[:, k] * x0[b, source]
            targets[b, t] = proj @ conv_out
    return targets


def naive_inplace_ttt(z, v, weight, chunk_size, eta, clip_tau=None, forget=1.0, initial_delta=None):
    """Outputs [B, T, d] of the fast-weight down-projection for every sample on its own, and
    the final deltas [B, d, h], float64.

    z: [B, T, h] gated activations; v: [B, T, d] targets; weight: W0, [d, h]. The fast
    weight is W = W0 + eta S, S starting at initial_delta ([B, d, h], zero if None); after
    each chunk, S <- forget S + V^T Z, the update scaled so that eta ||V^T Z||_F <= clip_tau:
    W <- W0 + forget (W - W0) + eta V^T Z. The final delta is S after the last chunk.
    """
    z, v, w0 = (t.detach().double() for t in (z, v, weight))
    B, T, d = v.shape
    outputs = torch.zeros(B, T, d, dtype=torch.float64)
    finals = torch.zeros(B, d, z.shape[-1], dtype=torch.float64)
    for b in range(B):
        s = torch.zeros_like(w0) if initial_delta is None else initial_delta[b].detach().double()
        for start in range(0, T, chunk_size):
            end = min(start + chunk_size, T)
            outputs[b, start:end] = z[b, start:end] @ (w0 + eta * s).T
            update = v[b, start:end].T @ z[b, start:end]
            norm = eta * torch.linalg.norm(update)
            if clip_tau is not None and norm > clip_tau:
                update = update * (clip_tau / norm)
            s = forget * s + update
        finals[b] = s
    return outputs, finals
