"""`TrainConfig`: one YAML file describes a training run.

The vocabulary follows moshi-finetune where it has a word for a thing
(`run_dir`, `duration_sec`, `batch_size`, `num_microbatches`, `max_norm`,
`first_codebook_weight_multiplier`, `text_padding_weight`, `optim.lr`, ...).
Every section is a dataclass; an unknown key or a bad value is an error that
names it, with its dotted path.
"""

import dataclasses
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..models.config import TTTConfig

MODES = ("ttt", "ttt_layers", "lora", "full")
SOURCES = ("synthetic", "codes", "finetune")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    pct_start: float = 0.05  # share of the steps spent warming up, as in moshi-finetune
    beta1: float = 0.9
    beta2: float = 0.95


@dataclass
class LoraConfig:
    rank: int = 16
    scaling: float = 2.0


@dataclass
class SyntheticConfig:
    """Documents whose answers depend on facts stated beyond the attention context."""
    num_documents: int = 4096
    frames: int = 256
    pairs: int = 6


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | codes (pre-tokenised .npy files) | finetune (moshi-finetune jsonl)
    train_data: str | None = None  # codes: a directory of .npy files; finetune: the .jsonl file
    shuffle: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    mimi_weights: str | None = None  # finetune: Mimi, if not the model checkpoint's
    tokenizer: str | None = None  # finetune: text tokenizer, if not the model checkpoint's


@dataclass
class TrainConfig:
    model: str = "tiny"  # "tiny" (built-in random config), a checkpoint directory, or an HF repo id
    ttt: TTTConfig = field(default_factory=lambda: TTTConfig(every=2, chunk_size=32, init="warm", eta=0.05))
    data: DataConfig = field(default_factory=DataConfig)
    mode: str = "ttt_layers"  # what trains: ttt | ttt_layers | lora | full
    lora: LoraConfig = field(default_factory=LoraConfig)
    first_codebook_weight_multiplier: float = 100.0
    text_padding_weight: float = 0.5
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 300
    batch_size: int = 8  # sequences per process and micro-batch
    num_microbatches: int = 1  # gradient accumulation
    duration_sec: float | None = None  # sequence length in seconds (12.5 frames each) ...
    seq_frames: int | None = 256  # ... or in frames; exactly one of the two
    max_norm: float = 1.0  # gradient clipping; 0 turns it off
    bf16: bool = True  # autocast to bfloat16 on a GPU
    gradient_checkpointing: bool = False
    device: str = "auto"
    seed: int = 0
    run_dir: str = "runs/train"
    log_freq: int = 10  # steps between logged metrics
    ckpt_freq: int = 100  # steps between checkpoints (one is also written when a run stops)
    keep_last: int = 2

    def __post_init__(self) -> None:
        self.validate()

    @property
    def frames(self) -> int:
        if self.seq_frames is not None:
            return self.seq_frames
        return round(self.duration_sec * 12.5)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {MODES}")
        if self.data.source not in SOURCES:
            raise ValueError(f"data.source={self.data.source!r}: expected one of {SOURCES}")
        if self.data.source != "synthetic" and not self.data.train_data:
            raise ValueError(f"data.train_data is required for data.source={self.data.source!r}")
        if (self.duration_sec is None) == (self.seq_frames is None):
            raise ValueError(f"duration_sec={self.duration_sec!r}, seq_frames={self.seq_frames!r}: "
                             "give exactly one of the two")
        for name in ("max_steps", "batch_size", "num_microbatches", "log_freq", "ckpt_freq", "keep_last",
                     "lora.rank", "data.synthetic.num_documents", "data.synthetic.frames", "data.synthetic.pairs"):
            _check(name, _get(self, name), int, minimum=1)
        if self.seq_frames is not None:
            _check("seq_frames", self.seq_frames, int, minimum=2)
        if self.duration_sec is not None:
            _check("duration_sec", self.duration_sec, float, minimum=0.16)
        for name in ("optim.lr", "lora.scaling"):
            _check(name, _get(self, name), float, minimum=0.0, strict=True)
        for name in ("optim.weight_decay", "max_norm", "first_codebook_weight_multiplier", "text_padding_weight"):
            _check(name, _get(self, name), float, minimum=0.0)
        for name in ("optim.pct_start", "optim.beta1", "optim.beta2"):
            _check(name, _get(self, name), float, minimum=0.0)
            if _get(self, name) >= 1:
                raise ValueError(f"{name}={_get(self, name)!r}: expected a number in [0, 1)")
        _check("seed", self.seed, int, minimum=0)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def to_dict(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: tp.Mapping[str, tp.Any] | None) -> "TrainConfig":
        return _build(cls, data or {}, "")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from error
        return cls.from_dict(data)


def _build(cls, data: tp.Any, prefix: str):
    if not isinstance(data, tp.Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}: "
                         f"expected some of {[prefix + k for k in fields]}")
    kwargs = {}
    for name, value in data.items():
        nested = _nested_type(fields[name].type)
        if nested is TTTConfig:
            try:
                kwargs[name] = TTTConfig.from_dict(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{prefix}{name}: {error}") from error
        elif nested is not None:
            kwargs[name] = _build(nested, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _nested_type(annotation) -> type | None:
    candidates = (TTTConfig, OptimConfig, LoraConfig, SyntheticConfig, DataConfig)
    for candidate in candidates:
        if annotation is candidate or annotation == candidate.__name__:
            return candidate
    return None


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check(name: str, value, kind: type, minimum: float, strict: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and (kind is float or isinstance(value, int)) and value == value and value != float("inf")
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        what = "an integer" if kind is int else "a finite number"
        relation = ">" if strict else ">="
        raise ValueError(f"{name}={value!r}: expected {what} {relation} {minimum}")
