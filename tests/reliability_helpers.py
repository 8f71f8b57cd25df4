"""Shared pieces of the reliability tests (tests/test_reliability_*.py): copies of the session's
end-to-end study, the fault-injection hooks of tests/fault_hooks/, process and file checks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from workflow_helpers import SNAKEFILE

HOOKS = Path(__file__).resolve().parent / "fault_hooks"
RUN_KEY = "size=mini/condition={condition}/seed={seed}"


def copy_workdir(e2e_study, tmp_path: Path) -> Path:
    """The finished study's folder (results, logs, Snakemake's records, mtimes kept), to mutate."""
    workdir = tmp_path / "work"
    shutil.copytree(e2e_study.workdir, workdir, symlinks=True)
    return workdir


def fault_env(**variables) -> dict:
    """The environment of a process with the fault hooks loaded (RELORA_FAULT_<NAME>=value)."""
    env = {**os.environ, **{f"RELORA_FAULT_{k.upper()}": str(v) for k, v in variables.items()}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOKS), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env.pop("SNAKEMAKE_PROFILE", None)
    return env


def start_snakemake(workdir: Path, *args: str, env: dict, log: Path) -> subprocess.Popen:
    """Snakemake in the background, in its own process group (so that the whole group, jobs
    included, can be killed at once, as a node failure would), output into `log`."""
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory",
               str(workdir), *args]
    out = open(log, "a")
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def relora_processes(parent: subprocess.Popen, command: str, marker: str) -> list[psutil.Process]:
    """The `python -m relora COMMAND` descendants of `parent` whose command line contains marker."""
    found = []
    try:
        children = psutil.Process(parent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for child in children:
        try:
            cmdline = child.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "relora" in cmdline and command in cmdline and any(marker in part for part in cmdline):
            found.append(child)
    return found


def wait_for(condition, what: str, timeout: float = 180, interval: float = 0.02, alive=None):
    """Poll `condition()` until it returns something truthy; fail naming `what` on timeout, or
    as soon as the process `alive` ends without the condition having become true."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            value = condition()
            if value:
                return value
            raise AssertionError(f"the process ended (code {alive.returncode}) before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def saved_step(resume_dir: Path) -> int | None:
    """The step of the resume state, or None while there is none (or it is being replaced)."""
    try:
        return torch.load(resume_dir / "state.pt", weights_only=False, map_location="cpu")["step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group of a process this test started (start_new_session=True)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Every checkpoint bitwise equal and the metric rows equal (but for the timing column)."""
    steps = sorted(p.name for p in (reference_dir / "checkpoints").glob("step_*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == steps
    for step in steps:
        a = load_file(reference_dir / "checkpoints" / step / "model.safetensors")
        b = load_file(run_dir / "checkpoints" / step / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{step} differs"
    ref = pq.read_table(reference_dir / "train_metrics.parquet").drop(["tokens_per_s"]).to_pylist()
    assert pq.read_table(run_dir / "train_metrics.parquet").drop(["tokens_per_s"]).to_pylist() == ref


def complete_file(path: Path) -> bool:
    """Whether a figure, report or table file is whole (its format's end marker is there)."""
    data = path.read_bytes()
    if path.suffix == ".png":
        return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    if path.suffix == ".svg":
        return data.rstrip().endswith(b"</svg>")
    if path.suffix == ".html":
        return data.rstrip().lower().endswith(b"</html>")
    if path.suffix == ".json":
        import json

        json.loads(data)
        return True
    if path.suffix == ".duckdb":
        import duckdb

        with duckdb.connect(str(path), read_only=True) as con:
            return con.execute("select count(*) from runs").fetchone()[0] > 0
    raise ValueError(path)


def temporary_leftovers(folder: Path) -> list[Path]:
    """Temporary files of the atomic writers (.NAME.tmp<pid>, and DuckDB's .NAME.tmp<pid>.wal) in a folder."""
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name)
