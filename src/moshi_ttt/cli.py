"""The `moshi-ttt` command: one subcommand per job.

An expected error (a bad value, a missing file) prints one line and exits with status 2;
`--debug` (or MOSHI_TTT_DEBUG=1) shows its traceback instead.
"""

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="moshi-ttt", description="In-Place Test-Time Training for Moshi")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="finetune a TTT Moshi (default: tiny model, synthetic data, CPU)",
                        add_help=False)
    commands.add_parser("tokenize", help="audio files to pre-tokenised code files", add_help=False)
    commands.add_parser("eval", help="loss against position, spoken-LM benchmarks, TTT diagnostics",
                        add_help=False)
    commands.add_parser("smoke", help="build a tiny TTT Moshi, stream with LMGen, check it", add_help=False)
    commands.add_parser("serve", help="moshi's web server with a TTT model", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.debug or os.environ.get("MOSHI_TTT_DEBUG", "0") not in ("0", ""):
        return run(args.command, rest)
    try:
        run(args.command, rest)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        print(f"moshi-ttt {args.command}: error: {error} (moshi-ttt --debug {args.command} ... shows where)",
              file=sys.stderr)
        raise SystemExit(2) from None


def run(command: str, rest: list[str]) -> None:
    """Run one subcommand with its own arguments."""
    if command == "train":
        from .train.command import train_command
        train_command(rest)
    elif command == "tokenize":
        from .data.code_files import tokenize_command
        tokenize_command(rest)
    elif command == "eval":
        from .eval.command import eval_command
        eval_command(rest)
    elif command == "smoke":
        from .smoke import smoke
        smoke(rest)
    elif command == "serve":
        from .serve import serve
        serve(rest)


if __name__ == "__main__":
    main()
