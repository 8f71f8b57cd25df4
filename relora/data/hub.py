"""The one place that talks to the Hugging Face hub (for users with internet access).

Every hub source of a study (the training stream, Paloma-style evaluation sets, text corpora,
BLiMP) has a `revision` key: a commit hash pins it, a branch or tag follows it, null follows the
default branch. The data stage resolves it once, to the commit it reads, and records both in the
data manifest (`source_revision`), so every later read of the study (the trainer's stream, a
resumed run) reads that same commit, and an unpinned source is marked as such (`pinned: false`).

Tests never reach the hub: they replace `resolve_revision`, `list_files` and `open_file` with a
local folder standing in for a dataset repository.
"""

from __future__ import annotations

import re

COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(ValueError):
    """A hub dataset that cannot be read; the message names the dataset and revision."""


def _api():
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise HubError("reading a Hugging Face hub dataset needs the `huggingface_hub` package "
                       "(pip install 'relora-study[hub]') and internet access; or point `path` at "
                       "local .parquet files") from None
    return HfApi()


def is_commit(revision: str | None) -> bool:
    return bool(revision) and bool(COMMIT.match(revision))


def resolve_revision(repo: str, revision: str | None) -> str:
    """The commit hash that `revision` (a commit, branch, tag, or None: the default branch) of
    the dataset repository `repo` points to now."""
    try:
        return _api().dataset_info(repo, revision=revision).sha
    except HubError:
        raise
    except Exception as e:
        raise HubError(f"{repo}@{revision or 'default branch'}: cannot resolve the revision ({e})") from None


def list_files(repo: str, commit: str) -> list[dict]:
    """[{"file": path in the repository, "bytes", "sha256" (the LFS object's, or None)}] at a commit."""
    files = []
    for entry in _api().list_repo_tree(repo, repo_type="dataset", revision=commit, recursive=True):
        if not hasattr(entry, "size"):  # a folder
            continue
        lfs = getattr(entry, "lfs", None)  # a dict with the object's sha256 for LFS files
        files.append({"file": entry.path, "bytes": entry.size, "sha256": lfs.get("sha256") if lfs else None})
    return files


def open_file(repo: str, commit: str, path: str):
    """A seekable binary file object of one file of the repository at a commit (read with range
    requests: a parquet reader fetches the footer and the row groups it reads, nothing else)."""
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        _api()  # raises the install hint
        raise
    return HfFileSystem().open(f"datasets/{repo}@{commit}/{path}", "rb")


def source_revision(path: str, revision: str | None, local: bool) -> dict:
    """The manifest's record of where a source was read: for a hub dataset the configured
    `revision`, the commit it resolved to now (`resolved_revision`) and whether it is `pinned`
    (configured as a commit hash); a local path has no revision."""
    if local:
        if revision is not None:
            raise HubError(f"{path}: a local path has no revision (revision: {revision}); remove the key")
        return {"hub": False, "revision": None, "resolved_revision": None, "pinned": None}
    return {"hub": True, "revision": revision, "resolved_revision": resolve_revision(path, revision),
            "pinned": is_commit(revision)}
