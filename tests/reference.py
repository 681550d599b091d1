"""The float64 reference loops (`ops.inplace.naive`) evaluated with a layer's parameters."""

import torch

from moshi_ttt.ops.inplace.naive import naive_chunk_means, naive_inplace_ttt, naive_l2_step_scales, naive_targets


def reference_for_layer(layer, x, x0):
    """Outputs [B, T, d] of an `InPlaceTTTGating` for every sample on its own, in float64."""
    x, w_in = x.detach().double(), layer.linear_in.weight.detach().double()
    h = x @ w_in.T
    z = layer.activation(h[..., :layer.hidden]) * h[..., layer.hidden:]
    v = naive_targets(x0, layer.ttt_target.conv, layer.ttt_target.proj.weight, layer.chunk_size, layer.kernel_past)
    decay, write = reference_factors(layer, x, z)
    out, _ = naive_inplace_ttt(z, v, layer.linear_out.weight, layer.chunk_size, layer.eta, layer.clip_tau,
                               layer.forget, objective=layer.objective, decay=decay, write=write)
    return out


def reference_factors(layer, x, z):
    """Each chunk's decay and write strength ([B, n] float64, or None) of the gate and the delta rule."""
    decay = write = None
    gate = layer.ttt_gate
    if gate is not None:
        means = naive_chunk_means(x, layer.chunk_size)

        def read_out(linear):
            return torch.sigmoid(means @ linear.weight.detach().double()[0] + linear.bias.detach().double())
        decay = read_out(gate.decay)
        if gate.write is not None:
            write = 2 * read_out(gate.write)
    if layer.objective == "l2":
        scales = naive_l2_step_scales(z, layer.chunk_size, layer.eta)
        write = scales if write is None else write * scales
    return decay, write
