"""Faults injected into single stages, through the `relora` command line, on copies of the
session's end-to-end study (tests/conftest.py: e2e_study): corrupt data and checkpoints, a full
disk, a diverging run, kills and failures while the results are written, bad input files.

What is not repeated here because it is tested already: schema and semantic config errors
(tests/test_config.py), NaN loss in the Trainer, SIGKILL/SIGTERM/SIGUSR1 of `relora train`, stale
resume state and truncated checkpoints (tests/test_train.py), manifest corruption at the data
API (tests/test_data_shards.py), malformed BLiMP files (tests/test_data_blimp.py), empty and
malformed corpus files (tests/test_data_corpus.py). Snakemake-level faults are in
tests/test_reliability_workflow.py.
"""

import errno
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from relora.checkpoint import load_checkpoint
from relora.cli import main
from reliability_helpers import (RUN_KEY, assert_same_run, complete_file, fault_env,
                                 temporary_leftovers)

pytestmark = pytest.mark.slow  # every test here reads the session's Snakemake-built study

RUN = RUN_KEY.format(condition="relora", seed=0)


@pytest.fixture
def study(e2e_study, tmp_path):
    """Copies of the study's data folder and one finished run, and the paths to run commands."""
    data = tmp_path / "data"
    shutil.copytree(e2e_study.results / "data", data, ignore=shutil.ignore_patterns("corpus"))
    run = tmp_path / "run"
    shutil.copytree(e2e_study.results / "runs" / RUN, run)

    class Study:
        config = e2e_study.results / "config/aggregate.yaml"  # the validated study, as a job reads it
        raw = yaml.safe_load(e2e_study.study_file.read_text())
        reference = e2e_study.results / "runs" / RUN
        results = e2e_study.results

    Study.data, Study.run, Study.tmp = data, run, tmp_path
    return Study


def train_args(study, condition="relora", *extra):
    return ["train", "--config", str(study.config), "--size", "mini", "--condition", condition,
            "--seed", "0", "--data", str(study.data), "--out", str(study.tmp / "out"),
            "--resume-dir", str(study.tmp / "resume"), "--threads", "1", *extra]


def stage_args(study, command, *extra):
    return [command, "--config", str(study.config), "--data", str(study.data), "--run", str(study.run),
            "--out-dir", str(study.tmp / "tables"), "--threads", "1", *extra]


@pytest.fixture
def no_metrics(monkeypatch):
    """Fail the test if any metric is computed (the commands import these when they run)."""
    def computed(*args, **kwargs):
        raise AssertionError("a metric was computed")

    for name in ("relora.evaluate.score_documents", "relora.evaluate.blimp_scores",
                 "relora.dynamics.analyse_checkpoints"):
        monkeypatch.setattr(name, computed)


def alter(path: Path) -> None:
    """Change one byte in the middle of a file, keeping its size."""
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# --- corrupt data and checkpoints -----------------------------------------------------------------

