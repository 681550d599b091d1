"""Every example of the README parses, and the ones that can run here (offline, tiny) run."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from assets import write_plain_checkpoint

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[list[str]]:
    """Every command line of the README's bash blocks, continuations joined, comments dropped."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def test_the_readme_has_its_examples():
    assert len(blocks("bash")) >= 4 and len(blocks("python")) == 1 and len(blocks("yaml")) == 1
    assert ["make", "run"] in commands() and ["make", "test"] in commands()


@pytest.mark.parametrize("words", commands(), ids=lambda w: " ".join(w)[:60])
def test_every_command_parses(words):
    from moshi_ttt.eval.command import eval_parser
    from moshi_ttt.train.command import train_parser
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), flags=re.M), words
        return
    if words[0] == "python":
        assert (ROOT / words[1]).is_file(), words
        return
    if words[0] == "torchrun":
        words = ["moshi-ttt"] + words[words.index("moshi_ttt.cli") + 1:]
    assert words[0] == "moshi-ttt", words
    command, rest = words[1], words[2:]
    parsers = {"train": train_parser, "eval": eval_parser}
    if command in parsers:
        parsers[command]().parse_args(rest)
    else:
        assert command in ("serve", "smoke", "tokenize"), words


def test_the_yaml_example_is_a_valid_config():
    from moshi_ttt.train import TrainConfig
    config = TrainConfig.from_dict(yaml.safe_load(blocks("yaml")[0]))
    assert config.frames == round(config.duration_sec * 12.5)


def test_the_python_example_runs(tmp_path):
    """The README's Python, on a tiny checkpoint and on the CPU."""
    checkpoint = write_plain_checkpoint(tmp_path / "moshi")
    code = blocks("python")[0]
    code = code.replace('"path/to/moshi-checkpoint"', repr(str(checkpoint)))
    code = code.replace('"runs/my-ttt-model"', repr(str(tmp_path / "ttt")))
    code = code.replace('device="cuda"', 'device="cpu"').replace("torch.bfloat16", "torch.float32")
    codes = torch.randint(0, 64, (1, 5, 40))
    codes[:, 0] = 3
    scope = {"codes": codes}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "ttt" / "ttt.safetensors").is_file()
    assert scope["out"].text_logits.shape[:3] == (1, 1, 40)


def test_the_command_line_training_example_runs(tmp_path, monkeypatch):
    """`moshi-ttt train --set ...` as the README writes it, cut short."""
    from moshi_ttt.train.command import train_command
    example = next(w for w in commands() if w[:2] == ["moshi-ttt", "train"] and "--set" in w and "--config" not in w)
    monkeypatch.chdir(tmp_path)
    train_command(example[2:] + ["--set", "max_steps=2", "--set", "eval_documents=2", "--set", "run_dir=run"])
    assert (tmp_path / "run" / "final" / "ttt.safetensors").is_file()


@pytest.mark.parametrize("argv,shown", [(["--help"], "eval"), (["train", "--help"], "--with-baseline"),
                                        (["eval", "--help"], "--recall-stream")])
def test_the_command_help_imports_neither_torch_nor_moshi(argv, shown):
    code = (f"import sys\nfrom moshi_ttt.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'moshi' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'moshi'))[:5]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert shown in done.stdout


def test_an_expected_error_is_one_line_and_status_2(tmp_path):
    command = [sys.executable, "-m", "moshi_ttt.cli", "train", "--set", "batch_size=0",
               "--set", f"run_dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == ("moshi-ttt train: error: batch_size=0: expected an integer >= 1 "
                                   "(moshi-ttt --debug train ... shows where)")
    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
