"""`TTTConfig`: which layers of Moshi get test-time training, by which method, and how it behaves.

A plain dataclass that round-trips through dicts, JSON and YAML; every value is
checked, and an error names the field.
"""

import dataclasses
import json
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import yaml


X0Source = tp.Literal["input", "text", "user", "text_user", "hidden"]
X0_SOURCES: tuple[str, ...] = tp.get_args(X0Source)
Method = tp.Literal["inplace", "ttt_mlp"]
METHODS: tuple[str, ...] = tp.get_args(Method)
# The fields only one method reads; the other method's must keep their defaults.
METHOD_FIELDS = {
    "inplace": ("chunk_size", "eta", "kernel_size", "kernel_past", "init", "init_std", "clip_tau", "forget",
                "objective", "gate", "x0_source", "algorithm", "scan_block"),
    "ttt_mlp": ("mini_batch", "base_lr", "heads", "conv_kernel", "gate_init", "scan_group"),
}


@dataclass
class TTTConfig:
    """Test-time-training settings for the main transformer (the depformer is never converted).

    Attributes:
        method: "inplace" (In-Place TTT: the chosen layers' MLPs get a fast down-projection)
            or "ttt_mlp" (TTT-MLP, Sun et al. 2024: a gated residual block follows each
            chosen layer). Each method reads only its own fields below.
        layers: explicit layer indices; when None, `start, start+every, ...`.
        start, every: the paper's default is every 6th layer from layer 0.

    In-Place TTT:
        chunk_size: frames per fast-weight update (512 frames = 41 s at 12.5 Hz).
        eta: fast-weight learning rate.
        kernel_size: the target conv reads frames t .. t+K-1 ...
        kernel_past: ... or t-P .. t+K-1-P with P taps on the past (official code: K=5, P=2).
        init, init_std: target generator init ("warm", "next_token", "normal", "official").
        clip_tau: Frobenius-norm clip of each chunk's update, None for no clip.
        forget: the forgetting factor lambda in (0, 1]: each chunk the fast weights'
            change decays toward W0 by lambda; 1 keeps every update (docs/recall.md). With a
            gate, the decay the gate starts from.
        objective: the fast weights' update, "dot" (the paper's: V^T Z is added) or "l2" (the
            delta rule: the targets' error under the fast weights, so a key written again
            replaces its value).
        gate: "none", "decay" (each chunk's decay from a sigmoid of its mean input, starting
            at `forget` < 1) or "decay_write" (also the chunk's write strength).
        x0_source: the embeddings X0 the targets are made from: "input" (the sum of
            every stream's embedding, the transformer's input), "text" (the text
            stream's embedding only), "user" (the user's audio codebooks'),
            "text_user" (text and user audio, without the model's own audio) or
            "hidden" (the layer's own MLP input).
        algorithm: exact form for whole sequences, "auto", "dual" or "scan".
        scan_block: positions per scan block, None to pick one from the model's size.

    TTT-MLP:
        mini_batch: b, tokens per inner gradient step (16 in the paper).
        base_lr: the inner learning rate's scale (0.1 for TTT-MLP in the paper).
        heads: heads of the inner MLPs, None for the attention's.
        conv_kernel: causal convolution on queries and keys (4 in the paper), 0 for none.
        gate_init: tanh-gate alpha at conversion (0 is exactly the plain model).
        scan_group: mini-batches per checkpointed group of the scan in training.
    """

    method: str = "inplace"
    layers: list[int] | None = None
    start: int = 0
    every: int = 6
    chunk_size: int = 512
    eta: float = 1.0
    kernel_size: int = 2
    kernel_past: int = 0
    init: str = "next_token"  # docs/recall.md: learns far sooner than "warm" or "official"
    init_std: float = 0.02
    clip_tau: float | None = None
    forget: float = 1.0
    objective: str = "dot"
    gate: str = "none"
    x0_source: str = "text_user"  # what is said, by either side; not Moshi's own audio (docs/recall.md)
    algorithm: str = "auto"
    scan_block: int | None = None
    mini_batch: int = 16
    base_lr: float = 0.1
    heads: int | None = None
    conv_kernel: int = 0
    gate_init: float = 0.1
    scan_group: int = 16

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from ..modules.inplace.targets import TARGET_INITS  # here: reading a config needs no torch
        from ..ops import ALGORITHMS, check_forget
        if self.method not in METHODS:
            raise ValueError(f"ttt.method={self.method!r}: expected one of {METHODS}")
        others = [name for method, names in METHOD_FIELDS.items() if method != self.method for name in names
                  if getattr(self, name) != getattr(TTTConfig, name)]
        if others:
            raise ValueError(f"ttt.method={self.method!r} does not read {', '.join(f'ttt.{n}' for n in others)} "
                             f"(fields of another method): drop them, or set ttt.method")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise ValueError(f"ttt.layers={self.layers!r}: expected a non-empty list of layer indices or null")
            for i in self.layers:
                _check_int("layers[...]", i, minimum=0)
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"ttt.layers={self.layers!r}: a layer index is repeated")
            self.layers = sorted(int(i) for i in self.layers)
            if (self.start, self.every) != (TTTConfig.start, TTTConfig.every):
                raise ValueError(f"ttt.layers={self.layers} with ttt.start={self.start}, ttt.every={self.every}: "
                                 "choose layers either by list or by start/every (set layers to null)")
        _check_int("start", self.start, minimum=0)
        _check_int("every", self.every, minimum=1)
        _check_int("chunk_size", self.chunk_size, minimum=1)
        _check_int("kernel_size", self.kernel_size, minimum=1)
        _check_number("eta", self.eta, minimum=0.0)
        _check_number("init_std", self.init_std, minimum=0.0, strict=True)
        if self.clip_tau is not None:
            _check_number("clip_tau", self.clip_tau, minimum=0.0, strict=True)
        check_forget(self.forget, "ttt.forget")
        from ..modules.inplace.gate import GATES
        from ..ops.inplace.recurrence import check_objective
        check_objective(self.objective, "ttt.objective")
        if self.gate not in GATES:
            raise ValueError(f"ttt.gate={self.gate!r}: expected one of {GATES}")
        if self.gate != "none" and self.forget == 1:
            raise ValueError(f"ttt.gate={self.gate!r} starts every chunk's decay at ttt.forget, which must then "
                             "be below 1 (e.g. 0.95)")
        if self.clip_tau is not None and (self.objective != "dot" or self.gate != "none"):
            raise ValueError(f"ttt.clip_tau={self.clip_tau} with ttt.objective={self.objective!r}, "
                             f"ttt.gate={self.gate!r}: the clip is for the additive update without a gate")
        if self.init not in TARGET_INITS:
            raise ValueError(f"ttt.init={self.init!r}: expected one of {TARGET_INITS}")
        _check_int("kernel_past", self.kernel_past, minimum=0)
        if self.kernel_past >= self.kernel_size:
            raise ValueError(f"ttt.kernel_past={self.kernel_past}: expected fewer taps on the past than "
                             f"kernel_size={self.kernel_size}")
        if self.init == "next_token" and self.kernel_size - self.kernel_past < 2:
            raise ValueError(f"ttt.kernel_size={self.kernel_size}, kernel_past={self.kernel_past}: init "
                             "'next_token' needs a tap on the next token (kernel_size - kernel_past >= 2)")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"ttt.algorithm={self.algorithm!r}: expected one of {ALGORITHMS}")
        if self.scan_block is not None:
            _check_int("scan_block", self.scan_block, minimum=1)
        if self.x0_source not in X0_SOURCES:
            raise ValueError(f"ttt.x0_source={self.x0_source!r}: expected one of {X0_SOURCES}")
        _check_int("mini_batch", self.mini_batch, minimum=1)
        _check_number("base_lr", self.base_lr, minimum=0.0)
        if self.heads is not None:
            _check_int("heads", self.heads, minimum=1)
        _check_int("conv_kernel", self.conv_kernel, minimum=0)
        if not (isinstance(self.gate_init, (int, float)) and not isinstance(self.gate_init, bool)
                and abs(self.gate_init) < float("inf")):
            raise ValueError(f"ttt.gate_init={self.gate_init!r}: expected a finite number")
        _check_int("scan_group", self.scan_group, minimum=0)

    def layer_indices(self, num_layers: int) -> list[int]:
        """The converted layers of a transformer with `num_layers` layers."""
        if self.layers is None:
            chosen = list(range(self.start, num_layers, self.every))
            if not chosen:
                raise ValueError(f"ttt.start={self.start} selects no layer of a {num_layers}-layer transformer")
            return chosen
        out_of_range = [i for i in self.layers if i >= num_layers]
        if out_of_range:
            raise ValueError(f"ttt.layers={self.layers}: {out_of_range} out of range for "
                             f"a transformer with {num_layers} layers (0 .. {num_layers - 1})")
        return list(self.layers)

    @property
    def update_frames(self) -> int:
        """Frames per fast-weight update: In-Place's chunk, TTT-MLP's mini-batch."""
        return self.mini_batch if self.method == "ttt_mlp" else self.chunk_size

    def layer_kwargs(self) -> dict[str, tp.Any]:
        """Keyword arguments of the method's layer (`InPlaceTTTGating`, `TTTMLPBlock`) that this config sets."""
        if self.method == "ttt_mlp":
            return dict(mini_batch=self.mini_batch, base_lr=self.base_lr, conv_kernel=self.conv_kernel,
                        gate_init=self.gate_init, scan_group=self.scan_group)
        return dict(chunk_size=self.chunk_size, eta=self.eta, kernel_size=self.kernel_size,
                    kernel_past=self.kernel_past,
                    clip_tau=self.clip_tau, forget=self.forget, objective=self.objective, gate=self.gate,
                    init=self.init, init_std=self.init_std, algorithm=self.algorithm, scan_block=self.scan_block)

    def to_dict(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: tp.Mapping[str, tp.Any]) -> "TTTConfig":
        if not isinstance(data, tp.Mapping):
            raise ValueError(f"ttt config must be a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown ttt config field(s) {unknown}: expected some of {names}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TTTConfig":
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "TTTConfig":
        return cls.from_dict(yaml.safe_load(text) or {})

    @classmethod
    def load(cls, path: str | Path) -> "TTTConfig":
        """Read a .json, .yaml or .yml file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ttt config file not found: {path}")
        text = path.read_text()
        if path.suffix == ".json":
            return cls.from_json(text)
        if path.suffix in (".yaml", ".yml"):
            return cls.from_yaml(text)
        raise ValueError(f"ttt config file {path}: expected a .json, .yaml or .yml file")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ttt.{name}={value!r}: expected an integer >= {minimum}")


def _check_number(name: str, value, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and value != float("inf") and (value > minimum if strict else value >= minimum)
    if not ok:
        relation = ">" if strict else ">="
        raise ValueError(f"ttt.{name}={value!r}: expected a finite number {relation} {minimum}")
