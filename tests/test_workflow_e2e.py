"""The whole workflow, end to end, on the shrunk study run once per session (`e2e_study`)."""

import json
import shutil

import pytest
import yaml

from relora.config import load_study, resolve_run
from workflow_helpers import job_counts, output_of, planned_runs, snakemake, tree_listing, write_study

pytestmark = pytest.mark.slow

RUN_TABLES = ("run.json", "train_metrics.parquet", "perplexity.parquet", "blimp.parquet",
              "dynamics.parquet")


def test_study_produces_every_output(e2e_study):
    results = e2e_study.results
    for name in ("study.duckdb", "report.html", "data/manifest.json",
                 "data/train.npy", "data/tokenizer.json", "data/probe.npy"):
        assert (results / name).is_file(), name
    assert list((results / "data/eval").glob("*.parquet"))
    assert list((results / "data/blimp").glob("*.jsonl"))
    assert list((results / "figures").glob("*.png"))
    for run in e2e_study.run_dirs():
        for table in RUN_TABLES:
            assert (run / table).is_file(), run / table
        steps = sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))
        # every 6, and 1 step either side of the merges after 5 and 9 (full: the paired control)
        assert steps == [0, 4, 6, 8, 10, 12]
    # resumable state is published into the run directory and deleted when a run ends
    assert not list(results.glob("resume/**/state.pt"))
    # what the jobs read (results/<study>/config/)
    for stage in ("data", "blimp", "aggregate", "report"):
        assert (results / "config" / f"{stage}.yaml").is_file(), stage
    for stage in ("train", "evaluate", "dynamics"):
        for run in e2e_study.run_dirs():
            assert (results / "config" / stage / f"{run.relative_to(results / 'runs')}.yaml").is_file()


def test_each_run_reads_its_study_narrowed_to_it(e2e_study):
    """results/<study>/config/<stage>/<run>.yaml: one size, one seed, the run's condition (and,
    for the paired control `full`, the conditions whose merges set its analysis steps); it
    resolves to the same run as the whole study."""
    study = load_study(e2e_study.study_file)
    for run in e2e_study.run_dirs():
        key = run.relative_to(e2e_study.results / "runs")
        size, condition, seed = (part.split("=")[1] for part in key.parts)
        narrowed = load_study(e2e_study.results / "config/train" / f"{key}.yaml")
        assert list(narrowed["sizes"]) == [size] and narrowed["seeds"] == [int(seed)]
        expected = list(study["conditions"]) if condition == "full" else [condition]
        assert list(narrowed["conditions"]) == expected
        assert resolve_run(narrowed, size, condition, int(seed)) == resolve_run(study, size, condition, int(seed))


def test_every_heavy_job_has_a_log_and_a_benchmark(e2e_study):
    results = e2e_study.results
    for rule in ("train", "evaluate", "dynamics"):
        for run in e2e_study.run_dirs():
            key = run.relative_to(results / "runs")
            assert (results / "logs" / rule / f"{key}.log").is_file()
            assert (results / "benchmarks" / rule / f"{key}.tsv").is_file()
    for stage in ("corpus", "tokenizer", "tokenize", "probe", "blimp", "manifest"):
        assert (results / "logs/data" / f"{stage}.log").is_file()


def test_database_has_every_table_and_view(e2e_study):
    duckdb = pytest.importorskip("duckdb")
    with duckdb.connect(str(e2e_study.results / "study.duckdb"), read_only=True) as db:
        names = {row[0] for row in db.execute("select table_name from information_schema.tables").fetchall()}
        assert {"runs", "train_metrics", "dynamics", "perplexity", "blimp", "final", "gap"} <= names
        n_runs = len(e2e_study.run_dirs())
        assert db.execute("select count(*) from runs").fetchone()[0] == n_runs
        assert db.execute("select count(distinct (condition, seed)) from train_metrics").fetchone()[0] == n_runs
        # the data stage's unigram frequency baseline, one row per paradigm the runs evaluated
        uids = {r[0] for r in db.execute("select distinct uid from blimp").fetchall()}
        baseline = dict(db.execute("select uid, accuracy from blimp_baselines where baseline = 'unigram'").fetchall())
        assert set(baseline) == uids and all(0 <= a <= 1 for a in baseline.values())
        metrics = {r[0] for r in db.execute("select distinct metric from final").fetchall()}
        assert "blimp" in metrics and ("blimp_balanced" in metrics) == any(
            0.35 <= a <= 0.65 for a in baseline.values())
    manifest = json.loads((e2e_study.results / "data/manifest.json").read_text())
    assert "blimp_unigram.parquet" in manifest["files"]
    assert manifest["stages"]["blimp"]["unigram"]["counts_from"] == "train.npy"


