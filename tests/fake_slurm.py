"""A fake SLURM for tests: `sbatch`, `sacct`, `squeue`, `scontrol`, `srun`, `sacctmgr`, `sinfo`.

`install(bin_dir, state_dir)` writes one shim per command that runs this file, so a test puts
`bin_dir` first on PATH and drives the real `snakemake-executor-plugin-slurm` against it:
`sbatch` records its arguments (state_dir/submissions.jsonl) and runs the `--wrap` command in
the background as "job <id>" (SLURM_JOB_ID set, state in state_dir/jobs/<id>.json), `sacct` and
`squeue` report the jobs' states by job name, `srun` runs its command in place, and `scontrol
show config` reports a MinJobAge and MaxArraySize. `run-snakemake` runs Snakemake with the
plugin's status-poll delays shortened (it starts at 40 s and grows by 10 s per poll in which no
job finished).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

COMMANDS = ("sbatch", "sacct", "squeue", "scontrol", "srun", "sacctmgr", "sinfo")
POLL_SECONDS = 1


def install(bin_dir: Path, state_dir: Path) -> dict:
    """Write the shims; return the environment variables a test adds (PATH first)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "jobs").mkdir(parents=True, exist_ok=True)
    for command in COMMANDS:
        shim = bin_dir / command
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                        f"{shlex.quote(str(Path(__file__).resolve()))} {command} \"$@\"\n")
        shim.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state_dir)}


def submissions(state_dir: Path) -> list[dict]:
    """Every sbatch call: {"job_id", "argv", "options" (--key: value), "rule"}."""
    path = state_dir / "submissions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- the commands ----------------------------------------------------------------------------

def _state_dir() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def _options(argv: list[str]) -> dict:
    """sbatch options as {name: value} ('--mem 4000', '--gpus=1', '-p part' all understood)."""
    options, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            options[key] = value
        elif arg.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-") \
                and arg not in ("--parsable", "--requeue", "--no-requeue"):
            options[arg] = argv[i + 1]
            i += 1
        else:
            options[arg] = True
        i += 1
    return options


def _next_job_id(state: Path) -> int:
    for job_id in range(1000, 1_000_000):
        try:
            fd = os.open(state / "jobs" / f"{job_id}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        return job_id
    raise RuntimeError("fake sbatch: out of job ids")


def _write_job(state: Path, job_id: int, record: dict) -> None:
    path = state / "jobs" / f"{job_id}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def sbatch(argv: list[str]) -> int:
    state = _state_dir()
    options = _options(argv)
    wrap = options.get("--wrap")
    if not isinstance(wrap, str):
        print("sbatch: error: fake sbatch needs --wrap", file=sys.stderr)
        return 1
    job_id = _next_job_id(state)
    comment = options.get("--comment", "")
    record = {"job_id": job_id, "argv": argv, "options": options, "name": options.get("--job-name"),
              "rule": comment.removeprefix("rule_").split("_wildcards_")[0], "state": "PENDING"}
    _write_job(state, job_id, record)
    with open(state / "submissions.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log = str(options.get("--output", state / f"slurm-{job_id}.log")).replace("%j", str(job_id))
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    subprocess.Popen([sys.executable, __file__, "_run_job", str(job_id), log],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, env=os.environ.copy(), cwd=options.get("-D") or None)
    print(job_id if "--parsable" in options else f"Submitted batch job {job_id}")
    return 0


def _run_job(job_id: str, log: str) -> int:
    """The body of a batch job: run the --wrap command, then record how it ended."""
    state = _state_dir()
    record = json.loads((state / "jobs" / f"{job_id}.json").read_text())
    record["state"] = "RUNNING"
    _write_job(state, int(job_id), record)
    env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id,
           "SLURM_CPUS_PER_TASK": str(record["options"].get("--cpus-per-task", 1))}
    if record["options"].get("--gpus"):
        env["SLURM_GPUS"] = str(record["options"]["--gpus"])
    with open(log, "w") as out:
        code = subprocess.call(["/bin/sh", "-c", record["options"]["--wrap"]], stdout=out,
                               stderr=subprocess.STDOUT, env=env)
    record["state"], record["exit_code"] = ("COMPLETED" if code == 0 else "FAILED"), code
    _write_job(state, int(job_id), record)
    return 0


def _jobs() -> list[dict]:
    jobs = []
    for path in sorted((_state_dir() / "jobs").glob("*.json")):
        try:
            jobs.append(json.loads(path.read_text()))
        except json.JSONDecodeError:  # a job id just reserved, its record not yet written
            continue
    return jobs


def sacct(argv: list[str]) -> int:
    options = _options(argv)
    if "--name" not in options:  # account guess (`sacct -nu USER -o Account`)
        print(os.environ.get("FAKE_SLURM_ACCOUNT", "fake_account"))
        return 0
    for job in _jobs():
        if job["name"] == options["--name"]:
            print(f"{job['job_id']}|{job['state']}")
    return 0


def squeue(argv: list[str]) -> int:
    options = _options(argv)
    for job in _jobs():
        if job["name"] == options.get("--name"):
            print(f"{job['job_id']}|{job['state']}")
    return 0


def scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "config"]:
        print("MaxArraySize            = 1001\nMinJobAge               = 300 sec")
        return 0
    print(f"scontrol: fake scontrol does not know {' '.join(argv)}", file=sys.stderr)
    return 1


def sacctmgr(argv: list[str]) -> int:
    print(os.environ.get("FAKE_SLURM_ACCOUNT", "fake_account"))
    return 0


def sinfo(argv: list[str]) -> int:
    print("PARTITION\ncpu\ngpu")
    return 0


def srun(argv: list[str]) -> int:
    """Run the command after srun's options in place (a job step on the job's own node)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    if i == len(argv):
        print("srun: error: no command", file=sys.stderr)
        return 1
    return subprocess.call(argv[i:])


def run_snakemake(argv: list[str]) -> int:
    """Snakemake with the SLURM plugin's poll interval pinned to POLL_SECONDS."""
    import snakemake_executor_plugin_slurm as plugin
    from snakemake.cli import main

    check_active_jobs = plugin.Executor.check_active_jobs

    async def check_active_jobs_quickly(self, active_jobs):
        async for job in check_active_jobs(self, active_jobs):
            yield job
        self.next_seconds_between_status_checks = POLL_SECONDS

    plugin.Executor.check_active_jobs = check_active_jobs_quickly
    return main(argv)


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "_run_job":
        sys.exit(_run_job(*args))
    if command == "run-snakemake":
        sys.exit(run_snakemake(args))
    sys.exit(globals()[command](args))
