"""`TrainConfig`: one YAML file describes a training run.

The vocabulary follows moshi-finetune where it has a word for a thing
(`run_dir`, `duration_sec`, `batch_size`, `num_microbatches`, `max_norm`,
`first_codebook_weight_multiplier`, `text_padding_weight`, `optim.lr`, ...).
Every section is a dataclass; an unknown key or a bad value is an error that
names it, with its dotted path.
"""

import dataclasses
import json
import types
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..models.config import METHOD_FIELDS, TTTConfig
from ..utils.mappings import deep_merged
from ..utils.yaml_files import read_yaml
from .finetune_yaml import from_finetune_vocabulary, uses_finetune_vocabulary

MODES = ("ttt", "ttt_layers", "lora", "full")
TINY_DEFAULTS = {"context": 16}
SOURCES = ("synthetic", "codes", "finetune")
PACKINGS = ("whole", "cut")
RESETS = ("document", "row")
STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class OptimConfig:
    lr: float = 3e-3  # the tiny model from scratch; moshi-finetune finetunes Moshi 7B at 2e-6
    weight_decay: float = 0.1
    pct_start: float = 0.05  # share of the steps spent warming up, as in moshi-finetune
    beta1: float = 0.9
    beta2: float = 0.95


@dataclass
class LoraConfig:
    rank: int = 16
    scaling: float = 2.0
    ft_embed: bool = False  # lora mode: the embedding tables train too (moshi-finetune's lora.ft_embed)


@dataclass
class WandbConfig:
    """Weights & Biases logging beside TensorBoard, as moshi-finetune configures it (an extra:
    `pip install moshi-ttt[wandb]`); off without a project."""
    project: str | None = None
    run_name: str | None = None  # None: the run directory's name
    key: str | None = None  # an API key to log in with; None: wandb's own login
    offline: bool = False  # write to run_dir/wandb, for `wandb sync` later


@dataclass
class SyntheticConfig:
    """Documents whose answers depend on facts stated beyond the attention context
    (`data/synthetic.py`); held-out documents of the same kind score recall."""
    num_documents: int = 4096
    frames: int = 160
    pairs: int = 6
    spacing: int = 8  # frames between consecutive statements (and questions)
    speaker: str = "text"  # text: the model's text stream states the facts; user: the user's audio
    audio: str = "noise"  # the audio codebooks that say no fact: uniform noise, or silence
    # Training documents of frames .. max_frames frames (null: all of `frames`), from step
    # varied_from_step on, all of `frames` before it: recall is learnt on short documents (from
    # the start, documents up to 4x as long kept it at chance), then kept over topics of any length.
    max_frames: int | None = 640
    varied_from_step: int = 1300
    # Without seq_frames or duration_sec, a row is this many documents of `frames` (the main
    # job: four; with two the model learned too little of a memory that holds many).
    documents_per_row: int = 4

    def layout(self) -> dict[str, tp.Any]:
        """What a held-out document looks like: the keyword arguments of SyntheticDocuments and
        of `eval.recall.synthetic_recall_set` beyond the stream layout (`frames` long)."""
        return dict(frames=self.frames, pairs=self.pairs, spacing=self.spacing, speaker=self.speaker,
                    audio=self.audio)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | codes (pre-tokenised .npy files) | finetune (moshi-finetune jsonl)
    train_data: str | None = None  # codes: a directory of .npy files; finetune: the .jsonl file
    eval_data: str | None = None  # held-out data of the same kind: the validation loss every eval_freq steps
    shuffle: bool = True
    # whole: a document that fits in a row is never cut across two (the rest of a row is
    # padding without loss); cut: rows are filled to the last frame, documents cut anywhere.
    pack: str = "whole"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    mimi_weights: str | None = None  # finetune: Mimi, if not the model checkpoint's
    tokenizer: str | None = None  # finetune: text tokenizer, if not the model checkpoint's