def test_dynamics_around_merges_base_and_adapter_entries(e2e_study):
    duckdb = pytest.importorskip("duckdb")
    with duckdb.connect(str(e2e_study.results / "study.duckdb"), read_only=True) as db:
        steps = db.execute("SELECT condition, list(DISTINCT step ORDER BY step) FROM dynamics "
                           "GROUP BY condition").fetchall()
        assert {c: s for c, s in steps} == {c: [0, 4, 6, 8, 10, 12] for c in ("full", "relora-paper", "relora")}
        targets = dict(db.execute("SELECT condition, list(DISTINCT target ORDER BY target) FROM dynamics "
                                  "GROUP BY condition").fetchall())
        assert targets["full"] == ["activation", "base", "gradient", "update", "weight"]
        assert targets["relora"] == ["activation", "adapter", "adapter_A", "base", "gradient", "update", "weight"]
        # 14 adapters per run and step, each with both adapter_A entry metrics, all finite
        n, finite = db.execute("SELECT count(*), count(*) FILTER (WHERE isfinite(value)) FROM dynamics "
                               "WHERE target = 'adapter_A' AND condition = 'relora' AND metric IN "
                               "('max_abs_over_init_bound', 'entries_over_3x_bound')").fetchone()
        assert n == finite == len(e2e_study.study["seeds"]) * 6 * 14 * 2
        # A against A at the previous analysed step: re-drawn exactly when a merge lies between
        restarted = db.execute("""
            SELECT d.seed, d.step, min(d.value), max(d.value) FROM dynamics d
            WHERE d.condition = 'relora' AND d.metric = 'adapter_A_restarted' GROUP BY ALL""").fetchall()
        merges = {(seed, step) for seed, step in db.execute(
            "SELECT seed, step FROM train_metrics WHERE condition = 'relora' AND merged").fetchall()}
        analysed = [0, 4, 6, 8, 10, 12]
        assert len(restarted) == len(e2e_study.study["seeds"]) * 5
        for seed, step, low, high in restarted:
            previous = analysed[analysed.index(step) - 1]
            expected = float(any((seed, m) in merges for m in range(previous + 1, step + 1)))
            assert low == high == expected, (seed, step, low, high)
    for name in ("rank_around_merges", "adapter_a_outliers"):
        assert (e2e_study.results / "figures" / f"{name}.png").is_file()


def test_nothing_left_to_do_after_the_run(e2e_study):
    result = snakemake(e2e_study.workdir, "--dry-run", "--configfile", str(e2e_study.study_file))
    assert result.returncode == 0, output_of(result)
    assert "Nothing to be done" in output_of(result), output_of(result)


@pytest.fixture
def copied_study(e2e_study, tmp_path):
    """A copy of the completed study (outputs, mtimes and Snakemake's records), to edit."""
    workdir = tmp_path / "work"
    shutil.copytree(e2e_study.workdir, workdir, symlinks=True)
    return workdir, yaml.safe_load(e2e_study.study_file.read_text())


def dry_run_with(workdir, study, tmp_path):
    """A dry run with the changed study; it writes nothing (what the jobs read stays as the run
    left it)."""
    path = write_study(tmp_path / "changed.yaml", study)
    before = tree_listing(workdir)
    result = snakemake(workdir, "--dry-run", "--configfile", str(path))
    assert result.returncode == 0, output_of(result)
    assert tree_listing(workdir) == before
    return result


