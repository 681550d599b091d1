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


def naive_inplace_ttt(z, v, weight, chunk_size, eta, clip_tau=None, forget=1.0, initial_delta=None,
                      objective="dot", decay=None, write=None):
    """Outputs [B, T, d] of the fast-weight down-projection for every sample on its own, and
    the final deltas [B, d, h], float64.

    z: [B, T, h] gated activations; v: [B, T, d] targets; weight: W0, [d, h]. The fast
    weight is W = W0 + eta S, S starting at initial_delta ([B, d, h], zero if None). After
    each chunk i, S <- a S + c U: a the chunk's decay (decay[b, i], else forget), c its write
    strength (write[b, i], else 1), U its update, scaled so that eta ||c U||_F <= clip_tau:
    objective "dot": U = V^T Z, the negative gradient of -<Z W^T, V>;
    objective "l2": U = (V - Z D^T)^T Z, the negative gradient of ||Z D^T - V||^2 / 2 at the
    kept fast part D = eta a S (the delta rule). The final delta is S after the last chunk.
    """
    z, v, w0 = (t.detach().double() for t in (z, v, weight))
    B, T, d = v.shape
    outputs = torch.zeros(B, T, d, dtype=torch.float64)
    finals = torch.zeros(B, d, z.shape[-1], dtype=torch.float64)
    for b in range(B):
        s = torch.zeros_like(w0) if initial_delta is None else initial_delta[b].detach().double()
        for i, start in enumerate(range(0, T, chunk_size)):
            end = min(start + chunk_size, T)
            zc, vc = z[b, start:end], v[b, start:end]
            outputs[b, start:end] = zc @ (w0 + eta * s).T
            keep = forget if decay is None else float(decay[b, i])
            target = vc
            if objective == "l2":
                kept_fast = eta * keep * s
                target = vc - zc @ kept_fast.T
            update = target.T @ zc * (1.0 if write is None else float(write[b, i]))
            norm = eta * torch.linalg.norm(update)
            if clip_tau is not None and norm > clip_tau:
                update = update * (clip_tau / norm)
            s = keep * s + update
        finals[b] = s
    return outputs, finals


def naive_chunk_means(x, chunk_size):
    """[B, n_chunks, D] float64: the mean of x ([B, T, D]) over each chunk's positions."""
    x = x.detach().double()
    B, T, D = x.shape
    starts = list(range(0, T, chunk_size))
    means = torch.zeros(B, len(starts), D, dtype=torch.float64)
    for b in range(B):
        for i, start in enumerate(starts):
            rows = range(start, min(start + chunk_size, T))
            means[b, i] = sum(x[b, t] for t in rows) / len(rows)
    return means


def naive_l2_step_scales(z, chunk_size, eta):
    """[B, n_chunks] float64: 1 / max(1, eta * g), g the largest sum of |z_s . z_t| over the
    positions s of a chunk, for one of its positions t."""
    z = z.detach().double()
    B, T, _ = z.shape
    starts = list(range(0, T, chunk_size))
    scales = torch.zeros(B, len(starts), dtype=torch.float64)
    for b in range(B):
        for i, start in enumerate(starts):
            rows = range(start, min(start + chunk_size, T))
            bound = max(sum(abs(float(z[b, s] @ z[b, t])) for s in rows) for t in rows)
            scales[b, i] = 1 / max(1.0, eta * bound)
    return scales