@dataclass
class TrainConfig:
    model: str = "tiny"  # "tiny" (built-in random config), a checkpoint directory, or an HF repo id
    moshi_weights: str | None = None  # the checkpoint's weights file, if not the one its config.json names
    config_path: str | None = None  # the checkpoint's config.json, if not the one in `model`
    # model "tiny": moshi LMModel kwargs over the built-in ones. An attention context of 16
    # frames: 4 layers x 16 = 64 frames is the farthest a chain of attention reaches, and
    # every fact of the default documents is stated further back than that.
    tiny: dict = field(default_factory=lambda: dict(TINY_DEFAULTS))
    # A gate decides from each chunk's content how much of the fast weights it keeps and how
    # strongly it writes (starting from 0.9 and 1): it learns to keep everything and write
    # little over filler, and to forget at new statements, so the reach is set by what was
    # said, not by a clock (docs/recall.md).
    ttt: TTTConfig = field(default_factory=lambda: TTTConfig(
        layers=[0], chunk_size=32, eta=0.5, init="next_token", x0_source="text", forget=0.9, gate="decay_write"))
    data: DataConfig = field(default_factory=DataConfig)
    mode: str = "full"  # what trains: ttt | ttt_layers | lora | full (the tiny model starts from random weights)
    # The fair baseline: this run without TTT (no TTT layer); in ttt_layers mode the
    # layers `ttt` names still train, so both runs train the same parameters otherwise.
    baseline: bool = False
    # document: every document of a row starts from W0 (and gets its own fast weights);
    # row: a row's documents follow on without a reset, as topics of one conversation,
    # from step stream_from_step on (a curriculum: first recall, then recall in a full memory;
    # stream_from_step means nothing with "document").
    reset_fast_weights: str = "row"
    stream_from_step: int = 800
    lora: LoraConfig = field(default_factory=LoraConfig)
    eta_warmup_steps: int = 0  # TTT's eta ramps linearly from 0 to ttt.eta over these first steps
    first_codebook_weight_multiplier: float = 100.0
    text_padding_weight: float = 0.5
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 1800  # 800 steps on fresh documents, 500 on streams, 500 on streams of varied length
    batch_size: int = 2  # sequences per process and micro-batch
    num_microbatches: int = 1  # gradient accumulation
    # Row length: seconds (12.5 frames each) or frames, at most one of the two; with neither,
    # data.synthetic.documents_per_row synthetic documents, else 256 frames.
    duration_sec: float | None = None
    seq_frames: int | None = None
    max_norm: float = 1.0  # gradient clipping; 0 turns it off
    bf16: bool = True  # autocast to bfloat16 on a GPU
    gradient_checkpointing: bool = False
    device: str = "auto"
    # Under torchrun: fsdp shards parameters, gradients and optimizer states across the
    # processes (FSDP2, a unit per transformer layer); ddp keeps a whole copy in each; auto:
    # fsdp, but a resumed run keeps DDP if its checkpoints were written without FSDP.
    distributed: str = "auto"
    seed: int = 0
    run_dir: str = "runs/train"  # a new run needs it empty or absent (or overwrite_run_dir: true)
    overwrite_run_dir: bool = False
    log_freq: int = 10  # steps between logged metrics
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ckpt_freq: int = 100  # steps between checkpoints (one is also written when a run stops)
    keep_last: int = 2
    do_ckpt: bool = True  # false: no checkpoint (no resume); final/ is still written
    save_adapters: bool = False  # lora mode: also final/lora.safetensors, the LoRA adapters alone
    do_eval: bool = True  # synthetic data: recall on held-out documents every eval_freq steps and at the end
    eval_freq: int = 100
    eval_documents: int = 64  # held-out documents per evaluation during training (4x that at the end)
    # At the end, also recall over 4 streams of this many held-out documents without a reset
    # (125 of 160 frames: 20,000 frames, 27 minutes of conversation); 0: off.
    eval_stream_documents: int = 125
    # At the end, per-document recall also on held-out documents this many times as long (more
    # filler between statements and questions), by distance; and streams of documents of 1x up
    # to the largest of these lengths, as many frames as the fixed-length streams.
    eval_lengths: list = field(default_factory=lambda: [1, 2, 4])

    def __post_init__(self) -> None:
        if self.model != "tiny" and self.tiny == TINY_DEFAULTS:
            self.tiny = {}  # the built-in model's settings are no checkpoint's
        self.validate()

    @property
    def frames(self) -> int:
        if self.seq_frames is not None:
            return self.seq_frames
        if self.duration_sec is not None:
            return round(self.duration_sec * 12.5)
        synthetic = self.data.synthetic
        return synthetic.frames * synthetic.documents_per_row if self.data.source == "synthetic" else 256

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model={self.model!r}: expected 'tiny', a checkpoint directory or a Hugging Face repo")
        if self.tiny and self.model != "tiny":
            raise ValueError(f"tiny={self.tiny!r} changes the built-in tiny model, but model={self.model!r}")
        for name in ("moshi_weights", "config_path"):
            if getattr(self, name) is not None and self.model == "tiny":
                raise ValueError(f"{name}={getattr(self, name)!r} names a checkpoint's file, but model='tiny'")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {MODES}")
        if not isinstance(self.tiny, dict):
            raise ValueError(f"tiny={self.tiny!r}: expected a mapping of moshi LMModel kwargs")
        from ..models.tiny import tiny_lm_config  # here: reading a config needs no moshi
        known = tiny_lm_config()
        unknown = sorted(set(self.tiny) - set(known))
        if unknown:
            raise ValueError(f"unknown tiny model key(s) {unknown}: expected some of {sorted(known)}")
        for key, value in self.tiny.items():
            if known[key] is not None:  # of the built-in value's type (an integer where it is a number)
                _check_type(f"tiny.{key}", value, type(known[key]))
        if self.data.source not in SOURCES:
            raise ValueError(f"data.source={self.data.source!r}: expected one of {SOURCES}")
        if self.data.pack not in PACKINGS:
            raise ValueError(f"data.pack={self.data.pack!r}: expected one of {PACKINGS}")
        if self.data.source != "synthetic" and not self.data.train_data:
            raise ValueError(f"data.train_data is required for data.source={self.data.source!r}")
        if self.wandb.project is not None and (not isinstance(self.wandb.project, str) or not self.wandb.project):
            raise ValueError(f"wandb.project={self.wandb.project!r}: expected a project name, or null for no wandb")
        if self.lora.ft_embed and self.mode != "lora":
            raise ValueError(f"lora.ft_embed=true with mode={self.mode!r}: it adds the embeddings to what trains "
                             "in lora mode (in full mode they train anyway)")
        if self.data.eval_data and self.data.source == "synthetic":
            raise ValueError(f"data.eval_data={self.data.eval_data!r} with data.source='synthetic': synthetic "
                             "runs score recall on their own held-out documents (do_eval); leave it empty")
        if self.distributed not in STRATEGIES:
            raise ValueError(f"distributed={self.distributed!r}: expected one of {STRATEGIES}")
        if self.reset_fast_weights not in RESETS:
            raise ValueError(f"reset_fast_weights={self.reset_fast_weights!r}: expected one of {RESETS}")
        _check("stream_from_step", self.stream_from_step, int, minimum=0)
        _check("eval_stream_documents", self.eval_stream_documents, int, minimum=0)
        if (not isinstance(self.eval_lengths, list) or not self.eval_lengths or 1 not in self.eval_lengths
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.eval_lengths)):
            raise ValueError(f"eval_lengths={self.eval_lengths!r}: expected a list of integers >= 1 that holds 1 "
                             "(multiples of the documents' length)")
        if self.data.synthetic.max_frames is not None:
            _check("data.synthetic.max_frames", self.data.synthetic.max_frames, int,
                   minimum=self.data.synthetic.frames)
        _check("data.synthetic.varied_from_step", self.data.synthetic.varied_from_step, int, minimum=0)
        if self.duration_sec is not None and self.seq_frames is not None:
            raise ValueError(f"duration_sec={self.duration_sec!r}, seq_frames={self.seq_frames!r}: "
                             "give at most one of the two")
        for name in ("baseline", "do_eval", "bf16", "gradient_checkpointing", "data.shuffle", "overwrite_run_dir",
                     "do_ckpt", "save_adapters", "lora.ft_embed", "wandb.offline"):
            if not isinstance(_get(self, name), bool):
                raise ValueError(f"{name}={_get(self, name)!r}: expected true or false")
        if self.baseline and self.mode == "ttt":
            raise ValueError("baseline=true with mode='ttt': a model without TTT has no TTT parameter to train; "
                             "use the mode of the run it is the baseline of (ttt_layers, lora or full)")
        _check("eta_warmup_steps", self.eta_warmup_steps, int, minimum=0)
        if self.eta_warmup_steps > self.max_steps:
            raise ValueError(f"eta_warmup_steps={self.eta_warmup_steps}: expected at most max_steps="
                             f"{self.max_steps} (the run would end before TTT's eta reaches ttt.eta)")
        for name in ("max_steps", "batch_size", "num_microbatches", "log_freq", "ckpt_freq", "keep_last",
                     "eval_freq", "eval_documents", "lora.rank", "data.synthetic.num_documents",
                     "data.synthetic.frames", "data.synthetic.pairs", "data.synthetic.spacing",
                     "data.synthetic.documents_per_row"):
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
        """The config of a YAML mapping; a checkpoint `model` starts from CHECKPOINT_DEFAULTS. A
        mapping in moshi-finetune's vocabulary is read as moshi-finetune reads it (`finetune_yaml`)."""
        data = data or {}
        if isinstance(data, tp.Mapping) and uses_finetune_vocabulary(data):
            data = from_finetune_vocabulary(data)
        model = data.get("model", "tiny") if isinstance(data, tp.Mapping) else "tiny"
        if model != "tiny":
            # A saved TTT model's own settings are the defaults its ttt section changes.
            saved = saved_ttt_settings(model, data.get("config_path")) if isinstance(model, str) and model else None
            data = deep_merged(dict(CHECKPOINT_DEFAULTS, ttt=saved or TTTConfig().to_dict()), data)
        return _build(cls, data, "")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_yaml(Path(path), "training config"))


