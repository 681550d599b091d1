"""The float64 reference loops (`ops.inplace.naive`) evaluated with a layer's parameters."""

from moshi_ttt.ops.inplace.naive import naive_inplace_ttt, naive_targets


def reference_for_layer(layer, x, x0):
    """Outputs [B, T, d] of an `InPlaceTTTGating` for every sample on its own, in float64."""
    x, w_in = x.detach().double(), layer.linear_in.weight.detach().double()
    h = x @ w_in.T
    z = layer.activation(h[..., :layer.hidden]) * h[..., layer.hidden:]
    v = naive_targets(x0, layer.ttt_target.conv, layer.ttt_target.proj.weight, layer.chunk_size, layer.kernel_past)
    out, _ = naive_inplace_ttt(z, v, layer.linear_out.weight, layer.chunk_size, layer.eta, layer.clip_tau,
                               layer.forget)
    return out
