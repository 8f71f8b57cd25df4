"""The `relora` command line: one subcommand per pipeline stage, each with explicit paths.

Subcommands live in `relora/commands/<stage>.py`, each exposing `register(subparsers)`; heavy
imports happen inside the handlers so that `relora --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMAND_MODULES = ("train", "data", "evaluate", "results")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relora", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"relora.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (ConfigError, OSError, ValueError) as e:  # OSError: a missing file, a full disk...
        print(f"relora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