# A checkpoint is finetuned from moshi-finetune's habits and the library's TTT defaults
# (TTTConfig(), or a saved TTT model's own settings: `from_dict`), not from the tiny
# model's recipe (the defaults above).
CHECKPOINT_DEFAULTS: dict[str, tp.Any] = {
    "mode": "ttt_layers", "optim": {"lr": 2e-6}, "max_steps": 1200, "batch_size": 8,
    "reset_fast_weights": "document", "stream_from_step": 0, "data": {"synthetic": {"documents_per_row": 1}}}


def saved_ttt_settings(model: str, config_path: str | None = None) -> dict[str, tp.Any] | None:
    """The TTTConfig a TTT model was saved with (its config.json's "ttt"; the first, for a model
    that mixes methods), or None: for a plain Moshi, or a source that cannot be read (training
    then says why)."""
    config_file = Path(config_path) if config_path else Path(model) / "config.json"
    try:
        if not config_file.is_file() and len(Path(model).parts) == 2:  # a Hugging Face repo, if cached
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(model, "config.json")
            config_file = Path(cached) if isinstance(cached, str) else config_file
        saved = json.loads(config_file.read_text()).get("ttt") if config_file.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    saved = saved[0] if isinstance(saved, list) and saved else saved
    return TTTConfig.from_dict(saved).to_dict() if isinstance(saved, dict) else None


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
        if nested is None:
            if fields[name].type is dict and isinstance(value, tp.Mapping):
                value = {**fields[name].default_factory(), **value}  # a partial mapping keeps the defaults
            value = _yaml_float(value) if _is_float_field(fields[name].type) else value
            _check_type(prefix + name, value, fields[name].type)
            kwargs[name] = value
            continue
        if isinstance(value, nested):  # a default carried down from the enclosing section
            kwargs[name] = value
            continue
        if not isinstance(value, tp.Mapping):
            raise ValueError(f"{prefix}{name}: expected a mapping, got {type(value).__name__}")
        # A partial section changes only what it names: the rest keeps this config's defaults.
        default = fields[name].default_factory()
        if nested is TTTConfig:
            floats = {f.name for f in dataclasses.fields(TTTConfig) if _is_float_field(f.type)}
            merged = {**default.to_dict(), **{k: _yaml_float(v) if k in floats else v for k, v in value.items()}}
            if ("start" in value or "every" in value) and "layers" not in value:
                merged["layers"] = None  # layers and start/every are two ways to choose: the one given counts
            if merged["method"] != default.method:  # another method: the defaults' own settings do not apply
                merged.update({k: getattr(TTTConfig, k) for k in METHOD_FIELDS[default.method] if k not in value})
            try:
                kwargs[name] = TTTConfig.from_dict(merged)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{prefix}{name}: {error}") from error
        else:
            kwargs[name] = _build(nested, {**_shallow_dict(default), **value}, f"{prefix}{name}.")
    return cls(**kwargs)