@pytest.mark.parametrize("fault, message", [
    ("altered", r"train.npy: sha256 differs from the manifest"),
    ("truncated", r"train.npy: \d+ bytes, the manifest says \d+"),
])
def test_corrupt_training_tokens_stop_train_before_a_step(study, capsys, fault, message):
    path = study.data / "train.npy"
    if fault == "altered":  # a different but valid token: only the hash can tell
        tokens = np.load(path)
        tokens[len(tokens) // 2] = (tokens[len(tokens) // 2] + 1) % 300
        np.save(path, tokens)
    else:
        truncate(path)
    assert main(train_args(study)) == 3
    err = capsys.readouterr().err
    assert str(study.data / "train.npy") in err and re.search(message, err), err
    assert not (study.tmp / "out").exists() and not (study.tmp / "resume").exists()


@pytest.mark.parametrize("name, fault, message", [
    ("eval/alpha.parquet", alter, "sha256 differs from the manifest"),
    ("eval/beta.parquet", truncate, "bytes, the manifest says"),
    ("eval/beta.parquet", Path.unlink, "missing (the manifest lists it)"),
    ("blimp/gen_npi_no_ever.jsonl", truncate, "bytes, the manifest says"),
    ("blimp/gen_subject_verb_agreement.jsonl", alter, "sha256 differs from the manifest"),
    ("tokenizer.json", alter, "sha256 differs from the manifest"),
    ("eval/stray.parquet", lambda p: shutil.copy(p.parent / "alpha.parquet", p), "lists no file 'eval/stray.parquet'"),
])
def test_corrupt_evaluation_data_is_named_before_any_metric(study, capsys, no_metrics, name, fault, message):
    fault(study.data / name)
    assert main(stage_args(study, "evaluate")) == 3
    err = capsys.readouterr().err
    assert name.split("/")[-1] in err and message in err, err
    assert not (study.tmp / "tables").exists()


@pytest.mark.parametrize("fault, message", [(alter, "sha256 differs"), (truncate, "bytes, the manifest says")])
def test_corrupt_probe_is_named_before_any_metric(study, capsys, no_metrics, fault, message):
    fault(study.data / "probe.npy")
    assert main(stage_args(study, "dynamics")) == 3
    err = capsys.readouterr().err
    assert f"{study.data / 'probe.npy'}: " in err and message in err, err
    assert not (study.tmp / "tables").exists()


@pytest.mark.parametrize("command, step, fault", [("evaluate", 12, truncate), ("dynamics", 12, alter),
                                                  ("evaluate", 6, alter)])
def test_corrupt_checkpoint_is_named_before_any_metric(study, capsys, no_metrics, command, step, fault):
    """Every checkpoint a command reads is verified before the first is used: a bad last one
    does not cost the evaluation of all the others first."""
    weights = study.run / "checkpoints" / f"step_{step}" / "model.safetensors"
    fault(weights)
    assert main(stage_args(study, command)) == 3
    err = capsys.readouterr().err
    assert f"{weights}: sha256 differs from config.json (truncated or altered checkpoint)" in err, err
    assert not (study.tmp / "tables").exists()


def test_data_tokenized_for_another_vocabulary_is_refused(study, capsys):
    """A run config whose data.tokenizer.vocab_size is not the one the data was built with."""
    assert main(train_args(study, "full", "--set", "data.tokenizer.vocab_size=512")) == 3
    err = capsys.readouterr().err
    assert f"{study.data / 'manifest.json'}: the data was tokenized with a vocabulary of 320 tokens" in err
    assert "data.tokenizer.vocab_size is 512" in err


def test_state_whose_checkpoints_are_gone_is_not_resumed(study, caplog):
    """A resume folder that lost a checkpoint (a publish killed while deleting the folder, a
    hand-cleaned disk) must not be resumed from: the run would be published without it."""
    assert main(train_args(study, "relora", "--stop-after", "8")) == 0
    resume = study.tmp / "resume"
    shutil.rmtree(resume / "checkpoints" / "step_6")
    with caplog.at_level("INFO", logger="relora.train"):
        assert main(train_args(study)) == 0
    assert "checkpoint(s) [6] of the saved state are missing; starting from step 0" in caplog.text
    assert_same_run(study.tmp / "out", study.reference)


def test_altered_resume_state_is_not_resumed_from(study, caplog):
    """One flipped bit in a tensor of state.pt: torch.load reads it without complaint, the CRC-32
    of its zip record does not match; the run starts over instead of resuming wrong weights."""
    import zipfile

    assert main(train_args(study, "relora", "--stop-after", "8")) == 0
    state = study.tmp / "resume" / "state.pt"
    with zipfile.ZipFile(state) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    blob = bytearray(state.read_bytes())
    data_start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra)
    blob[data_start + record.file_size // 2] ^= 0x04
    state.write_bytes(bytes(blob))
    torch.load(state, weights_only=False)  # the damage is invisible to torch
    with caplog.at_level("INFO", logger="relora.train"):
        assert main(train_args(study)) == 0
    assert f"{state}: unreadable resume state (CRC-32 of {record.filename} does not match" in caplog.text
    assert "starting from step 0" in caplog.text and "resumed from" not in caplog.text
    assert_same_run(study.tmp / "out", study.reference)


# --- a diverging run, a full disk ------------------------------------------------------------------

def test_nan_loss_from_the_command_line_keeps_only_good_checkpoints(study, capsys):
    """lr 1e3 (written as a user would, `1e3`, which YAML 1.1 reads as a string): the run stops
    with exit code 4 naming the step; no NaN reaches a checkpoint or the resume state."""
    assert main(train_args(study, "full", "--set", "training.lr=1e3")) == 4
    err = capsys.readouterr().err
    assert re.search(r"error: (loss|gradient norm) is (nan|inf) at step \d+", err), err
    resume = study.tmp / "resume"
    checkpoints = sorted((resume / "checkpoints").glob("step_*"))
    assert checkpoints and not (study.tmp / "out" / "run.json").exists()
    for step_dir in checkpoints:
        weights = load_file(step_dir / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), step_dir
    state = torch.load(resume / "state.pt", weights_only=False)
    assert all(torch.isfinite(w).all() for w in state["model"].values())


def test_disk_full_while_writing_a_checkpoint(study, capsys, caplog, monkeypatch):
    """ENOSPC in the middle of writing checkpoint step_12 (after state 8 and the checkpoints of
    steps 0 to 10): a clear error naming the checkpoint, nothing half-written left, the earlier
    checkpoints and state intact; once there is space again the run resumes and ends as if
    nothing happened."""
    from relora.config import load_study, resolve_run

    earlier = [k for k in resolve_run(load_study(study.config), "mini", "relora", 0)["steps"]["checkpoint"]
               if k < 12]  # every 6, and around the merges (analysis.around_merges)
    import safetensors.torch

    save_file = safetensors.torch.save_file

    def disk_full(tensors, filename, *args, **kwargs):
        if "step_12" in str(filename):
            Path(filename).write_bytes(b"\0" * 100)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    assert main(train_args(study)) == 3
    err = capsys.readouterr().err
    resume = study.tmp / "resume"
    assert (f"error: {resume / 'checkpoints' / 'step_12'}: could not write the checkpoint "
            "([Errno 28] No space left on device)") in err, err
    assert sorted(p.name for p in (resume / "checkpoints").iterdir()) == sorted(f"step_{k}" for k in earlier)
    assert earlier == [0, 4, 6, 8, 10]  # no temporary folder either
    for step in earlier:
        load_checkpoint(resume / "checkpoints" / f"step_{step}")  # verifies the sha256
    assert torch.load(resume / "state.pt", weights_only=False)["step"] == 8
    assert not (study.tmp / "out" / "run.json").exists()

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with caplog.at_level("INFO", logger="relora.train"):
        assert main(train_args(study)) == 0
    assert f"resumed from {resume / 'state.pt'} at step 8" in caplog.text
    assert_same_run(study.tmp / "out", study.reference)


def test_disk_full_while_saving_the_resume_state(study, capsys, monkeypatch):
    """ENOSPC half-way through state.pt at step 8: the state of step 4 stays, whole."""
    real_save = torch.save
    calls = []

    def disk_full(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"PK\3\4 partial")
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed "
                               "writing file data/3: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(train_args(study)) == 3
    err = capsys.readouterr().err
    state = study.tmp / "resume" / "state.pt"
    assert f"error: {state}: could not save the resume state (" in err and "file write failed" in err, err
    assert torch.load(state, weights_only=False)["step"] == 4
    assert not temporary_leftovers(state.parent)


# --- results: failures and kills while writing ------------------------------------------------------

@pytest.fixture
def results(e2e_study, tmp_path):
    """A copy of the finished results (database, figures, report) and the commands that write them."""
    root = tmp_path / "results"
    root.mkdir()
    for name in ("study.duckdb", "report.html"):
        shutil.copy2(e2e_study.results / name, root / name)
    shutil.copytree(e2e_study.results / "figures", root / "figures")
    runs = [str(p) for p in e2e_study.run_dirs()]
    config, manifest = e2e_study.results / "config/data.yaml", e2e_study.results / "data" / "manifest.json"
    return root, {
        "study.duckdb": ["aggregate", "--config", str(config), "--runs", *runs, "--out", str(root / "study.duckdb")],
        "figures/train_loss.svg": ["figures", "--db", str(root / "study.duckdb"), "--out-dir", str(root / "figures"),
                                   "--only", "train_loss", "learning_rate"],
        "report.html": ["report", "--config", str(config), "--db", str(root / "study.duckdb"), "--figures",
                        str(root / "figures"), "--manifest", str(manifest), "--out", str(root / "report.html")],
    }


def _bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _partial_then_full(monkeypatch, method: str, target_suffix: str):
    """Path.<method> writes half its data, then the disk is full, for files named *suffix*."""
    real = getattr(Path, method)

    def partial(self, data, *args, **kwargs):
        if target_suffix in self.name:
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, method, partial)


