"""moshi-finetune's YAML vocabulary, in this package's terms.

A config written for kyutai's moshi-finetune (its `example/moshi_7B.yaml`) runs as it is:
each of its keys means here what it means there, a key it leaves out takes moshi-finetune's
default (`DEFAULTS`), and `from_finetune_vocabulary` rewrites them into TrainConfig's own.
A key that cannot mean anything here is an error that says why, never dropped.

    moshi_paths.hf_repo_id       model (the checkpoint; moshi-finetune's default repo unless null)
    moshi_paths.moshi_path       moshi_weights (and model: its directory, with hf_repo_id null)
    moshi_paths.config_path      config_path
    moshi_paths.mimi_path        data.mimi_weights
    moshi_paths.tokenizer_path   data.tokenizer
    full_finetuning, lora.enable mode: full, or lora (LoRA plus the TTT parameters)
    lora.ft_embed                lora.ft_embed (the embeddings train too, in lora mode)
    num_ckpt_keep                keep_last (null: every checkpoint)
    do_ckpt                      do_ckpt
    ckpt_freq < 1                a checkpoint at the end only
    eval_freq < 1                with do_eval, an evaluation at the end only
    save_adapters                save_adapters (final/lora.safetensors: what trained, unmerged)
    param_dtype                  bf16 (bfloat16 on a GPU, or float32)
    data.train_data, eval_data   the same, with data.source: finetune ('' eval_data: none)
    wandb                        wandb (project, run_name, key, offline)
"""

import copy
import typing as tp
from pathlib import Path

from ..utils.mappings import deep_merged

FINETUNE_ONLY = ("moshi_paths", "full_finetuning", "num_ckpt_keep", "param_dtype")  # not TrainConfig keys
DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"  # moshi-finetune's default moshi_paths.hf_repo_id
ONLY_AT_THE_END = 10 ** 9
# moshi-finetune's TrainArgs defaults, for the keys a config leaves out (TTT's come from TTTConfig).
DEFAULTS: dict[str, tp.Any] = {
    "first_codebook_weight_multiplier": 1.0, "text_padding_weight": 0.5, "seed": 0, "num_microbatches": 1,
    "duration_sec": 10, "batch_size": 1, "max_norm": 1.0, "max_steps": 100, "log_freq": 1, "ckpt_freq": 0,
    "save_adapters": True, "do_ckpt": True, "num_ckpt_keep": 3, "eval_freq": 0, "do_eval": False,
    "gradient_checkpointing": True, "full_finetuning": False, "param_dtype": "bfloat16",
    "overwrite_run_dir": False, "optim": {"lr": 1e-4, "weight_decay": 0.1, "pct_start": 0.05},
    "lora": {"enable": False, "rank": 64, "scaling": 2.0, "ft_embed": False},
    "data": {"shuffle": False},
}


def uses_finetune_vocabulary(data: tp.Mapping[str, tp.Any]) -> bool:
    """Whether a config mapping speaks moshi-finetune's dialect (a key only it has)."""
    lora = data.get("lora")
    return (any(key in data for key in FINETUNE_ONLY)
            or (isinstance(lora, tp.Mapping) and "enable" in lora))


def from_finetune_vocabulary(data: tp.Mapping[str, tp.Any]) -> dict[str, tp.Any]:
    """The same config in TrainConfig's keys (see the module docstring)."""
    given = [key for key in FINETUNE_ONLY if key in data] + (["lora.enable"] if "enable" in (data.get("lora") or {})
                                                             else [])
    try:
        return _translated(data)
    except ValueError as error:
        raise ValueError(f"{error} (read as a moshi-finetune config: it has {', '.join(given)})") from error


