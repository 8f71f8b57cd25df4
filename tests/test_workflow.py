"""The Snakemake workflow without running a training job: every study dry-runs with the DAG the
resolver implies and a dry run writes nothing, `--lint` is clean, a `--configfile` replaces
config.yaml, bad configs fail early."""

import copy
import shutil
import subprocess

import pytest

from relora.config import load_study, resolve_run, runs
from workflow_helpers import (REPO, STUDIES, job_counts, load_yaml, output_of, planned_runs,
                              snakemake, tiny_study, tree_listing, write_study)


@pytest.fixture
def workdir(tmp_path):
    """A working folder holding a copy of the default study, as a fresh clone's root does."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    return tmp_path


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_study_is_valid(path):
    study = load_study(path)
    for size, condition, seed in runs(study):
        resolve_run(study, size, condition, seed)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_study_dry_runs(workdir, path):
    result = snakemake(workdir, "--dry-run", "--configfile", str(path))
    assert result.returncode == 0, output_of(result)
    study = load_study(path)
    n_runs = len(runs(study))
    counts = job_counts(result)
    for rule in ("train", "evaluate", "dynamics"):
        assert counts[rule] == n_runs, (rule, counts)
    # what the jobs read: a file per run and stage (train, evaluate, dynamics), one per data and
    # results stage (data, blimp, aggregate, report)
    assert counts["run_config"] == 3 * n_runs and counts["study_config"] == 4, counts
    for rule in ("corpus", "tokenizer", "tokenize", "probe", "blimp", "manifest",
                 "aggregate", "figures", "report"):
        assert counts[rule] == 1, (rule, counts)
    assert planned_runs(result) == {f"size={s}/condition={c}/seed={n}" for s, c, n in runs(study)}


def test_default_study_is_config_yaml(workdir):
    result = snakemake(workdir, "--dry-run")
    assert result.returncode == 0, output_of(result)
    study = load_study(REPO / "config.yaml")
    assert planned_runs(result) == {f"size={s}/condition={c}/seed={n}" for s, c, n in runs(study)}
    assert f"results/{study['study']}/report.html" in output_of(result)


def study_as_jobs_read_it(workdir, name, *args):
    """Run only the job writing results/<name>/config/aggregate.yaml (the whole study, as the
    database job reads it) and load the file."""
    target = f"results/{name}/config/aggregate.yaml"
    result = snakemake(workdir, "--cores", "1", target, *args)
    assert result.returncode == 0, output_of(result)
    return load_yaml(workdir / target)


def git_status(workdir):
    """`git status --porcelain --ignored` of every file, less Snakemake's own .snakemake/."""
    text = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                          cwd=workdir, capture_output=True, text=True, check=True).stdout
    return sorted(line for line in text.splitlines() if not line[3:].startswith(".snakemake/"))


@pytest.mark.parametrize("study", ["default", "other", "shrunk"])
def test_dry_run_writes_nothing(workdir, tmp_path_factory, study):
    """`snakemake -n` writes no file outside .snakemake/ (what the jobs read is written by jobs):
    the default study, another study name, and the shrunk test study, in a folder that already
    holds an earlier study's results."""
    args = []
    if study != "default":
        root = tmp_path_factory.mktemp("studies")
        spec = tiny_study(root) if study == "shrunk" else {**load_yaml(REPO / "config.yaml"),
                                                             "study": "other"}
        args = ["--configfile", str(write_study(root / f"{study}.yaml", spec))]
    (workdir / "results/earlier").mkdir(parents=True)
    (workdir / "results/earlier/study.yaml").write_text("study: earlier\n")
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    status, listing = git_status(workdir), tree_listing(workdir)
    result = snakemake(workdir, "--dry-run", *args)
    assert result.returncode == 0, output_of(result)
    assert "rule train:" in output_of(result)
    assert git_status(workdir) == status
    assert tree_listing(workdir) == listing


@pytest.mark.parametrize("edit, expected_runs, key, value", [
    ("seeds=[0,1]", 12, ("seeds",), [0, 1]),
    ("training={steps: 120, lr: 1e-3}", 6, ("training", "lr"), 1e-3),
])
def test_config_edits_numbers_lists_and_nested_keys(workdir, edit, expected_runs, key, value):
    """`--config` edits of numbers inside lists and mappings reach the study as numbers."""
    result = snakemake(workdir, "--dry-run", "--config", edit)
    assert result.returncode == 0, output_of(result)
    assert job_counts(result)["train"] == expected_runs
    study = study_as_jobs_read_it(workdir, "default", "--config", edit)
    for part in key:
        study = study[part]
    assert study == value


def test_configfile_replaces_config_yaml(workdir, tmp_path_factory):
    """docs/design.md, Studies: nothing of config.yaml (its sizes, conditions, seeds) leaks into a
    study given with --configfile, although Snakemake itself would merge the two."""
    default = load_yaml(REPO / "config.yaml")
    other = copy.deepcopy(default)
    other["study"] = "other"
    other["sizes"] = {"mini": {"d_model": 24, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2}}
    other["conditions"] = {"full": {"method": "full"}}
    other["seeds"] = [3]
    path = write_study(tmp_path_factory.mktemp("studies") / "other.yaml", other)
    result = snakemake(workdir, "--dry-run", "--configfile", str(path))
    assert result.returncode == 0, output_of(result)
    assert planned_runs(result) == {"size=mini/condition=full/seed=3"}
    assert "results/default" not in output_of(result)
    # what the jobs read is the replacing study alone
    written = study_as_jobs_read_it(workdir, "other", "--configfile", str(path))
    assert set(written["sizes"]) == {"mini"} and set(written["conditions"]) == {"full"}
    assert written["seeds"] == [3]


