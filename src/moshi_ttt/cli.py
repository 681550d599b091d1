"""The `moshi-ttt` command: one subcommand per job."""

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="moshi-ttt", description="In-Place Test-Time Training for Moshi")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="finetune a TTT Moshi (default: tiny model, synthetic data, CPU)",
                        add_help=False)
    commands.add_parser("tokenize", help="audio files to pre-tokenised code files", add_help=False)
    commands.add_parser("eval", help="loss against position, spoken-LM benchmarks, TTT diagnostics",
                        add_help=False)
    commands.add_parser("smoke", help="build a tiny TTT Moshi, stream with LMGen, check it", add_help=False)
    commands.add_parser("serve", help="moshi's web server with a TTT model", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from .train.command import train_command
        train_command(rest)
    elif args.command == "tokenize":
        from .train.code_files import tokenize_command
        tokenize_command(rest)
    elif args.command == "eval":
        from .eval.command import eval_command
        eval_command(rest)
    elif args.command == "smoke":
        from .smoke import smoke
        smoke(rest)
    elif args.command == "serve":
        from .serve import serve
        serve(rest)


if __name__ == "__main__":
    main()
