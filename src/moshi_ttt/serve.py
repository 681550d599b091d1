"""`moshi-ttt serve`: moshi's own web server (`moshi.server`) running a TTT model.

moshi.server runs unchanged; only its model loading, `CheckpointInfo.get_moshi`,
goes through `lm_from_checkpoint_info`, which adds In-Place TTT (from the
checkpoint's own "ttt" config, or from `--ttt-config` for a plain checkpoint).
With `--model DIR` the checkpoint comes from that local directory. moshi.server
resets LMGen's streaming state for every new connection, and that reset puts
every TTT layer's fast weights back to W0.

Without a GPU it runs on the CPU (`--device cpu`); without the web client in the Hugging
Face cache and no way to download it, it serves the API alone (`--static none`), and says so.
"""

import argparse
import os
import runpy
import sys
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from moshi.models import loaders

from .models import TTTConfig, checkpoint_info, lm_from_checkpoint_info


def serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="moshi-ttt serve",
        description="Run moshi.server with a TTT model. Other arguments go to moshi.server "
                    "(--host, --port, --device, --static, --hf-repo, ...).")
    parser.add_argument("--model", type=Path,
                        help="a local checkpoint directory (a saved TTT model, or plain Moshi with --ttt-config)")
    parser.add_argument("--ttt-config", type=Path, help="TTTConfig (.yaml/.json) to convert a plain checkpoint")
    parser.add_argument("--mimi-weight", type=Path, help="Mimi weights, if not in the checkpoint")
    parser.add_argument("--tokenizer", type=Path, help="text tokenizer, if not in the checkpoint")
    args, moshi_argv = parser.parse_known_args(argv)
    ttt = TTTConfig.load(args.ttt_config) if args.ttt_config is not None else None

    if args.model is not None:
        info = checkpoint_info(args.model, mimi_weights=args.mimi_weight, tokenizer=args.tokenizer)
        loaders.CheckpointInfo.from_hf_repo = staticmethod(lambda *a, **k: info)
    else:
        for flag, value in (("--mimi-weight", args.mimi_weight), ("--tokenizer", args.tokenizer)):
            if value is not None:
                moshi_argv += [flag, str(value)]

    def get_moshi(info, device="cpu", dtype=torch.bfloat16, load_weight=True, **kwargs):
        if not load_weight:
            raise ValueError("moshi-ttt serve needs the model weights")
        return lm_from_checkpoint_info(info, ttt, device=device, dtype=dtype, **kwargs)

    loaders.CheckpointInfo.get_moshi = get_moshi
    moshi_argv = with_serving_defaults(moshi_argv)
    if not torch.cuda.is_available():
        # moshi.server's warm-up synchronizes CUDA unconditionally; on a CPU there is nothing to wait for.
        torch.cuda.synchronize = lambda *args, **kwargs: None
    sys.argv = ["moshi.server", *moshi_argv]
    runpy.run_module("moshi.server", run_name="__main__")


WEB_CLIENT = ("kyutai/moshi-artifacts", "dist.tgz")  # what moshi.server downloads without --static


def with_serving_defaults(moshi_argv: list[str]) -> list[str]:
    """moshi.server's arguments, with --device cpu where there is no GPU and --static none where
    the web client is neither cached nor downloadable (both only when not given)."""
    given = {a.split("=")[0] for a in moshi_argv}
    out = list(moshi_argv)
    if "--device" not in given and not torch.cuda.is_available():
        print("no GPU: serving on the CPU (--device cpu)")
        out += ["--device", "cpu"]
    if "--static" not in given and not _web_client_available():
        print("the web client is not in the Hugging Face cache and cannot be downloaded: serving the API "
              "only (--static none); give a client with --static DIR")
        out += ["--static", "none"]
    return out


def _web_client_available() -> bool:
    """The web client is in the Hugging Face cache, or (online) downloads within seconds."""
    try:
        hf_hub_download(*WEB_CLIENT, local_files_only=True)
        return True
    except (OSError, ValueError):  # not cached
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        hf_hub_download(*WEB_CLIENT, etag_timeout=5)
        return True
    except (OSError, ValueError):  # no network, or no such file
        return False
