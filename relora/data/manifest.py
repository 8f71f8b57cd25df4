"""Atomic writes and the data directory's manifest (docs/design.md, Files).

Every file of the data stage is written to a temporary name beside its target and renamed, so a
killed job never leaves a truncated file where a complete one is expected. Each stage records the
files it wrote (size and sha256) in `stages/<stage>.json`; `write_manifest` merges the stage
records into `manifest.json`, which the other stages read with `read_manifest` and check with
`verify_manifest`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..io import atomic_path, sha256_file  # noqa: F401 (re-exported for the data stage)

MANIFEST = "manifest.json"
STAGES = "stages"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A data file is missing, truncated or corrupt; the message names the file."""


def write_json(path: str | os.PathLike, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)


def file_record(path: str | os.PathLike, root: str | os.PathLike) -> dict:
    path = Path(path)
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def write_stage(data_dir: str | os.PathLike, stage: str, files: list, info: dict) -> Path:
    """Record what one stage wrote (paths under data_dir) and what it knows (info), then
    refresh manifest.json."""
    data_dir = Path(data_dir).resolve()
    record = {"stage": stage, "info": info,
              "files": [file_record(Path(f).resolve(), data_dir) for f in sorted(map(str, files))]}
    path = write_json(data_dir / STAGES / f"{stage}.json", record)
    write_manifest(data_dir)
    return path


def read_stage(data_dir: str | os.PathLike, stage: str) -> dict:
    path = Path(data_dir) / STAGES / f"{stage}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: stage record not found (run `relora {stage}` first)") from None


@contextlib.contextmanager
def _locked(data_dir: Path):
    """Stages running in parallel (probe, blimp) refresh the manifest one at a time."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".manifest.lock", "w") as lock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_manifest(data_dir: str | os.PathLike, extra: dict | None = None) -> dict:
    """Merge every stage record into manifest.json; the files are re-hashed, so the manifest
    describes what is on disk now. Every stage calls this when it is done."""
    data_dir = Path(data_dir)
    with _locked(data_dir):
        return _write_manifest(data_dir, extra)


def _write_manifest(data_dir: Path, extra: dict | None) -> dict:
    stages = {}
    for path in sorted((data_dir / STAGES).glob("*.json")):
        record = json.loads(path.read_text())
        stages[record["stage"]] = record
    if not stages:
        raise ManifestError(f"{data_dir / STAGES}: no stage records to merge")
    files = {}
    for record in stages.values():
        for entry in record["files"]:
            path = data_dir / entry["path"]
            if path.exists():  # a stage re-run may have replaced another's files
                files[entry["path"]] = file_record(path, data_dir)
    tokenizer = stages.get("tokenizer", {}).get("info", {})
    tokenize = stages.get("tokenize", {}).get("info", {})
    manifest = {
        "format_version": FORMAT_VERSION,
        "eos_id": tokenizer.get("eos_id"),
        "vocab_size": tokenizer.get("vocab_size"),
        "dtype": tokenizer.get("dtype"),
        "train": tokenize.get("train"),
        "eval_domains": sorted(tokenize.get("eval", {})),
        **(extra or {}),
        "stages": {name: record["info"] for name, record in stages.items()},
        "files": dict(sorted(files.items())),
    }
    write_json(data_dir / MANIFEST, manifest)
    return manifest


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found (build the data with `relora manifest`)") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise ManifestError(f"{path}: not a data manifest (no 'files')")
    return manifest


def verify_manifest(data_dir: str | os.PathLike, paths: list[str] | None = None,
                    hashes: bool = True) -> dict:
    """Check the size (and sha256) of every file the manifest lists, or of `paths` only.
    Raises ManifestError naming the first file that is missing or differs."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    entries = manifest["files"]
    for rel in paths if paths is not None else list(entries):
        if rel not in entries:
            raise ManifestError(f"{data_dir / MANIFEST}: lists no file '{rel}'")
        entry, path = entries[rel], data_dir / rel
        if not path.exists():
            raise ManifestError(f"{path}: missing (the manifest lists it)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ManifestError(f"{path}: {size} bytes, the manifest says {entry['bytes']} "
                                "(truncated or replaced)")
        if hashes and sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"{path}: sha256 differs from the manifest (corrupt or replaced)")
    return manifest


def verify_inputs(data_dir: str | os.PathLike, names: list[str], hashes: bool = True) -> dict | None:
    """Check the data files a stage is about to read against manifest.json, once per process and
    before anything is computed from them. `names` are file names ('train.npy') or folders
    ending in '/' ('eval/'): every file the manifest lists under a folder must be there intact
    (a missing domain is not silently skipped), and every file found there must be listed (a
    stray file is not silently read). Sizes always, sha256 unless `hashes` is False.

    A data folder the data stage built always has a manifest; one put together by hand (e.g.
    for the paper's released checkpoints) may not, and is then not checked: returns None."""
    data_dir = Path(data_dir)
    if not (data_dir / MANIFEST).is_file():
        return None
    manifest = read_manifest(data_dir)
    wanted = set()
    for name in names:
        if name.endswith("/"):
            wanted.update(p for p in manifest["files"] if p.startswith(name))
            folder = data_dir / name
            if folder.is_dir():
                wanted.update(f.relative_to(data_dir).as_posix() for f in folder.iterdir()
                              if f.is_file() and not f.name.startswith("."))
        elif name in manifest["files"] or (data_dir / name).exists():
            wanted.add(name)
    return verify_manifest(data_dir, sorted(wanted), hashes)
