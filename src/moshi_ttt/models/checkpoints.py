"""Loading Moshi checkpoints into TTT models, and saving TTT models.

A saved TTT model directory is a Moshi checkpoint plus two things:

    config.json         moshi's config, with "ttt" (the TTTConfig, or a list of them for a
                        model that mixes methods) and "ttt_name"
    model.safetensors   every weight that plain Moshi has, loadable by moshi itself
    ttt.safetensors     the parameters the TTT methods add (In-Place TTT's target
                        generators, TTT-MLP's blocks)

so moshi's own loader reads the first two, and `load_ttt_lm` adds the third.
"""

import dataclasses
import json
import typing as tp
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from safetensors.torch import load_file, save_file

from ..utils.atomic import atomic_dir, atomic_file
from .config import TTTConfig
from .convert import apply_ttt, ttt_layers

TTT_WEIGHTS_NAME = "ttt.safetensors"
# moshi's own loader, kept before anything (such as `moshi-ttt serve`) routes it here.
_moshi_get_moshi = loaders.CheckpointInfo.get_moshi


def ttt_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the TTT layers add to Moshi's, by state-dict key (what each layer's
    method declares its own: `FastWeightLayer.own_parameters`)."""
    keys = {f"{name}.{own}" for name, layer in ttt_layers(model) for own in layer.own_parameter_names()}
    return {k: v for k, v in model.state_dict().items() if k in keys}


def configs_to_json(model: torch.nn.Module) -> tp.Any:
    """What config.json's "ttt" holds: the TTTConfig as a dict, or a list for a model that mixes methods."""
    configs = [c.to_dict() for c in model.ttt_configs]
    return configs[0] if len(configs) == 1 else configs


def configs_from_json(saved: tp.Any) -> list[TTTConfig]:
    return [TTTConfig.from_dict(c) for c in (saved if isinstance(saved, list) else [saved])]