def _shallow_dict(instance) -> dict[str, tp.Any]:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}


def _check_type(name: str, value, annotation) -> None:
    """A value of the field's declared type (`X | None`: also null), checked before any other
    rule compares it, so that a wrong type gets one line that names the key."""
    allowed = tp.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    optional = type(None) in allowed
    if value is None and optional:
        return
    allowed = tuple(kind for kind in allowed if kind is not type(None))
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return
        if kind in (int, float) and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, float):
            return
        if kind in (str, list) and isinstance(value, kind):
            return
        if kind is dict and isinstance(value, tp.Mapping):
            return
        if kind not in _TYPE_NAMES:  # a type this check does not know: the field's own rules decide
            return
    expected = " or ".join([_TYPE_NAMES[kind] for kind in allowed] + (["null"] if optional else []))
    raise ValueError(f"{name}={value!r}: expected {expected}")


def _is_float_field(annotation) -> bool:
    return annotation is float or (isinstance(annotation, types.UnionType) and float in tp.get_args(annotation))


def _yaml_float(value):
    """YAML 1.1 (PyYAML) reads `3e-4` and `2e-6` as strings: read them as the numbers they are."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _nested_type(annotation) -> type | None:
    candidates = (TTTConfig, OptimConfig, LoraConfig, SyntheticConfig, DataConfig, WandbConfig)
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