def _translated(data: tp.Mapping[str, tp.Any]) -> dict[str, tp.Any]:
    explicit = data
    out = copy.deepcopy(deep_merged(DEFAULTS, explicit))  # copied: the sections below are edited
    if "mode" in explicit:  # this package's own key for what trains, beside moshi-finetune's others
        if "full_finetuning" in explicit or "enable" in (explicit.get("lora") or {}):
            raise ValueError("mode and full_finetuning / lora.enable both say what trains: give one")
        out.pop("full_finetuning")
        out["lora"].pop("enable")
    else:
        _mode(out)
    # This package's own keys beside moshi-finetune's: they replace its defaults, not what it was given.
    for ours, theirs in (("keep_last", "num_ckpt_keep"), ("bf16", "param_dtype"), ("seq_frames", "duration_sec")):
        if ours in explicit and theirs not in explicit:
            out.pop(theirs)
    _model(out)
    if "num_ckpt_keep" in out and "keep_last" in out:
        raise ValueError("num_ckpt_keep and keep_last both say how many checkpoints to keep: give one")
    if "keep_last" not in out:
        num_keep = out.pop("num_ckpt_keep", 3)  # moshi-finetune's default
        out["keep_last"] = ONLY_AT_THE_END if num_keep is None else num_keep
    if isinstance(out.get("ckpt_freq"), int) and not isinstance(out["ckpt_freq"], bool) and out["ckpt_freq"] < 1:
        out["ckpt_freq"] = ONLY_AT_THE_END  # moshi-finetune: below 1, only the last checkpoint
    if isinstance(out.get("eval_freq"), int) and not isinstance(out["eval_freq"], bool) and out["eval_freq"] < 1:
        out["eval_freq"] = ONLY_AT_THE_END  # moshi-finetune: with do_eval, at the end only
    if "param_dtype" in out:
        dtype = out.pop("param_dtype")
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"param_dtype={dtype!r}: expected 'bfloat16' (bf16 on a GPU) or 'float32'")
        if "bf16" in out:
            raise ValueError("param_dtype and bf16 both set the precision: give one")
        out["bf16"] = dtype == "bfloat16"
    section = out.setdefault("data", {})
    if isinstance(section, dict):
        if not section.get("eval_data"):
            section.pop("eval_data", None)  # moshi-finetune's '': no validation set
        section.setdefault("source", "finetune")
    if out.get("run_dir") == "":
        raise ValueError("run_dir is empty: give the directory the run writes (moshi-finetune's example says "
                         "'Fill')")
    return out


def _model(out: dict[str, tp.Any]) -> None:
    if "moshi_paths" not in out and "model" in out:
        return
    paths = out.pop("moshi_paths", None)
    if paths is None:
        paths = {}
    if not isinstance(paths, tp.Mapping):
        raise ValueError(f"moshi_paths={paths!r}: expected a mapping")
    paths = {"hf_repo_id": DEFAULT_REPO, **paths}  # moshi-finetune's default, unless set (null: local files)
    unknown = sorted(set(paths) - {"hf_repo_id", "moshi_path", "mimi_path", "tokenizer_path", "config_path"})
    if unknown:
        raise ValueError(f"unknown moshi_paths key(s) {unknown}: expected some of hf_repo_id, moshi_path, "
                         "mimi_path, tokenizer_path, config_path")
    if "model" in out:
        raise ValueError("model and moshi_paths both say which checkpoint to start from: give one")
    repo, weights, config = paths.get("hf_repo_id"), paths.get("moshi_path"), paths.get("config_path")
    local = weights or config
    if repo:
        out["model"] = repo
    elif local:
        out["model"] = str(Path(local).parent)
    else:
        raise ValueError("moshi_paths names no checkpoint: give hf_repo_id, or moshi_path and config_path "
                         "with hf_repo_id: null")
    if weights:
        out["moshi_weights"] = weights
    if config:
        out["config_path"] = config
    section = out.setdefault("data", {})
    for key, ours in (("mimi_path", "mimi_weights"), ("tokenizer_path", "tokenizer")):
        if paths.get(key) and isinstance(section, dict):
            if section.get(ours):
                raise ValueError(f"moshi_paths.{key} and data.{ours} both name the file: give one")
            section[ours] = paths[key]


def _mode(out: dict[str, tp.Any]) -> None:
    full = out.pop("full_finetuning", False)
    lora = out.get("lora")
    enable = lora.pop("enable", False) if isinstance(lora, dict) else False
    if not isinstance(full, bool) or not isinstance(enable, bool):
        raise ValueError(f"full_finetuning={full!r}, lora.enable={enable!r}: expected true or false")
    if full and enable:
        raise ValueError("full_finetuning: true with lora.enable: true: choose one (moshi-finetune: LoRA is "
                         "for partial finetuning)")
    if not (full or enable):
        raise ValueError("full_finetuning: false and lora.enable: false: nothing would train; set one, or give "
                         "mode: ttt (the TTT parameters only) or ttt_layers instead")
    out["mode"] = "full" if full else "lora"
