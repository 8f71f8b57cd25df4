"""Publishing a finished run: its run directory is built beside its place from the resume
directory and swapped in for the old one whole (docs/design.md, Files), so no checkpoint of an
earlier run ever stays beside a new run.json.

A run directory carries `.relora-run`; a folder at its path that is neither empty, nor marked,
nor made only of what the pipeline writes there is the user's, and the run refuses it before
writing anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .io import atomic_write_text, check_replaceable, remove_owned_dir, replace_dir, write_marker

RUN_MARKER = ".relora-run"  # in a published run directory
# everything the pipeline writes into a run directory: a folder holding only these is a run of
# ours even without its marker (a run published before markers existed, whose run.json and
# checkpoints Snakemake removed before re-running its training)
RUN_PRODUCTS = (RUN_MARKER, "run.json", "checkpoints", "train_metrics.parquet", "perplexity.parquet",
                "blimp.parquet", "dynamics.parquet")


def check_run_dir(out_dir: Path, resume_dir: Path) -> None:
    """Raise, naming the folder, unless the run directory may be replaced by this run's: absent,
    empty or a published run, and apart from the resume directory."""
    out, resume = out_dir.resolve(), resume_dir.resolve()
    if out == resume or out in resume.parents or resume in out.parents:
        raise ValueError(f"--out {out_dir} and --resume-dir {resume_dir} overlap; publishing "
                         "would replace or delete one with the other: give two separate folders")
    check_replaceable(out_dir, RUN_MARKER, "run.json", products=RUN_PRODUCTS)


def publish_run(resume_dir: Path, out_dir: Path, identity: dict, record: dict,
                write_tables: Callable[[Path], None]) -> None:
    """Build OUT_DIR from RESUME_DIR/checkpoints, the tables `write_tables(folder)` writes and
    run.json (`record`, written last: the run's completion marker), then swap it in."""
    staging = out_dir.with_name(f".{out_dir.name}.publishing")
    remove_owned_dir(staging, RUN_MARKER)  # a publish killed half-way
    staging.mkdir(parents=True)
    write_marker(staging, RUN_MARKER, identity)
    # hard links, not moves: if this is killed half-way, the resume directory still holds
    # everything and the rerun publishes again
    shutil.copytree(resume_dir / "checkpoints", staging / "checkpoints", copy_function=_link_or_copy)
    write_tables(staging)
    atomic_write_text(staging / "run.json", json.dumps(record, indent=2))
    replace_dir(staging, out_dir, RUN_MARKER, "run.json", products=RUN_PRODUCTS)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)
