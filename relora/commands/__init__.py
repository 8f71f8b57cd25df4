"""Subcommands of the `relora` command line, one module per pipeline stage.

Each module exposes `register(subparsers)` and adds its commands with `add_command`, so that
every command has a one-line summary (in `relora --help`) and a description (in `relora COMMAND
--help`), and takes the study the same way (`add_study_options`: `--config`, `--set`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_command(subparsers, name: str, handler, summary: str, description: str | None = None,
                **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with `description` (default: the summary)."""
    parser = subparsers.add_parser(name, help=summary, description=description or _sentence(summary), **kwargs)
    parser.set_defaults(handler=handler)
    return parser


def add_study_options(parser: argparse.ArgumentParser, required: bool = True, what: str = "") -> None:
    """--config STUDY.yaml and its --set KEY=VALUE overrides (args.config, args.overrides)."""
    parser.add_argument("--config", required=required, type=Path, metavar="STUDY.yaml",
                        help="the study config (YAML), validated against workflow/schemas/config.schema.yaml"
                             + (f"; {what}" if what else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study key before validation: a dotted path and a YAML value, "
                             "e.g. training.lr=1e-3; repeatable")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