def test_changing_one_condition_reruns_only_its_jobs(copied_study, tmp_path):
    workdir, study = copied_study
    study["conditions"]["relora"]["training"]["lr"] = 1.0e-3
    result = dry_run_with(workdir, study, tmp_path)
    relora_runs = {f"size=mini/condition=relora/seed={n}" for n in study["seeds"]}
    for rule in ("train", "evaluate", "dynamics"):
        assert planned_runs(result, rule) == relora_runs, rule
    assert planned_runs(result, "run_config") == relora_runs  # its train, evaluate, dynamics files
    counts = job_counts(result)
    assert counts["run_config"] == 3 * len(relora_runs)
    assert not {"corpus", "tokenizer", "tokenize", "probe", "blimp", "manifest"} & set(counts)
    assert counts["study_config"] == 2  # aggregate's and report's files
    assert counts["aggregate"] == counts["figures"] == counts["report"] == 1


def test_changing_one_runs_steps_reruns_only_its_jobs(copied_study, tmp_path):
    """The paired control's steps: only its runs' files and jobs (and the results)."""
    workdir, study = copied_study
    study["conditions"]["full"]["training"] = {"steps": 10}
    result = dry_run_with(workdir, study, tmp_path)
    full_runs = {f"size=mini/condition=full/seed={n}" for n in study["seeds"]}
    for rule in ("run_config", "train", "evaluate", "dynamics"):
        assert planned_runs(result, rule) == full_runs, rule
    counts = job_counts(result)
    assert set(counts) == {"run_config", "train", "evaluate", "dynamics", "study_config", "aggregate",
                           "figures", "report", "all"}, counts


def test_changing_how_often_training_logs_retrains_nothing(copied_study, tmp_path):
    """A setting the train job reads that changes none of its outputs re-runs no run job (the
    database, which records every run's settings, is rebuilt)."""
    workdir, study = copied_study
    study["training"]["log_every"] = 2
    counts = job_counts(dry_run_with(workdir, study, tmp_path))
    assert not {"run_config", "train", "evaluate", "dynamics", "corpus", "tokenize", "blimp"} & set(counts), counts
    assert counts["aggregate"] == 1


def test_changing_blimp_reruns_evaluation_not_training(copied_study, tmp_path):
    workdir, study = copied_study
    study["evaluation"]["blimp"]["pairs_per_paradigm"] = 3
    counts = job_counts(dry_run_with(workdir, study, tmp_path))
    assert counts["blimp"] == 1
    assert counts["evaluate"] == len(study["seeds"]) * len(study["conditions"])
    assert not {"train", "dynamics", "corpus", "tokenize"} & set(counts)


def test_changing_the_balanced_range_reaggregates_only(copied_study, tmp_path):
    workdir, study = copied_study
    study["evaluation"]["blimp"]["balanced_range"] = [0.4, 0.6]
    counts = job_counts(dry_run_with(workdir, study, tmp_path))
    assert counts.get("aggregate") == 1
    assert not {"blimp", "evaluate", "train", "tokenize"} & set(counts)


def test_scheduling_changes_rerun_nothing(copied_study, tmp_path):
    workdir, study = copied_study
    study["workflow"]["threads"]["train"] = 2
    study["workflow"]["mem_mb"] = {"evaluate": 1234}
    result = dry_run_with(workdir, study, tmp_path)
    assert "Nothing to be done" in output_of(result), output_of(result)


def test_snakemake_report_has_the_figures(e2e_study, copied_study):
    workdir, _ = copied_study
    result = snakemake(workdir, "--report", "snakemake_report.zip",
                       "--configfile", str(e2e_study.study_file), timeout=900)
    assert result.returncode == 0, output_of(result)
    import zipfile

    names = zipfile.ZipFile(workdir / "snakemake_report.zip").namelist()
    assert any(n.endswith("train_loss.png") for n in names), names[:20]
    assert any(n.endswith("report.html") and "/data/raw/" in n for n in names), names[:20]


def test_report_settings_redraw_without_reaggregating(copied_study, tmp_path):
    workdir, study = copied_study
    study["report"] = {"title": "Another title"}
    counts = job_counts(dry_run_with(workdir, study, tmp_path))
    assert set(counts) == {"study_config", "figures", "report", "all"}, counts