def test_config_overrides_still_apply(workdir):
    """--config (without --configfile) still edits the default study, key by key."""
    result = snakemake(workdir, "--dry-run", "--config", "study=renamed")
    assert result.returncode == 0, output_of(result)
    study = load_study(REPO / "config.yaml")
    assert len(planned_runs(result)) == len(runs(study))
    assert "results/renamed/report.html" in output_of(result)
    written = study_as_jobs_read_it(workdir, "renamed", "--config", "study=renamed")
    assert written["sizes"] == study["sizes"]


def test_invalid_study_fails_before_any_job_naming_the_key(workdir, tmp_path_factory):
    bad = load_yaml(REPO / "config.yaml")
    bad["training"]["lr"] = -1
    path = write_study(tmp_path_factory.mktemp("studies") / "bad.yaml", bad)
    result = snakemake(workdir, "--cores", "1", "--configfile", str(path))
    assert result.returncode != 0
    assert "training.lr" in output_of(result)
    assert not (workdir / "results").exists()


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_lint_is_clean(workdir, path):
    result = snakemake(workdir, "--lint", "--configfile", str(path))
    assert result.returncode == 0, output_of(result)
    assert "Lints for" not in output_of(result), output_of(result)


def test_train_resources_follow_the_study(workdir):
    """Threads reach torch; train jobs ask for a GPU unless the study trains on CPU."""
    result = snakemake(workdir, "--dry-run", "--cores", "8", "--printshellcmds",
                       "--configfile", str(REPO / "workflow/studies/paper.yaml"))
    assert result.returncode == 0, output_of(result)
    text = output_of(result)
    train_blocks = [b for b in text.split("\n\n") if "rule train:" in b]
    threads = load_study(REPO / "workflow/studies/paper.yaml")["workflow"]["threads"]["train"]
    assert train_blocks and all("gpu=1" in b and f"--threads {min(threads, 8)}" in b
                                for b in train_blocks)
    for rule, gpus in (("evaluate", 1), ("dynamics", 0), ("aggregate", None)):
        blocks = [b for b in text.split("\n\n") if f"rule {rule}:" in b]
        assert blocks and all((f"gpu={gpus}" in b) if gpus is not None else ("gpu=" not in b)
                              for b in blocks), rule
    # each train job carries its estimated peak GPU memory at its micro-batch (relora/memory.py)
    import math
    import re

    from relora.config import resolve_run
    from relora.memory import training_memory
    from relora.model_config import ModelConfig

    study = load_study(REPO / "workflow/studies/paper.yaml")
    for block in train_blocks:
        size, condition = re.search(r"size=([^,\s]+), condition=([^,\s]+)", block).groups()
        run = resolve_run(study, size, condition, 0)
        peak = training_memory(ModelConfig(**run["model"]), 64, run["method"], "bf16")["peak"]
        assert f"gpu_mem_mb={math.ceil(peak / 2**20)}" in block, block
    default = snakemake(workdir, "--dry-run")
    assert all("gpu=0" in b and "gpu_mem_mb=0" in b for b in output_of(default).split("\n\n") if "rule train:" in b)


def test_a_train_job_on_several_gpus_runs_torchrun(workdir, tmp_path):
    """workflow.gpus.train: 4 asks for 4 GPUs and starts one process per GPU with torchrun,
    the job's threads shared among them; the runtime estimate is a quarter of one GPU's (plus
    the fixed 10 minutes)."""
    import re

    import yaml

    study = yaml.safe_load((REPO / "workflow/studies/paper.yaml").read_text())
    blocks = {}
    for gpus in (1, 4):
        study["workflow"]["gpus"]["train"] = gpus
        study["workflow"]["runtime_limit"] = None
        path = tmp_path / f"paper-{gpus}.yaml"
        path.write_text(yaml.safe_dump(study))
        result = snakemake(workdir, "--dry-run", "--cores", "8", "--printshellcmds", "--configfile", str(path))
        assert result.returncode == 0, output_of(result)
        blocks[gpus] = [b for b in output_of(result).split("\n\n") if "rule train:" in b]
    assert blocks[4] and all("gpu=4" in b and "--threads 2 " in b and
                             "python -m torch.distributed.run --standalone --nproc_per_node 4 -m relora train " in b
                             for b in blocks[4])
    assert all("torch.distributed.run" not in b and "python -m relora train " in b for b in blocks[1])
    runtimes = {gpus: {re.search(r"wildcards: (.*)", b)[1]: int(re.search(r"runtime=(\d+)", b)[1]) for b in found}
                for gpus, found in blocks.items()}
    assert runtimes[1].keys() == runtimes[4].keys()
    for run, minutes in runtimes[1].items():
        assert runtimes[4][run] - 10 == pytest.approx((minutes - 10) / 4, abs=1)
