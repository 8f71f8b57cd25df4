"""Subcommands of the `relora` command line, one module per pipeline stage."""
