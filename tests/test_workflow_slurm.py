"""profiles/slurm through the real snakemake-executor-plugin-slurm, against a fake SLURM
(tests/fake_slurm.py: sbatch runs each job at once on this machine, sacct/squeue report it)."""

import sys

import pytest

import fake_slurm
from workflow_helpers import REPO, failed_logs, output_of, snakemake, tiny_study, write_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_study(tmp_path_factory):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    root = tmp_path_factory.mktemp("slurm")
    env = fake_slurm.install(root / "bin", root / "slurm")
    env["FAKE_SLURM_ACCOUNT"] = "CHANGE_ME_account"  # the profile's placeholder, as sacctmgr's answer
    # device auto: a cluster study; the fake runs on this machine's CPU
    study = tiny_study(root, name="slurm", seeds=(0,), conditions=("full", "relora"), device="auto")
    study["workflow"]["gpus"] = {"train": 2}  # torchrun, two processes (on this CPU: gloo)
    study_file = write_study(root / "study.yaml", study)
    workdir = root / "work"
    workdir.mkdir()
    result = snakemake(workdir, "--workflow-profile", str(REPO / "profiles/slurm"),
                       "--configfile", str(study_file), "--jobs", "2",
                       "--slurm-init-seconds-before-status-checks", "1",
                       "--slurm-keep-successful-logs",  # a job's log shows the command it ran
                       env=env, runner=[sys.executable, fake_slurm.__file__, "run-snakemake"],
                       timeout=1800)
    assert result.returncode == 0, output_of(result)[-6000:] + failed_logs(workdir)
    return workdir / "results/slurm", fake_slurm.submissions(root / "slurm")


def test_study_completes(slurm_study):
    results, submissions = slurm_study
    assert (results / "report.html").is_file()
    assert (results / "study.duckdb").is_file()
    for condition in ("full", "relora"):
        assert (results / f"runs/size=mini/condition={condition}/seed=0/dynamics.parquet").is_file()


def test_only_train_jobs_ask_for_a_gpu(slurm_study):
    _, submissions = slurm_study
    by_rule = {}
    for submission in submissions:
        by_rule.setdefault(submission["rule"], []).append(submission["options"])
    assert len(by_rule["train"]) == 2
    assert {"corpus", "tokenizer", "tokenize", "probe", "blimp", "manifest", "evaluate",
            "dynamics", "aggregate", "figures", "report"} <= set(by_rule)
    assert "all" not in by_rule  # a target rule runs where Snakemake runs
    for options in by_rule["train"]:
        assert options.get("--gpus") == "2", options
        assert options["-p"] == "CHANGE_ME_gpu_partition"
        assert options.get("--signal") == "TERM@300"  # the trainer saves its state and exits
    for rule, calls in by_rule.items():
        for options in calls:
            assert options["-A"] == "CHANGE_ME_account"
            assert "--requeue" in options
            assert options.get("--mem") and options.get("-t"), (rule, options)
            if rule != "train":  # the shrunk study evaluates on CPU (workflow.gpus.evaluate: 0)
                assert "--gpus" not in options and "--gres" not in options, (rule, options)
            if rule not in ("train", "evaluate"):
                assert options["-p"] == "CHANGE_ME_cpu_partition", (rule, options)


def test_a_train_job_with_two_gpus_runs_torchrun_with_two_processes(slurm_study):
    results, submissions = slurm_study
    import json
    from pathlib import Path

    trains = [s for s in submissions if s["rule"] == "train"]
    for submission in trains:
        log = Path(str(submission["options"]["--output"]).replace("%j", str(submission["job_id"])))
        assert ("python -m torch.distributed.run --standalone --nproc_per_node 2 -m relora train"
                in log.read_text()), log.read_text()[-3000:]
    for condition in ("full", "relora"):
        record = json.loads((results / f"runs/size=mini/condition={condition}/seed=0/run.json").read_text())
        assert record["world_size"] == 2


def test_threads_become_cpus_per_task(slurm_study):
    _, submissions = slurm_study
    for submission in submissions:
        if submission["rule"] in ("train", "evaluate", "dynamics"):
            assert submission["options"]["--cpus-per-task"] == "1"  # the study's workflow.threads