def save_ttt_weights(model: LMModel, path: str | Path) -> None:
    """Write the TTT parameters alone (safetensors, with the TTTConfig as metadata)."""
    config = getattr(model, "ttt_config", None)
    if config is None:
        raise ValueError("this model has no TTT layers (apply_ttt was not called)")
    tensors = {k: v.detach().contiguous().cpu() for k, v in ttt_state_dict(model).items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ttt_config": json.dumps(configs_to_json(model), indent=2)})


def load_ttt_weights(model: LMModel, path: str | Path) -> None:
    """Load TTT parameters saved by `save_ttt_weights`; every key must match exactly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TTT weights not found: {path}")
    expected = ttt_state_dict(model)
    if not expected:
        raise ValueError("this model has no TTT layers (apply_ttt was not called)")
    some = next(iter(expected.values()))
    state = load_file(str(path), device=str(some.device))
    _check_keys_and_shapes(expected, state, path)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)


def save_ttt_lm(model: LMModel, directory: str | Path) -> None:
    """Write a whole TTT model directory (see the module docstring), atomically."""
    config = getattr(model, "ttt_config", None)
    moshi_config = getattr(model, "moshi_config", None)
    if config is None:
        raise ValueError("this model has no TTT layers (apply_ttt was not called)")
    if moshi_config is None:
        raise ValueError("this LMModel does not record the moshi config it was built with; "
                         "load it with load_ttt_lm or build it with build_lm")
    ttt_keys = set(ttt_state_dict(model))
    plain = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in ttt_keys}
    full_config = dict(moshi_config, moshi_name=loaders.MOSHI_NAME, ttt_name=TTT_WEIGHTS_NAME,
                       ttt=configs_to_json(model))
    with atomic_dir(directory) as tmp:
        save_file(plain, str(tmp / loaders.MOSHI_NAME))
        save_ttt_weights(model, tmp / TTT_WEIGHTS_NAME)
        (tmp / "config.json").write_text(json.dumps(full_config, indent=2))


def save_moshi_lm(model: LMModel, directory: str | Path) -> None:
    """Write a plain Moshi model (no TTT layer) as moshi's loader reads it, atomically:
    model.safetensors and config.json. `load_ttt_lm(directory, TTTConfig(...))` converts it."""
    if getattr(model, "ttt_config", None) is not None:
        raise ValueError("this model has TTT layers: save it with save_ttt_lm")
    moshi_config = getattr(model, "moshi_config", None)
    if moshi_config is None:
        raise ValueError("this LMModel does not record the moshi config it was built with; "
                         "load it with load_moshi_lm or build it with build_lm")
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(directory) as tmp:
        save_file(weights, str(tmp / loaders.MOSHI_NAME))
        (tmp / "config.json").write_text(json.dumps(dict(moshi_config, moshi_name=loaders.MOSHI_NAME), indent=2))


def load_moshi_lm(source: str | Path, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.bfloat16, moshi_weights: str | Path | None = None,
                  config_path: str | Path | None = None) -> LMModel:
    """A plain Moshi (no TTT) from a checkpoint directory or HF repo, recording its config."""
    info = checkpoint_info(source, moshi_weights=moshi_weights, config_path=config_path)
    if "ttt" in (info.raw_config or {}):
        raise ValueError(f"{source} is a TTT model (its config.json has 'ttt'): load it with load_ttt_lm")
    try:
        lm = _moshi_get_moshi(info, device=device, dtype=dtype)
    except RuntimeError as error:
        raise ValueError(f"cannot load the Moshi weights {info.moshi_weights}: {error}") from error
    lm.moshi_config = _moshi_config(info)
    return lm


def _moshi_config(info: loaders.CheckpointInfo) -> dict[str, tp.Any]:
    """The config a checkpoint was built with (moshi 7B's when it has none), without TTT's keys."""
    raw = dict(info.raw_config) if info.raw_config is not None else dict(info.lm_config or loaders._lm_kwargs)
    for key in ("ttt", "ttt_name"):
        raw.pop(key, None)
    return raw


def is_ttt_checkpoint(source: str | Path, config_path: str | Path | None = None,
                      moshi_weights: str | Path | None = None) -> bool:
    """Whether a checkpoint is a saved TTT model (its config.json has "ttt"), not a plain Moshi."""
    info = checkpoint_info(source, config_path=config_path, moshi_weights=moshi_weights)
    return "ttt" in (info.raw_config or {})


def load_lm(source: str | Path, *, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.bfloat16) -> LMModel:
    """A checkpoint as it was saved: a TTT model with its TTT layers, a plain Moshi without."""
    load = load_ttt_lm if is_ttt_checkpoint(source) else load_moshi_lm
    return load(source, device=device, dtype=dtype)


def load_ttt_lm(source: str | Path, ttt: TTTConfig | tp.Sequence[TTTConfig] | None = None, *,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                moshi_weights: str | Path | None = None, config_path: str | Path | None = None,
                ) -> LMModel:
    """A TTT Moshi from a saved TTT directory, or from a plain Moshi checkpoint and `ttt`.

    `source` is a local directory (with config.json) or, when online, a Hugging
    Face repository. From a plain checkpoint every Moshi weight is loaded and only
    the TTT parameters are initialised, as `ttt.init` says.
    """
    info = checkpoint_info(source, moshi_weights=moshi_weights, config_path=config_path)
    return lm_from_checkpoint_info(info, ttt, device=device, dtype=dtype)


def lm_from_checkpoint_info(info: loaders.CheckpointInfo, ttt: TTTConfig | tp.Sequence[TTTConfig] | None = None, *,
                            device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                            **get_moshi_kwargs: tp.Any) -> LMModel:
    """`load_ttt_lm` from a moshi `CheckpointInfo` (as moshi's own scripts build it)."""
    lm_config = dict(info.lm_config) if info.lm_config is not None else dict(loaders._lm_kwargs)
    saved_ttt = lm_config.pop("ttt", None)
    ttt_name = lm_config.pop("ttt_name", TTT_WEIGHTS_NAME)
    if saved_ttt is not None and ttt is not None:
        raise ValueError(f"{info.moshi_weights} belongs to a TTT model (its config.json has 'ttt'); "
                         "load it without a TTTConfig")
    if saved_ttt is None and ttt is None:
        raise ValueError(f"{info.moshi_weights} is a plain Moshi checkpoint: "
                         "pass the TTTConfig to convert it with")
    info = dataclasses.replace(info, lm_config=lm_config)
    try:
        lm = _moshi_get_moshi(info, device=device, dtype=dtype, **get_moshi_kwargs)
    except RuntimeError as error:
        raise ValueError(f"cannot load the Moshi weights {info.moshi_weights}: {error}") from error
    lm.moshi_config = _moshi_config(info)
    if saved_ttt is None:
        return apply_ttt(lm, ttt)
    apply_ttt(lm, configs_from_json(saved_ttt))
    load_ttt_weights(lm, Path(info.moshi_weights).parent / ttt_name)
    return lm


def checkpoint_info(source: str | Path, *, moshi_weights: str | Path | None = None,
                    config_path: str | Path | None = None, mimi_weights: str | Path | None = None,
                    tokenizer: str | Path | None = None) -> loaders.CheckpointInfo:
    """moshi's `CheckpointInfo` for a local checkpoint directory or a Hugging Face repo.

    In a directory, the files config.json names are looked up in the directory itself;
    the keyword arguments override them.
    """
    path = Path(source)
    if not path.is_dir():
        # "runs/missing" next to an existing "runs/" is a mistyped directory, not a repo on the hub.
        looks_local = str(source).startswith((".", "/")) or (len(path.parts) > 1 and path.parent.is_dir())
        if path.exists() or looks_local or len(path.parts) != 2:
            raise FileNotFoundError(f"{source}: no such checkpoint directory (nor a Hugging Face repo id, "
                                    "which is owner/name)")
        _check_hub_repo(str(source))

        def local(file):  # a local override: moshi reads a Path as it is, a name from the repo
            return None if file is None else Path(file)
        return loaders.CheckpointInfo.from_hf_repo(str(source), moshi_weights=local(moshi_weights),
                                                   mimi_weights=local(mimi_weights), tokenizer=local(tokenizer),
                                                   config_path=local(config_path))
    config_file = Path(config_path) if config_path is not None else path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in the checkpoint directory {path}")
    raw: dict[str, tp.Any] = json.loads(config_file.read_text())

    def local(key: str, default: str) -> Path:
        return named_file(path, raw.get(key, default))

    weights = Path(moshi_weights) if moshi_weights is not None else local("moshi_name", loaders.MOSHI_NAME)
    if not weights.is_file():
        raise FileNotFoundError(f"Moshi weights not found: {weights}")
    optional = {arg: local(key, "") for key, arg in
                (("mimi_config_name", "mimi_config_path"), ("lora_name", "lora_weights")) if key in raw}
    return loaders.CheckpointInfo.from_hf_repo(
        str(path), moshi_weights=weights,
        mimi_weights=mimi_weights if mimi_weights is not None else local("mimi_name", loaders.MIMI_NAME),
        tokenizer=tokenizer if tokenizer is not None else local("tokenizer_name", loaders.TEXT_TOKENIZER_NAME),
        config_path=config_file, **optional)


def _check_hub_repo(repo: str) -> None:
    """One quick request before moshi's downloads (which retry for a minute): a repo that is not
    cached and that the hub does not have, or cannot be asked about, is one line that says so.
    Offline mode and a cached repo go straight to moshi's loader."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    if huggingface_hub.constants.HF_HUB_OFFLINE or isinstance(
            huggingface_hub.try_to_load_from_cache(repo, "config.json"), str):
        return
    try:
        huggingface_hub.model_info(repo, timeout=10)
    except GatedRepoError:
        return  # the download says what access it needs
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo}: no local directory {repo}, and no such repository on the Hugging Face "
                                "Hub") from None
    except OSError as error:  # requests' connection errors and timeouts, the hub's HTTP errors
        raise FileNotFoundError(f"{repo}: no local directory {repo}, and the Hugging Face Hub cannot be reached "
                                f"({type(error).__name__})") from None


ASSET_KEYS = ("mimi_name", "mimi_config_name", "tokenizer_name")


def named_file(directory: Path, name: str) -> Path:
    """The file a checkpoint's config.json names: in its directory, or anywhere as file://PATH."""
    return Path(name.removeprefix("file://")) if name.startswith("file://") else directory / name


def with_assets(moshi_config: dict[str, tp.Any], source: str | Path, *, mimi_weights: str | Path | None = None,
                tokenizer: str | Path | None = None, config_path: str | Path | None = None,
                moshi_weights: str | Path | None = None) -> dict[str, tp.Any]:
    """`moshi_config` pointing, by absolute path, to the Mimi weights and config and the text
    tokenizer that `source` uses (or the given overrides) where those files exist, so that a model
    saved with it finds them wherever it runs on this machine; the keys of missing files are dropped."""
    config = {k: v for k, v in moshi_config.items() if k not in ASSET_KEYS}
    # moshi's default file names where config.json names none
    info = checkpoint_info(source, config_path=config_path, moshi_weights=moshi_weights)
    found: dict[str, Path | None] = {"mimi_name": Path(mimi_weights or info.mimi_weights),
                                     "tokenizer_name": Path(tokenizer or info.tokenizer), "mimi_config_name": None}
    mimi_config = (info.raw_config or {}).get("mimi_config_name")
    if mimi_config is not None:
        local = Path(source)
        found["mimi_config_name"] = (named_file(local, mimi_config) if local.is_dir()
                                     else loaders.hf_get(mimi_config, str(source)))
    # file://: moshi's own loader reads the same names as local files (not names in a repo).
    config.update({k: "file://" + str(Path(v).absolute()) for k, v in found.items()
                   if v is not None and Path(v).is_file()})
    return config


def _check_keys_and_shapes(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                           path: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: TTT weights do not match the model: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, value in found.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(expected[key].shape)}")
