"""moshi-finetune's YAML vocabulary, in this package's terms.

A config written for kyutai's moshi-finetune (its `example/moshi_7B.yaml`) runs as it is:
each of its keys means here what it means there, and `from_finetune_vocabulary` rewrites
them into TrainConfig's own. A key that cannot mean anything here, or a value this package
cannot honour yet, is an error that says why, never dropped.

    moshi_paths.hf_repo_id       model (the checkpoint)
    moshi_paths.moshi_path       moshi_weights (and model: its directory, without hf_repo_id)
    moshi_paths.config_path      config_path
    moshi_paths.mimi_path        data.mimi_weights
    moshi_paths.tokenizer_path   data.tokenizer
    full_finetuning, lora.enable mode: full, or lora (LoRA plus the TTT parameters)
    lora.ft_embed                lora.ft_embed (the embeddings train too, in lora mode)
    num_ckpt_keep                keep_last (null: every checkpoint)
    do_ckpt                      do_ckpt
    ckpt_freq < 1                a checkpoint at the end only
    save_adapters                save_adapters (final/lora.safetensors beside the merged model)
    param_dtype                  bf16 (bfloat16 on a GPU, or float32)
    data.train_data, eval_data   the same, with data.source: finetune ('' eval_data: none)
    wandb                        wandb (project, run_name, key, offline)
"""

import copy
import typing as tp
from pathlib import Path

FINETUNE_ONLY = ("moshi_paths", "full_finetuning", "num_ckpt_keep", "param_dtype")  # not TrainConfig keys
DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"  # moshi-finetune's default moshi_paths.hf_repo_id
ONLY_AT_THE_END = 10 ** 9


def uses_finetune_vocabulary(data: tp.Mapping[str, tp.Any]) -> bool:
    """Whether a config mapping speaks moshi-finetune's dialect (a key only it has)."""
    lora = data.get("lora")
    return (any(key in data for key in FINETUNE_ONLY)
            or (isinstance(lora, tp.Mapping) and "enable" in lora))


def from_finetune_vocabulary(data: tp.Mapping[str, tp.Any]) -> dict[str, tp.Any]:
    """The same config in TrainConfig's keys (see the module docstring)."""
    out = copy.deepcopy(dict(data))
    _model(out)
    _mode(out)
    if "num_ckpt_keep" in out and "keep_last" in out:
        raise ValueError("num_ckpt_keep and keep_last both say how many checkpoints to keep: give one")
    if "keep_last" not in out:
        num_keep = out.pop("num_ckpt_keep", 3)  # moshi-finetune's default
        out["keep_last"] = ONLY_AT_THE_END if num_keep is None else num_keep
    if isinstance(out.get("ckpt_freq"), int) and not isinstance(out["ckpt_freq"], bool) and out["ckpt_freq"] < 1:
        out["ckpt_freq"] = ONLY_AT_THE_END  # moshi-finetune: below 1, only the last checkpoint
    if isinstance(out.get("eval_freq"), int) and out["eval_freq"] < 1 and not out.get("do_eval", False):
        out.pop("eval_freq")  # moshi-finetune's 0 with do_eval off: no evaluation
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
        paths = {"hf_repo_id": DEFAULT_REPO}
    if not isinstance(paths, tp.Mapping):
        raise ValueError(f"moshi_paths={paths!r}: expected a mapping")
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
        raise ValueError("moshi_paths names no checkpoint: give hf_repo_id, or moshi_path (and config_path)")
    if weights:
        out["moshi_weights"] = weights
    if config:
        out["config_path"] = config
    section = out.setdefault("data", {})
    for key, ours in (("mimi_path", "mimi_weights"), ("tokenizer_path", "tokenizer")):
        if paths.get(key) and isinstance(section, dict):
            section[ours] = paths[key]


def _mode(out: dict[str, tp.Any]) -> None:
    full = out.pop("full_finetuning", False)
    lora = out.get("lora")
    enable = lora.pop("enable", False) if isinstance(lora, dict) else False
    if not isinstance(full, bool) or not isinstance(enable, bool):
        raise ValueError(f"full_finetuning={full!r}, lora.enable={enable!r}: expected true or false")
    if "mode" in out:
        raise ValueError("mode and full_finetuning / lora.enable both say what trains: give one")
    if full and enable:
        raise ValueError("full_finetuning: true with lora.enable: true: choose one (moshi-finetune: LoRA is "
                         "for partial finetuning)")
    if not (full or enable):
        raise ValueError("full_finetuning: false and lora.enable: false: nothing would train; set one, or give "
                         "mode: ttt (the TTT parameters only) or ttt_layers instead")
    out["mode"] = "full" if full else "lora"
