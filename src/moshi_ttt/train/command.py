"""`moshi-ttt train`: parse the command line, load the config, run."""

import argparse
from pathlib import Path

import yaml

from ..utils.yaml_files import one_line, read_yaml


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moshi-ttt train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Finetune a TTT Moshi. With no config: the tiny model on the synthetic dataset, on the CPU.")
    parser.add_argument("--config", type=Path, help="training config (YAML); defaults for what it leaves out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set max_steps=50 --set optim.lr=3e-4")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--stop-after", type=int, help="stop after this step (the schedule keeps max_steps)")
    parser.add_argument("--baseline", action="store_true",
                        help="train the fair baseline: this run without TTT (same as --set baseline=true)")
    parser.add_argument("--with-baseline", action="store_true",
                        help="train this run, then its baseline in RUN_DIR/baseline, and compare their recall")
    return parser


def train_command(argv: list[str]) -> None:
    args = train_parser().parse_args(argv)
    data = {} if args.config is None else read_yaml(args.config, "training config")
    for override in args.overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"--set {override!r}: expected KEY=VALUE")
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        try:
            target[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"--set {override!r}: the value is not valid YAML ({one_line(error)})") from None
    if args.baseline:
        data["baseline"] = True
    if args.with_baseline and args.stop_after is not None:
        raise ValueError("--with-baseline trains both runs to the end: it cannot take --stop-after")
    from .config import TrainConfig  # here, not above: `--help` needs no torch
    config = TrainConfig.from_dict(data)
    if args.with_baseline:
        from .trainer import train_with_baseline
        train_with_baseline(config, resume=args.resume)
    else:
        from .trainer import train
        train(config, resume=args.resume, stop_after=args.stop_after)
