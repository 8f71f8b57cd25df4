"""Faults under the real `snakemake`, on copies of the session's end-to-end study (e2e_study,
which is also the uninterrupted reference run): a train job killed, the whole Snakemake killed,
preemption signals, two train jobs at once, bad configs and targets.

Train jobs are slowed with the fault hooks (tests/fault_hooks: 0.3 s after each of the study's
12 steps, timing only) so that they can be interrupted mid-run; the resume state is saved every
4 steps (training.save_state_every in tests/workflow_helpers.py: tiny_study).
"""

import json
import os
import signal
import tempfile
from pathlib import Path

import pytest

from relora.data import verify_manifest
from reliability_helpers import (RUN_KEY, assert_same_run, copy_workdir, fault_env, kill_group,
                                 relora_processes, saved_step, start_snakemake, wait_for)
from workflow_helpers import load_yaml, output_of, snakemake, write_study

pytestmark = pytest.mark.slow

STEP_DELAY = 0.3


class Job:
    """Paths of one run's train job inside a copied study folder."""

    def __init__(self, workdir: Path, condition: str, seed: int):
        self.key = RUN_KEY.format(condition=condition, seed=seed)
        self.target = f"results/e2e/runs/{self.key}/run.json"
        self.run_dir = workdir / "results/e2e/runs" / self.key
        self.resume = workdir / "results/e2e/resume" / self.key
        self.resume_rel = f"results/e2e/resume/{self.key}"  # as the job names it in its log
        self.log = workdir / "results/e2e/logs/train" / f"{self.key}.log"

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ""

    def resumed_at(self) -> int | None:
        import re

        match = re.search(rf"resumed from {re.escape(self.resume_rel)}/state.pt at step (\d+)", self.log_text())
        return int(match.group(1)) if match else None


def _train_process(sm, job: Job, exclude=()):
    """The running `relora train` process of the job, once it is inside its training loop (its
    log, which the job's shell truncated at start, shows a step)."""
    def find():
        for process in relora_processes(sm, "train", job.key):
            if process.pid not in exclude and " step " in job.log_text():
                return process
        return None

    return find


def test_killed_training_resumes_under_snakemake(e2e_study, tmp_path):
    """SIGKILL the train job, then (on the rerun) the whole Snakemake process group; each rerun
    resumes from the last saved state, not from step 0, and the run ends bitwise equal to the
    uninterrupted one. Snakemake deletes the job's declared outputs before each rerun: the
    resume folder, not one of them, survives."""
    workdir = copy_workdir(e2e_study, tmp_path)
    job = Job(workdir, "relora", 0)
    env, study, out = fault_env(step_delay=STEP_DELAY), str(e2e_study.study_file), tmp_path / "snakemake.log"

    # 1. the job alone dies (OOM killer, node agent): Snakemake reports the failure
    sm = start_snakemake(workdir, job.target, "--cores", "1", "--configfile", study,
                         "--forcerun", job.target, env=env, log=out)
    wait_for(lambda: saved_step(job.resume) == 4, "the state of step 4", alive=sm)
    trainer = wait_for(_train_process(sm, job), "the train process", alive=sm)
    trainer.kill()
    assert sm.wait(timeout=120) != 0
    assert not (job.run_dir / "run.json").exists() and saved_step(job.resume) in (4, 8)
    first = saved_step(job.resume)

    # 2. rerun: resumes; then the whole Snakemake dies with it (the node goes away)
    sm = start_snakemake(workdir, job.target, "--cores", "1", "--configfile", study, env=env, log=out)
    wait_for(lambda: job.resumed_at() is not None and saved_step(job.resume) == 8, "the state of step 8",
             alive=sm)
    assert job.resumed_at() == first, job.log_text()
    kill_group(sm)
    assert not (job.run_dir / "run.json").exists() and saved_step(job.resume) == 8

    # 3. the user reruns as Snakemake says: unlock, then rerun the incomplete job
    unlock = snakemake(workdir, "--unlock", "--configfile", study)
    assert unlock.returncode == 0, output_of(unlock)
    sm = start_snakemake(workdir, job.target, "--cores", "1", "--configfile", study, "--rerun-incomplete",
                         env=env, log=out)
    assert sm.wait(timeout=300) == 0, out.read_text()[-4000:]
    assert job.resumed_at() == 8, job.log_text()
    assert_same_run(job.run_dir, e2e_study.results / "runs" / job.key)
    assert not job.resume.exists()  # published, then deleted


