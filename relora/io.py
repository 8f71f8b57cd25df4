"""File helpers shared by every stage: hashes, writes that never leave a torn file, and the
rules for what a command may delete.

Every output is written under a temporary name beside its destination and renamed onto it
(`os.replace` is atomic within a filesystem), so a killed job leaves either the old complete
file or the new complete file, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterable


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *markers: str, products: Iterable[str] = ()):
    """Yield a fresh temporary folder beside `path`; when the block succeeds, put it in place of
    `path` (`replace_dir`: `path` must be absent, empty or hold one of `markers`, else
    ValueError). The temporary folder never outlives the block."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had our pid
    try:
        tmp.mkdir(parents=True)
        yield tmp
        replace_dir(tmp, path, *markers, products=products)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# --- what a command may delete or replace ---------------------------------------------------
# A command deletes or replaces only what it can prove it created: a folder that holds the
# marker file it writes at creation (or an empty folder), a file it recognises as its own
# output. Anything else at a target path is the user's: the command stops and names the path.

SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def safe_name(name, what: str) -> str:
    """`name` when it is one safe path component (letters, digits, `_ . + -`, not starting with
    a dot: never `.`, `..`, empty or a path); else ValueError naming `what` and the value."""
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise ValueError(f"{what}: {name!r} cannot be a file or folder name (use letters, digits and "
                         "_ . + -, not starting with a dot)")
    return name


def owned_or_empty(path: str | os.PathLike, *markers: str, products: Iterable[str] = ()) -> bool:
    """True when `path` is absent, an empty folder, a folder holding one of `markers`, or a
    folder holding nothing but entries named in `products` (what the command itself writes
    there, e.g. a run folder whose run.json a Snakemake re-run has already removed)."""
    path = Path(path)
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    if any((path / m).exists() for m in markers):
        return True
    allowed = set(products)
    return all(entry.name in allowed for entry in path.iterdir())


def check_replaceable(path: str | os.PathLike, *markers: str, products: Iterable[str] = ()) -> None:
    if not owned_or_empty(path, *markers, products=products):
        raise ValueError(f"{path}: already exists and was not made by this command (it holds no "
                         f"{' or '.join(markers)}); refusing to replace it: move it away or choose another path")


def write_marker(folder: str | os.PathLike, marker: str, identity: dict | None = None) -> Path:
    """Mark `folder` as made by relora (the marker holds who made it and for what)."""
    import json
    import socket

    record = {"made_by": "relora", "host": socket.gethostname(), "pid": os.getpid(), **(identity or {})}
    return atomic_write_text(Path(folder) / marker, json.dumps(record, indent=2) + "\n")


def replace_dir(new: str | os.PathLike, target: str | os.PathLike, *markers: str,
                products: Iterable[str] = ()) -> Path:
    """Put the finished folder `new` in place of `target`, which must be absent, empty or hold
    one of `markers`: the old folder is renamed aside, `new` renamed in, then the old removed, so
    `target` is always either the old folder or the new one, never a mix."""
    new, target = Path(new), Path(target)
    check_replaceable(target, *markers, products=products)
    if target.exists():
        old = target.with_name(f".{target.name}.replaced{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)
    return target


def remove_owned_dir(path: str | os.PathLike, *markers: str) -> None:
    """Delete folder `path` if it is empty or holds one of `markers`; else ValueError."""
    path = Path(path)
    if path.exists():
        check_replaceable(path, *markers)
        shutil.rmtree(path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def hold_lock(path: str | os.PathLike):
    """An exclusive lock on `path` (created if needed) for as long as the returned file stays
    open, with this host and pid written into it; ValueError naming the holder when another
    process has it. flock is advisory and per host: on some network filesystems (older NFS,
    some FUSE mounts) it does not see a holder on another machine."""
    import fcntl
    import socket

    path = Path(path)
    while True:
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(f"{path}: locked by {holder}; another writer is using this folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # the holder removed the file between our open and our lock: take the new one
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    f.flush()
    return f
