"""The `relora` command line: one subcommand per pipeline stage, each with explicit paths.

Subcommands live in `relora/commands/<stage>.py`, each exposing `register(subparsers)`; heavy
imports happen inside the handlers so that `relora --help` stays fast. Progress and diagnostics
go to stderr through `logging` (`-v` / `-q`); stdout carries only a command's own output
(`relora describe`, `relora sql`, `relora --version`).

Exit codes (the README's CLI section lists them too):
    0    success
    1    an unexpected error, a bug: Python prints the traceback
    2    a usage error: unknown command or option, a missing or malformed argument (argparse)
    3    an input or data error: an invalid study config, a missing, corrupt or foreign file, a
         folder the command may not replace, a full disk; one line names the file, key or value
    4    `relora train`: the loss or gradient norm became NaN or Inf (the last good state is kept)
    128+N  `relora train`: stopped by signal N (SIGTERM, SIGUSR1) after saving its state: requeue it;
         any command: 141 (128 + SIGPIPE) when the reader of its output went away (`| head`)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

from . import __version__

COMMAND_MODULES = ("train", "data", "evaluate", "dynamics", "results")

EXIT_USAGE = 2  # argparse's own
EXIT_INPUT = 3
EXIT_DIVERGED = 4
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # as a shell reports a process killed by SIGPIPE

log = logging.getLogger("relora.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relora", description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     epilog="`relora COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version of relora-study and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"relora.commands.{name}").register(subparsers)
    for command in subparsers.choices.values():
        add_logging_options(command)
    return parser


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="more detail on stderr (-v: debug messages, and the traceback of an error)")
    group.add_argument("-q", "--quiet", action="count", default=0,
                       help="less on stderr (-q: warnings and errors only, -qq: errors only)")


class _CommandFormatter(logging.Formatter):
    """`<time> relora <command>: [warning: |error: ]<message>`, as argparse words its errors."""

    def __init__(self, command: str):
        super().__init__("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        self.command = command

    def formatMessage(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{record.asctime} relora {self.command}: {level}{record.message}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a usage error exits here with EXIT_USAGE
    level = min(max(logging.INFO + 10 * (args.quiet - args.verbose), logging.DEBUG), logging.CRITICAL)
    logger = logging.getLogger("relora")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CommandFormatter(args.command))
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        code = args.handler(args) or 0
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # the reader of stdout went away (`relora describe ... | head`): not an error of ours.
        # Point stdout at /dev/null so that the interpreter's final flush does not fail again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except Exception as e:
        code = exit_code_of(e)
        if code is None:
            raise  # a bug: the traceback says where
        log.error("%s", e, exc_info=level <= logging.DEBUG)
        return code
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def exit_code_of(error: Exception) -> int | None:
    """EXIT_INPUT or EXIT_DIVERGED for the errors the package raises on purpose, None for others.

    Every input error of the package derives from ValueError (ConfigError, CheckpointError,
    ManifestError, ...) or OSError (a missing file, a full disk, CheckpointWriteError). The classes
    below are looked up only if their module was imported (it raised them then): the command
    line itself imports neither torch nor pip's machinery."""
    if isinstance(error, (ValueError, OSError)):
        return EXIT_INPUT
    train, bundle = sys.modules.get("relora.train"), sys.modules.get("relora.data.olmo_bundle")
    if train is not None and isinstance(error, train.TrainingDiverged):
        return EXIT_DIVERGED
    if bundle is not None and isinstance(error, bundle.BundleError):  # the corpus bundle could not be fetched
        return EXIT_INPUT
    return None


if __name__ == "__main__":
    sys.exit(main())