def test_preemption_signals_save_and_the_retry_continues(e2e_study, tmp_path):
    """SIGTERM (SLURM's preemption and time limit), then SIGUSR1 (an early warning signal) to the
    train job: each time it saves its state and exits with 128 + signum; Snakemake's retry
    continues from the saved step, and the run ends bitwise equal to the uninterrupted one."""
    workdir = copy_workdir(e2e_study, tmp_path)
    job = Job(workdir, "relora-paper", 1)
    out = tmp_path / "snakemake.log"
    sm = start_snakemake(workdir, job.target, "--cores", "1", "--configfile", str(e2e_study.study_file),
                         "--forcerun", job.target, "--retries", "2", env=fault_env(step_delay=STEP_DELAY),
                         log=out)
    seen, saved = [], []
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        trainer = wait_for(_train_process(sm, job, exclude=seen), "a train process in its loop", alive=sm)
        seen.append(trainer.pid)
        if saved:
            assert job.resumed_at() == saved[-1], job.log_text()
        trainer.send_signal(signum)
        trainer.wait(timeout=60)
        step = saved_step(job.resume)  # read before the retry (seconds to start) saves again
        assert step is not None and (not saved or step > saved[-1]), (saved, step)
        saved.append(step)
    assert sm.wait(timeout=300) == 0, out.read_text()[-4000:]
    text = out.read_text()  # Snakemake shows the exit status and the log of each failed attempt
    for signum, step in zip((signal.SIGTERM, signal.SIGUSR1), saved):
        assert f"returned non-zero exit status {128 + signum}" in text, text[-4000:]
        assert f"received signal {signum.name} at step {step}: state saved, exiting" in text, text[-4000:]
    assert job.resumed_at() == saved[-1] and 0 < saved[0] < saved[1] < 12, (saved, job.log_text())
    assert_same_run(job.run_dir, e2e_study.results / "runs" / job.key)


def test_two_training_jobs_at_once_share_nothing_writable(e2e_study, tmp_path):
    """`--cores 2`, two train jobs running together: every path either job writes (files opened
    for writing, renames, links, folders made or removed) is inside its own run or resume
    folder; the shared data folder is only read."""
    workdir = copy_workdir(e2e_study, tmp_path)
    jobs = [Job(workdir, "relora", 0), Job(workdir, "full", 1)]
    data = workdir / "results/e2e/data"
    data_before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    audit = tmp_path / "audit"
    targets = [job.target for job in jobs]
    result = snakemake(workdir, *targets, "--cores", "2", "--configfile", str(e2e_study.study_file),
                       "--forcerun", *targets, env=fault_env(step_delay=0.2, audit_dir=audit), timeout=600)
    assert result.returncode == 0, output_of(result)[-4000:]

    records = [_audit_record(path) for path in sorted(audit.glob("*.tsv"))]
    assert len(records) == 2, [r["argv"] for r in records]
    (a_start, a_end), (b_start, b_end) = ((r["times"][0], r["times"][-1]) for r in records)
    assert a_start < b_end and b_start < a_end, "the two jobs did not run at the same time"
    written = []
    for record in records:
        out = workdir / record["arg"]("--out")
        own = [out, workdir / record["arg"]("--resume-dir")]
        mine = set()
        for event, path in record["events"]:
            # the run folder is built beside its place and swapped in whole (.<name>.publishing,
            # the old one renamed to .<name>.replaced<pid> and removed): the run's own too
            beside = path.is_relative_to(out.parent) and path != out.parent and \
                path.relative_to(out.parent).parts[0].startswith(f".{out.name}.")
            if any(path.is_relative_to(d) for d in own) or beside:
                mine.add(path)
            elif event == "os.mkdir" and any(d.is_relative_to(path) for d in own):
                continue  # a parent folder made with exist_ok (results/e2e/resume/size=mini, ...)
            else:
                assert not path.is_relative_to(workdir), f"{record['argv']} wrote {path} ({event})"
                assert path.is_relative_to(tempfile.gettempdir()), f"{record['argv']} wrote {path} ({event})"
        written.append(mine)
    assert written[0] and written[1] and not written[0] & written[1]
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == data_before
    verify_manifest(data)  # sizes and hashes: the data the two jobs read is as it was
    for job in jobs:
        assert_same_run(job.run_dir, e2e_study.results / "runs" / job.key)


def _audit_record(path: Path) -> dict:
    lines = path.read_text().splitlines()
    _, cwd, argv = lines[0].split("\t")
    argv = json.loads(argv)
    events = [line.split("\t") for line in lines[1:]]
    return {"argv": argv, "times": [float(t) for t, _, _ in events],
            "events": [(event, Path(p)) for _, event, p in events],
            "arg": lambda name: Path(cwd) / argv[argv.index(name) + 1]}


