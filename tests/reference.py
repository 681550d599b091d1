"""A slow, obviously correct In-Place TTT: explicit loops over chunks and taps, float64.

Written from DESIGN.md's equations alone, sharing no code with the package.
"""

import torch


def reference_inplace_ttt(x, x0, w_in, w0, activation, conv, proj, chunk_size, eta, clip_tau=None, past=0,
                          forget=1.0):
    """Outputs [B, T, d] of In-Place TTT for every sample on its own.

    x, x0: [B, T, d]; w_in: [2h, d]; w0: [d, h]; conv: [d, K], tap k reading t+k-past; proj: [d, d];
    forget: each chunk the change W - W0 decays by this factor before the chunk's update joins it.
    """
    x, x0, w_in, w0, conv, proj = (t.detach().double() for t in (x, x0, w_in, w0, conv, proj))
    B, T, d = x.shape
    hidden = w0.shape[1]
    K = conv.shape[1]
    outputs = torch.zeros(B, T, d, dtype=torch.float64)
    for b in range(B):
        w = w0.clone()
        for start in range(0, T, chunk_size):
            end = min(start + chunk_size, T)
            h = x[b, start:end] @ w_in.T
            z = activation(h[:, :hidden]) * h[:, hidden:]
            outputs[b, start:end] = z @ w.T
            targets = torch.zeros(end - start, d, dtype=torch.float64)
            for t in range(start, end):
                conv_out = torch.zeros(d, dtype=torch.float64)
                for k in range(K):
                    source = t + k - past
                    if start <= source < min(start + chunk_size, T):
                        conv_out += conv[:, k] * x0[b, source]
                targets[t - start] = proj @ conv_out
            delta = eta * targets.T @ z
            if clip_tau is not None:
                norm = torch.linalg.norm(delta)
                if norm > clip_tau:
                    delta = delta * (clip_tau / norm)
            w = w0 + forget * (w - w0) + delta
    return outputs


def reference_for_layer(layer, x, x0):
    """The reference evaluated with an `InPlaceTTTGating`'s parameters and settings."""
    return reference_inplace_ttt(
        x, x0, layer.linear_in.weight, layer.linear_out.weight, layer.activation,
        layer.ttt_target.conv, layer.ttt_target.proj.weight, layer.chunk_size, layer.eta, layer.clip_tau,
        layer.kernel_past, layer.forget)
