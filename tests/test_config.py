"""TTTConfig: layer selection, round trips, validation that names the field."""

import pytest

from moshi_ttt import TTTConfig


def test_paper_default_layers():
    assert TTTConfig().layer_indices(32) == [0, 6, 12, 18, 24, 30]
    assert TTTConfig(start=3, every=10).layer_indices(32) == [3, 13, 23]
    assert TTTConfig(layers=[9, 2]).layer_indices(32) == [2, 9]


def test_round_trips(tmp_path):
    config = TTTConfig(layers=[1, 4], chunk_size=256, eta=0.3, kernel_size=3, init="next_token",
                       clip_tau=1e-5, x0_source="text", algorithm="scan", scan_block=1024)
    assert TTTConfig.from_json(config.to_json()) == config
    assert TTTConfig.from_yaml(config.to_yaml()) == config
    for name, text in (("c.yaml", config.to_yaml()), ("c.json", config.to_json())):
        (tmp_path / name).write_text(text)
        assert TTTConfig.load(tmp_path / name) == config
    assert TTTConfig.from_yaml("") == TTTConfig()


@pytest.mark.parametrize("fields,match", [
    (dict(chunk_size=0), r"ttt.chunk_size=0: expected an integer >= 1"),
    (dict(every=0), r"ttt.every=0"),
    (dict(eta=-0.1), r"ttt.eta=-0.1: expected a finite number >= 0"),
    (dict(clip_tau=0), r"ttt.clip_tau=0: expected a finite number > 0"),
    (dict(init="zero"), r"ttt.init='zero': expected one of"),
    (dict(algorithm="chunked"), r"ttt.algorithm='chunked': expected one of \('auto', 'dual', 'scan'\)"),
    (dict(scan_block=0), r"ttt.scan_block=0: expected an integer >= 1"),
    (dict(x0_source="audio"), r"ttt.x0_source='audio': expected one of \('input', 'text', 'user', 'text_user', 'hidden'\)"),
    (dict(layers=[]), r"ttt.layers=\[\]: expected a non-empty list"),
    (dict(layers=[1, 1]), r"ttt.layers=\[1, 1\]: a layer index is repeated"),
    (dict(layers=[-1]), r"ttt.layers\[...\]=-1"),
    (dict(init="next_token", kernel_size=1), r"ttt.kernel_size=1, kernel_past=0: init 'next_token' needs a tap"),
    (dict(kernel_size=5, kernel_past=5), r"ttt.kernel_past=5: expected fewer taps on the past than kernel_size=5"),
])
def test_bad_values_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        TTTConfig(**fields)


def test_unknown_fields_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown ttt config field\(s\) \['chunk'\]"):
        TTTConfig.from_yaml("chunk: 512\n")
    with pytest.raises(ValueError, match="start=40 selects no layer of a 32-layer transformer"):
        TTTConfig(start=40).layer_indices(32)
    with pytest.raises(FileNotFoundError, match="ttt config file not found"):
        TTTConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "c.txt").write_text("")
    with pytest.raises(ValueError, match=r"expected a .json, .yaml or .yml file"):
        TTTConfig.load(tmp_path / "c.txt")