@pytest.mark.parametrize("target", ["study.duckdb", "figures/train_loss.svg", "report.html"])
def test_failed_write_leaves_the_old_results_whole(results, monkeypatch, capsys, target):
    """A failure half-way through writing the database, a figure or the report (a full disk
    here) leaves the previous file byte for byte, and no temporary file; the rerun rebuilds."""
    root, commands = results
    before = _bytes(root)
    if target == "study.duckdb":  # DuckDB writes from C++: fail it between two tables
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("relora.statistics.add_statistics", full)
    else:
        _partial_then_full(monkeypatch, "write_text", Path(target).name)  # SVG, HTML: text
    assert main(commands[target]) == 3
    assert "No space left on device" in capsys.readouterr().err
    after = _bytes(root)
    assert after[target] == before[target]  # the old file, whole
    assert all(after[name] == data or complete_file(root / name) for name, data in before.items())
    assert not temporary_leftovers(root) and not temporary_leftovers(root / "figures")

    monkeypatch.undo()
    assert main(commands[target]) == 0
    assert complete_file(root / target)
    assert not temporary_leftovers(root) and not temporary_leftovers(root / "figures")


@pytest.mark.parametrize("target", ["study.duckdb", "figures/train_loss.svg", "report.html"])
def test_killed_write_leaves_the_old_results_whole(results, target):
    """SIGKILL of `relora aggregate|figures|report` at the moment its new file is complete under
    its temporary name: the file where readers look is the old one, whole; the rerun rebuilds."""
    root, commands = results
    before = _bytes(root)
    killed = subprocess.run([sys.executable, "-m", "relora", *commands[target]], capture_output=True,
                            env=fault_env(kill_on_replace=Path(target).name), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    after = _bytes(root)
    for name, data in before.items():  # every complete file is the old one or a new whole one
        assert after[name] == data or complete_file(root / name), name
    assert after[target] == before[target]
    assert main(commands[target]) == 0
    assert complete_file(root / target)


# --- bad input files through the command line ------------------------------------------------------

def write_study(study, tmp_path, **data_changes):
    raw = json.loads(json.dumps(study.raw))
    for dotted, value in data_changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_empty_corpus_domain_is_named(study, capsys):
    empty = study.tmp / "gamma.jsonl"
    empty.write_text("")
    config = write_study(study, study.tmp, data__corpus__files={"gamma": [str(empty)]})
    assert main(["corpus", "--config", str(config), "--out", str(study.tmp / "corpus")]) == 3
    assert "domain 'gamma' is empty" in capsys.readouterr().err


def test_blimp_file_with_missing_fields_is_named(study, capsys):
    folder = study.tmp / "my_blimp"
    folder.mkdir()
    good = json.loads((study.data / "blimp" / "gen_npi_no_ever.jsonl").read_text().splitlines()[0])
    good = {**good, "UID": "npi_no_ever", "pairID": "0"}
    bad = {k: v for k, v in good.items() if k not in ("sentence_bad", "field")}
    (folder / "npi_no_ever.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    config = write_study(study, study.tmp, evaluation__blimp={"source": str(folder)})
    assert main(["blimp", "--config", str(config), "--out", str(study.tmp / "blimp")]) == 3
    err = capsys.readouterr().err
    assert f"{folder / 'npi_no_ever.jsonl'}:2: missing field(s) " in err and "sentence_bad" in err, err
    assert not list((study.tmp / "blimp").glob("*.jsonl")) if (study.tmp / "blimp").exists() else True


def test_tokenizer_of_another_size_is_named(study, capsys):
    tokenizer = study.data / "tokenizer.json"
    config = write_study(study, study.tmp, data__tokenizer={"kind": "file", "path": str(tokenizer),
                                                            "vocab_size": 512})
    out = study.tmp / "t" / "tokenizer.json"
    assert main(["tokenizer", "--config", str(config), "--corpus", str(study.results / "data" / "corpus"),
                 "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "has 320 tokens but data.tokenizer.vocab_size is 512" in err and str(tokenizer) in err, err
    assert not out.exists()
