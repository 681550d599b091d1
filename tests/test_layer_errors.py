"""Bad input and bad settings give errors that name the value and what was expected."""

import pytest
import torch
import torch.nn.functional as F
from moshi.modules.gating import ActivationGating

from moshi_ttt import InPlaceTTTGating


@pytest.fixture
def layer(make_layer):
    return make_layer(dim=8, dtype=torch.float32)


@pytest.mark.parametrize("x_shape,x0_shape,match", [
    ((2, 5, 8), (3, 5, 8), r"\(2, 5, 8\).*\(3, 5, 8\).*same batch and length"),
    ((2, 5, 8), (2, 4, 8), r"same batch and length"),
    ((2, 5, 7), (2, 5, 7), r"x has feature size 7: expected 8"),
    ((2, 5, 8), (2, 5, 6), r"x0 has feature size 6: expected 8"),
    ((5, 8), (5, 8), r"x has shape \(5, 8\): expected \[batch, time, 8\]"),
    ((2, 0, 8), (2, 0, 8), r"empty sequence"),
])
def test_bad_shapes(layer, x_shape, x0_shape, match):
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(x_shape), torch.randn(x0_shape))


def test_inputs_on_different_devices(layer):
    with pytest.raises(ValueError, match="on cpu but token embeddings on meta"):
        layer(torch.randn(2, 5, 8), torch.randn(2, 5, 8, device="meta"))


def test_missing_embeddings(layer):
    with pytest.raises(TypeError, match="x0 .token embeddings. must be a tensor, got NoneType"):
        layer(torch.randn(2, 5, 8), None)


def test_streaming_batch_mismatch(layer):
    with layer.streaming(2), pytest.raises(ValueError, match="batch size 2, got a batch of 3"):
        layer(torch.randn(3, 1, 8), torch.randn(3, 1, 8))


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_size=0), r"chunk_size=0: expected an integer >= 1"),
    (dict(chunk_size=2.5), r"chunk_size=2.5"),
    (dict(kernel_size=0), r"kernel_size=0"),
    (dict(eta=-1.0), r"eta=-1.0: expected a finite number >= 0"),
    (dict(eta=float("nan")), r"eta=nan"),
    (dict(clip_tau=0.0), r"clip_tau=0.0: expected None \(no clip\) or a number > 0"),
    (dict(init="zeros"), r"init='zeros': expected one of \('warm', 'next_token', 'normal', 'official'\)"),
    (dict(init="next_token", kernel_size=1), r"needs a tap on the next token.*kernel_size=1"),
    (dict(init="next_token", kernel_size=3, kernel_past=2), r"needs a tap on the next token.*kernel_past=2"),
    (dict(kernel_size=3, kernel_past=3), r"kernel_past=3: expected an integer in \[0, kernel_size=3\)"),
    (dict(init_std=0.0), r"init_std=0.0"),
    (dict(algorithm="chunked"), r"algorithm='chunked': expected one of \('auto', 'dual', 'scan'\)"),
    (dict(scan_block=2.5), r"scan_block=2.5: expected an integer >= 1"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InPlaceTTTGating(8, 12, F.silu, **kwargs)


def test_from_gating_rejects_other_modules():
    with pytest.raises(TypeError, match="expected a moshi ActivationGating, got Linear"):
        InPlaceTTTGating.from_gating(torch.nn.Linear(4, 4))
    gating = ActivationGating(8, 32, F.silu)
    gating.linear_in = torch.nn.Sequential(gating.linear_in)
    with pytest.raises(TypeError, match="linear_in is Sequential"):
        InPlaceTTTGating.from_gating(gating)
