"""A run's resume directory: everything a run keeps until it ends (docs/design.md, Files).

`state.pt` holds the model, optimizer, RNG state and metric rows (tensors and plain values only,
so it loads with `weights_only=True`); `checkpoints/` the checkpoints written so far;
`.relora-resume` the run's identity, written at creation, so that only this run's folder is ever
cleared; `.lock` (host and pid inside), locked by the one process training the run.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path
from pickle import UnpicklingError  # what torch.load(weights_only=True) raises on a foreign object

import torch

from .checkpoint import CheckpointWriteError
from .io import atomic_path, check_replaceable, hold_lock, write_marker

log = logging.getLogger(__name__)

STATE = "state.pt"
RESUME_MARKER = ".relora-resume"  # in a resume directory, from its creation: the run's identity
LOCK = ".lock"


class ForeignStateError(ValueError):
    """A state file that asks torch.load to call a function: refused, never run."""


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_state(path: Path, payload: dict) -> None:
    """torch.save to a temporary name, then rename: a kill never leaves a torn state file, and a
    failed write (a full disk) leaves the previous state as it was."""
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except Exception as e:  # OSError, or torch's RuntimeError "file write failed"
        raise CheckpointWriteError(f"{path}: could not save the resume state ({e}); "
                                   "the previous state is unchanged") from e


def check_state_file(path: Path) -> None:
    """Raise if a state file's CRC-32s do not match its data: torch.save writes a zip archive
    with one per tensor, which torch.load does not check, so a flipped bit would be resumed
    from silently. Reads the file once (about 1 GB/s)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"CRC-32 of {bad} does not match its data (altered or corrupt file)")


def read_state(path: Path, device: torch.device) -> dict:
    """The saved state, after checking its CRC-32s. Raises ForeignStateError for a file that is
    not what `save_state` writes; anything else (a torn or corrupt file) raises as it comes."""
    check_state_file(path)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except UnpicklingError as e:  # not what save_state writes: never run what a file asks for
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise ForeignStateError(
            f"{path}: refusing to load: it asks to call {found[1] if found else 'a function'}, and a resume "
            "state holds only tensors and plain values (received or altered file?); delete it to start "
            "the run from step 0") from None


def claim_resume_dir(resume_dir: Path, identity: dict):
    """Create (or take back) the run's resume directory and lock it; returns the lock's open file.

    The folder must be absent, empty or this run's (its marker names the same identity); a folder
    of another run or of the user is an error naming it, raised before anything is written."""
    check_replaceable(resume_dir, RESUME_MARKER)
    marker = resume_dir / RESUME_MARKER
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text())
        except json.JSONDecodeError:
            owner = {}
        owner = {k: owner.get(k) for k in identity}
        if owner != identity:
            raise ValueError(f"{resume_dir}: holds the resume state of another run ({owner}); "
                             f"this run is {identity}: give it its own --resume-dir")
    resume_dir.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_marker(resume_dir, RESUME_MARKER, identity)
    return hold_lock(resume_dir / LOCK)


def clear_resume_dir(resume_dir: Path) -> None:
    """Remove the saved state and checkpoints (a run starting from step 0); only what a run writes
    there: anything else in the folder is left alone."""
    if (resume_dir / STATE).exists() or (resume_dir / "checkpoints").exists():
        log.info("starting from step 0: removing the state and checkpoints in %s", resume_dir)
    (resume_dir / STATE).unlink(missing_ok=True)
    shutil.rmtree(resume_dir / "checkpoints", ignore_errors=True)


def remove_resume_dir(resume_dir: Path, release) -> None:
    """Delete a published run's resume directory: the state first (a half-deleted folder is never
    resumed), then the checkpoints, the marker and the lock; `release()` unlocks before the folder
    itself goes. A folder holding anything else stays, with a warning."""
    (resume_dir / STATE).unlink(missing_ok=True)
    shutil.rmtree(resume_dir / "checkpoints")
    (resume_dir / RESUME_MARKER).unlink()
    (resume_dir / LOCK).unlink()
    release()
    try:
        resume_dir.rmdir()
    except OSError:  # something else was put there: it is not ours to delete
        log.warning("%s: left in place, it holds files the run did not write", resume_dir)