# --- bad configs and targets through Snakemake ------------------------------------------------------

BAD_STUDIES = {
    "unknown-key": (lambda s: s["training"].update(lrr=1),
                    "training: Additional properties are not allowed ('lrr'"),
    "warmup-over-period": (lambda s: s["conditions"]["relora"]["training"]["schedule"].update(warmup=6),
                           "conditions.relora: schedule warmup 6 is longer than the reset period reset_every 4"),
    "unknown-reference": (lambda s: s["analysis"].update(reference_condition="baseline"),
                          "analysis.reference_condition: 'baseline' is not a condition of the study"),
}


@pytest.mark.parametrize("change, message", [
    (lambda s: s["training"].update(lrr=1), r"training: Additional properties are not allowed ('lrr'"),
    (lambda s: s["training"].update(steps="12"), "training.steps: '12' is not of type 'integer'"),
    (lambda s: s["conditions"]["relora"].update(reset_every=0), "conditions.relora.reset_every: 0 is less than"),
    (lambda s: s["conditions"]["relora"].update(reset_every=40), "conditions.relora.reset_every: 40 is not shorter"),
    (lambda s: s["conditions"]["relora"]["training"]["schedule"].update(warmup=6),
     "conditions.relora: schedule warmup 6 is longer than the reset period reset_every 4"),
    (lambda s: s["training"]["schedule"].update(warmup=20),
     "conditions.full: training.schedule.warmup 20 is longer than the schedule's horizon 12"),
    (lambda s: s["analysis"].update(reference_condition="baseline"),
     "analysis.reference_condition: 'baseline' is not a condition of the study"),
    (lambda s: s["analysis"].update(ablation_reference="lora"),
     "analysis.ablation_reference: 'lora' is not a condition of the study"),
    (lambda s: s["sizes"].update(odd={"d_model": 25, "n_layers": 1, "n_heads": 6, "n_kv_heads": 2}),
     "sizes.odd: d_model 25 is not divisible by n_heads 6"),
], ids=["unknown-key", "wrong-type", "reset-zero", "reset-longer-than-run", "warmup-over-period",
        "warmup-over-horizon", "unknown-reference", "unknown-ablation-reference", "impossible-size"])
def test_bad_study_is_refused_naming_the_key(e2e_study, tmp_path, capsys, change, message):
    """Through `relora` (every job's command; Snakemake validates with the same resolver)."""
    from relora.cli import main

    study = load_yaml(e2e_study.study_file)
    change(study)
    path = write_study(tmp_path / "bad.yaml", study)
    assert main(["describe", "--config", str(path)]) == 3
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("case", ["unknown-key", "warmup-over-period", "unknown-reference"])
def test_bad_study_fails_before_any_job_naming_the_key(e2e_study, tmp_path, case):
    """Through `snakemake --configfile`: before any job starts (a few cases: each Snakemake start
    costs seconds; every case goes through the same resolver in the test above)."""
    change, message = BAD_STUDIES[case]
    study = load_yaml(e2e_study.study_file)
    change(study)
    path = write_study(tmp_path / "bad.yaml", study)
    result = snakemake(tmp_path, "--cores", "1", "--configfile", str(path))
    assert result.returncode != 0
    assert message in output_of(result), output_of(result)[-3000:]
    assert not (tmp_path / "results").exists()  # no job ran, no file was written


def test_runs_outside_the_study_are_refused(e2e_study, tmp_path):
    """A size, condition or seed the study does not have is no job (the wildcard constraints
    come from the study), and Snakemake names the file it cannot make."""
    target = "results/e2e/runs/size=huge/condition=lora/seed=7/run.json"
    result = snakemake(tmp_path, target, "--dry-run", "--configfile", str(e2e_study.study_file))
    assert result.returncode != 0
    assert "MissingRuleException" in output_of(result) and target in output_of(result), output_of(result)
    assert not (tmp_path / "results/e2e/runs").exists()


def test_cli_names_unknown_sizes_and_conditions(e2e_study, tmp_path, capsys):
    """The same through `relora train` (what the rule calls): exit code 3 (an input error), the
    study's choices listed, nothing written."""
    from relora.cli import main

    for size, condition, message in (("huge", "full", "size 'huge' is not in the study (sizes: mini)"),
                                      ("mini", "lora", "condition 'lora' is not in the study (conditions: "
                                                       "full, relora-paper, relora)")):
        assert main(["train", "--config", str(e2e_study.study_file), "--size", size, "--condition", condition,
                     "--seed", "0", "--data", str(e2e_study.results / "data"), "--out", str(tmp_path / "o"),
                     "--resume-dir", str(tmp_path / "r")]) == 3
        assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
