"""Safety of received files, of paths and of deletions (no file from a results folder runs code,
nothing outside a command's own folders is deleted, one writer per run), and inputs that used
to crash or slip through validation."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import synthetic_runs as syn
from data_helpers import data_config, write_domain_files
from relora.checkpoint import CheckpointWriteError, save_checkpoint
from relora.cli import main
from relora.config import ConfigError, load_study, resolve_run, run_config_hash
from relora.data.batches import TokenBatches
from relora.model import ModelConfig, PicoDecoder
from relora.train import Trainer, train

STUDY = {
    "study": "t",
    "data": {"seq_len": 16, "tokenizer": {"vocab_size": 100}},
    "sizes": {"tiny": {"d_model": 24, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2}},
    "training": {"steps": 12, "batch_size": 4, "lr": 3e-3, "checkpoint_every": 4, "save_state_every": 3,
                 "device": "cpu"},
    "conditions": {"full": {"method": "full"},
                   "relora": {"method": "relora", "rank": 4, "alpha": 8, "reset_every": 4, "restart_warmup": 1}},
    "seeds": [0],
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolved(condition="full", study=None, **training):
    study = study or STUDY
    study = {**study, "training": {**study["training"], **training}}
    return resolve_run(load_study(study), "tiny", condition, 0)


@pytest.fixture
def foreign(tmp_path):
    """A folder of the user's that no command created."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    return folder


def tiny_model():
    return PicoDecoder(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                   ffn_hidden=32, max_seq_len=8))


def survived(folder):
    return (folder / "keep.txt").is_file() and (folder / "keep.txt").read_text() == "mine"


# --- 1. no code execution from a received file ---------------------------------------------

class Planted:
    """Unpickling this creates a file: what a hostile state.pt could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_genuine_state_loads_without_pickle(tmp_path, data_dir):
    train(resolved("relora"), data_dir, tmp_path / "run", tmp_path / "resume", progress=False, stop_after=5)
    state = torch.load(tmp_path / "resume" / "state.pt", weights_only=True)
    assert state["step"] == 5 and len(state["metrics"]) == 5


def test_planted_pickle_in_the_resume_state_is_refused(tmp_path, data_dir):
    resume = tmp_path / "resume"
    train(resolved(), data_dir, tmp_path / "run", resume, progress=False, stop_after=3)
    planted = tmp_path / "pwned"
    torch.save({"run_config_hash": "x", "step": 3, "payload": Planted(str(planted))}, resume / "state.pt")
    with pytest.raises(ValueError, match=r"state\.pt: refusing to load"):
        train(resolved(), data_dir, tmp_path / "run", resume, progress=False)
    assert not planted.exists()
    assert (resume / "state.pt").exists()  # evidence is kept, not wiped


def test_no_pickle_loading_anywhere_in_the_package():
    pattern = re.compile(r"weights_only=False|allow_pickle=True|trust_remote_code|^\s*import pickle")
    hits = []
    for root, _, files in os.walk(os.path.join(REPO, "relora")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                for i, line in enumerate(open(path, encoding="utf-8"), 1):
                    if pattern.search(line):
                        hits.append(f"{path}:{i}: {line.strip()}")
    assert hits == []


# --- 2. no SQL built from data ---------------------------------------------------------------

def test_aggregate_quotes_hostile_column_names(tmp_path, monkeypatch):
    from relora.results import aggregate

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "study"
    study = syn.write_synthetic_study(root, sizes=("tiny",), conditions=("full", "relora"))
    path = root / "runs/size=tiny/condition=relora/seed=0/train_metrics.parquet"
    table = pq.read_table(path)
    evil = f"step\" AS \"zz\" FROM read_parquet('{path}'); COPY (SELECT 42) TO '{tmp_path}/x.csv'; --"
    pq.write_table(table.append_column(evil, pa.array([1] * table.num_rows)), path)
    out = aggregate(root, study, root / "study.duckdb")
    assert not (tmp_path / "x.csv").exists()
    import duckdb

    with duckdb.connect(str(out), read_only=True) as con:
        names = [r[0] for r in con.execute("DESCRIBE train_metrics").fetchall()]
    assert evil in names  # kept under its own name, as data


# --- 3. names that become path components ---------------------------------------------------

@pytest.mark.parametrize("change, key", [
    ({"study": ".."}, "study"), ({"study": "."}, "study"), ({"study": "a/b"}, "study"), ({"study": ""}, "study"),
    ({"sizes": {"..": STUDY["sizes"]["tiny"]}}, "sizes"),
    ({"conditions": {"../x": {"method": "full"}}}, "conditions"),
    ({"data": {**STUDY["data"], "corpus": {"source": "files", "files": {"../x": ["a.txt"]}}}}, "data.corpus.files"),
    ({"data": {**STUDY["data"], "corpus": {"source": "hf", "hf": [{"path": "p", "domain": ".."}]}}},
     "data.corpus.hf.0.domain"),
    ({"data": {**STUDY["data"], "eval": {"domains": ["a/b"]}}}, "data.eval.domains.0"),
    ({"evaluation": {"blimp": {"paradigms": [".."]}}}, "evaluation.blimp.paradigms.0"),
])
def test_names_that_become_paths_are_single_safe_components(change, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_study({**STUDY, **change})


@pytest.mark.parametrize("name", ["..", ".", "", ".hidden"])
def test_domains_from_data_rows_are_checked(tmp_path, name):
    from relora.data.shards import _eval_docs_hf

    rows = tmp_path / "paloma.jsonl"
    rows.write_text("".join(json.dumps({"text": f"doc {i}", "source": name}) + "\n" for i in range(3)))
    data = data_config()
    data["eval"]["hf"] = [{"path": str(rows), "domain_field": "source"}]
    with pytest.raises(ValueError, match="source"):
        _eval_docs_hf(data)


def test_corpus_domain_from_a_path_is_checked(tmp_path):
    from relora.data.corpus import build_corpus

    folder = tmp_path / "texts"
    folder.mkdir()
    write_domain_files(folder, domains=("alpha",))
    data = data_config(source="hf", hf=[{"path": str(folder / "sub" / ".."), "domain": None}])
    (folder / "sub").mkdir()
    with pytest.raises(ValueError, match=r"'\.\.'"):
        build_corpus(data, tmp_path / "data" / "corpus", log=lambda _: None)


def test_blimp_paradigm_names_are_checked_where_written(tmp_path, monkeypatch):
    from relora.data import blimp

    pairs = [{"sentence_good": "a", "sentence_bad": "b", "UID": "x", "pairID": "0", "linguistics_term": "t"}]
    monkeypatch.setattr(blimp, "load_local", lambda folder, paradigms=None: {"../evil": pairs})
    spec = {"evaluation": {"blimp": {"source": str(tmp_path), "pairs_per_paradigm": None, "paradigms": None,
                                     "seed": 0, "min_word_count": 0, "reference": None}}}
    with pytest.raises(ValueError, match=r"\.\./evil"):
        blimp.build_blimp(spec, tmp_path / "data" / "blimp", log=lambda _: None)
    assert not (tmp_path / "data" / "evil.jsonl").exists()


# --- 4-6. never delete what is not ours ------------------------------------------------------

def test_train_refuses_a_foreign_resume_dir(tmp_path, data_dir, foreign):
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        train(resolved(), data_dir, tmp_path / "run", foreign, progress=False)
    assert survived(foreign) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("out, resume", [("nest/run", "nest"), ("x", "x"), ("y", "y/resume")])
def test_train_refuses_overlapping_out_and_resume_dir(tmp_path, data_dir, out, resume):
    with pytest.raises(ValueError, match="overlap"):
        train(resolved(), data_dir, tmp_path / out, tmp_path / resume, progress=False)
    assert not (tmp_path / out / "run.json").exists()


def test_train_refuses_a_foreign_out_before_training(tmp_path, data_dir, foreign):
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        train(resolved(), data_dir, foreign, tmp_path / "resume", progress=False)
    assert survived(foreign) and not (tmp_path / "resume").exists()


def test_republish_replaces_the_run_folder_as_a_whole(tmp_path, data_dir):
    out = tmp_path / "run"
    train(resolved(), data_dir, out, tmp_path / "resume", progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0", "step_12", "step_4", "step_8"]
    (out / "perplexity.parquet").write_text("stale evaluation of the earlier run")
    train(resolved(checkpoint_every=6), data_dir, out, tmp_path / "resume", progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0", "step_12", "step_6"]
    assert not (out / "perplexity.parquet").exists()
    assert json.loads((out / "run.json").read_text())["training"]["checkpoint_every"] == 6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def test_a_run_folder_of_ours_without_marker_is_replaced_but_not_one_with_a_foreign_file(tmp_path, data_dir):
    """A run published before markers existed, whose run.json and checkpoints Snakemake deleted
    before re-running its training: only the pipeline's own products are left, so it is ours.
    The same folder with one foreign file in it is not."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("perplexity.parquet", "blimp.parquet", "dynamics.parquet"):
        (out / name).write_text("evaluation of an earlier run")
    train(resolved(), data_dir, out, tmp_path / "resume", progress=False)
    assert (out / "run.json").is_file() and not (out / "perplexity.parquet").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "dynamics.parquet").write_text("evaluation of an earlier run")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=re.escape(str(other))):
        train(resolved(), data_dir, other, tmp_path / "resume2", progress=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_save_checkpoint_replaces_only_a_checkpoint(tmp_path, foreign):
    model = tiny_model()
    config = model.config.to_dict()
    with pytest.raises(CheckpointWriteError, match=re.escape(str(foreign))):
        save_checkpoint(model, foreign, config, {"name": "full"}, 3)
    assert survived(foreign)
    step = save_checkpoint(model, tmp_path / "step_3", config, {"name": "full"}, 3)
    save_checkpoint(model, step, config, {"name": "full"}, 3)  # an earlier write of the same checkpoint
    assert (step / "model.safetensors").is_file()


def test_export_hf_refuses_a_foreign_folder_and_replaces_its_own(tmp_path, foreign):
    from relora.export import export_hf

    model = tiny_model()
    step = save_checkpoint(model, tmp_path / "step_0", model.config.to_dict(), {"name": "full"}, 0)
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        export_hf(step, foreign)
    assert survived(foreign)
    export_hf(step, tmp_path / "hf")
    export_hf(step, tmp_path / "hf")  # its own earlier export is replaced
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_blimp_leaves_foreign_jsonl_alone(tmp_path):
    from relora.data.blimp import build_blimp

    out = tmp_path / "data" / "blimp"
    out.mkdir(parents=True)
    (out / "notes.jsonl").write_text("mine")
    spec = {"evaluation": {"blimp": {"source": "generated", "pairs_per_paradigm": 5, "paradigms": None,
                                     "seed": 0, "min_word_count": 0, "reference": None}}}
    info = build_blimp(spec, out, log=lambda _: None)
    assert (out / "notes.jsonl").read_text() == "mine"
    # a paradigm the stage wrote itself and no longer produces is removed
    first = sorted(info["paradigms"])[0]
    spec["evaluation"]["blimp"]["paradigms"] = sorted(info["paradigms"])[1:]
    build_blimp(spec, out, log=lambda _: None)
    assert not (out / f"{first}.jsonl").exists() and (out / "notes.jsonl").read_text() == "mine"


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory):
    root = tmp_path_factory.mktemp("agg") / "study"
    syn.write_synthetic_study(root, sizes=("tiny",), conditions=("full", "relora"))
    db = root / "study.duckdb"
    assert main(["aggregate", "--results", str(root), "--out", str(db)]) == 0
    assert main(["figures", "--db", str(db), "--out-dir", str(root / "figures"), "--formats", "svg",
                 "--only", "train_loss"]) == 0
    return root, db


def test_results_commands_refuse_to_replace_a_foreign_file(tmp_path, aggregated, capsys):
    root, db = aggregated
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["aggregate", "--results", str(root), "--out", str(notes)]) == 3
    assert main(["report", "--db", str(db), "--out", str(notes)]) == 3
    assert notes.read_text() == "mine"
    assert str(notes) in capsys.readouterr().err
    # their own earlier outputs are replaced
    assert main(["aggregate", "--results", str(root), "--out", str(db)]) == 0
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "r.html")]) == 0
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "r.html")]) == 0
    assert main(["figures", "--db", str(db), "--out-dir", str(root / "figures"), "--formats", "svg",
                 "--only", "train_loss"]) == 0


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """Data, a trained run and its database, built by the commands themselves."""
    root = tmp_path_factory.mktemp("world")
    texts = root / "texts"
    texts.mkdir()
    files = write_domain_files(texts, docs=60)
    study = {**STUDY, "data": {**data_config(files=files), "seq_len": 64},
             "training": {**STUDY["training"], "steps": 6, "checkpoint_every": 2},
             "evaluation": {"blimp": {"pairs_per_paradigm": 4, "min_word_count": 0}}}
    study["data"]["tokenizer"]["vocab_size"] = 300
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    data = root / "data"
    c = ["--config", str(config)]
    for argv in (["corpus", *c, "--out", str(data / "corpus")],
                 ["tokenizer", *c, "--corpus", str(data / "corpus"), "--out", str(data / "tokenizer.json")],
                 ["tokenize", *c, "--corpus", str(data / "corpus"), "--tokenizer", str(data / "tokenizer.json"),
                  "--out", str(data)],
                 ["probe", *c, "--eval", str(data / "eval"), "--out", str(data / "probe.npy")],
                 ["blimp", *c, "--out", str(data / "blimp")],
                 ["train", *c, "--size", "tiny", "--condition", "relora", "--seed", "0", "--data", str(data),
                  "--out", str(root / "runs/size=tiny/condition=relora/seed=0")]):
        assert main(argv) == 0, argv
    run = root / "runs/size=tiny/condition=relora/seed=0"
    assert main(["evaluate", *c, "--data", str(data), "--run", str(run), "--device", "cpu"]) == 0
    assert main(["aggregate", "--results", str(root), "--out", str(root / "study.duckdb")]) == 0
    return root, config, data, run


def _commands(world, target):
    root, config, data, run = world
    c = ["--config", str(config)]
    t = str(target)
    run_args = ["--size", "tiny", "--condition", "relora", "--seed", "0", "--data", str(data)]
    return {
        "corpus": ["corpus", *c, "--out", t],
        "tokenizer": ["tokenizer", *c, "--corpus", str(data / "corpus"), "--out", t],
        "tokenize": ["tokenize", *c, "--corpus", str(data / "corpus"), "--tokenizer",
                     str(data / "tokenizer.json"), "--out", t],
        "probe": ["probe", *c, "--eval", str(data / "eval"), "--out", t],
        "blimp": ["blimp", *c, "--out", t],
        "manifest": ["manifest", "--data", t],
        "train --out": ["train", *c, *run_args, "--out", t, "--resume-dir", str(target.parent / "r")],
        "train --resume-dir": ["train", *c, *run_args, "--out", str(target.parent / "o"), "--resume-dir", t],
        "export-hf": ["export-hf", str(run / "checkpoints" / "step_6"), t],
        "evaluate": ["evaluate", *c, "--data", str(data), "--run", str(run), "--device", "cpu", "--out-dir", t],
        "dynamics": ["dynamics", *c, "--data", str(data), "--run", str(run), "--device", "cpu", "--out-dir", t],
        "aggregate": ["aggregate", "--results", str(root), "--out", t],
        "figures": ["figures", "--db", str(root / "study.duckdb"), "--out-dir", t, "--formats", "svg",
                    "--only", "train_loss"],
        "report": ["report", "--db", str(root / "study.duckdb"), "--out", t],
    }


COMMANDS = ["corpus", "tokenizer", "tokenize", "probe", "blimp", "manifest", "train --out",
            "train --resume-dir", "export-hf", "evaluate", "dynamics", "aggregate", "figures", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_leaves_a_foreign_file_in_its_target(tmp_path, small_world, foreign, command):
    argv = _commands(small_world, foreign)[command]
    main(argv)  # may refuse, or write beside the file: either way the user's file stays
    assert survived(foreign)


# --- 7. one writer per run --------------------------------------------------------------------

def test_a_second_writer_of_the_same_run_fails_at_once_naming_the_holder(tmp_path, data_dir):
    first = Trainer(resolved(), data_dir, tmp_path / "run", tmp_path / "resume", progress=False)
    first.prepare_resume_dir()
    first.checkpoint()
    try:
        with pytest.raises(ValueError, match=rf"{socket.gethostname()}.*pid {os.getpid()}"):
            train(resolved(lr=1e-3), data_dir, tmp_path / "run", tmp_path / "resume", progress=False)
        assert (tmp_path / "resume" / "checkpoints" / "step_0").is_dir()  # the first's files untouched
    finally:
        first.release()
    train(resolved(), data_dir, tmp_path / "run", tmp_path / "resume", progress=False)  # free again


def test_a_second_train_process_fails_naming_the_holder(tmp_path, data_dir):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    first = Trainer(resolved(), data_dir, tmp_path / "run", tmp_path / "resume", progress=False)
    first.prepare_resume_dir()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "relora.cli", "train", "--config", str(config), "--size", "tiny",
             "--condition", "full", "--seed", "0", "--data", str(data_dir), "--out", str(tmp_path / "run"),
             "--resume-dir", str(tmp_path / "resume"), "--threads", "1"],
            capture_output=True, text=True, timeout=120)
    finally:
        first.release()
    assert result.returncode == 3 and f"pid {os.getpid()}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# --- 8. numbers that pass `type: integer` or `number` and crash later --------------------------

@pytest.mark.parametrize("assignment, key", [
    ("training.steps=8.0", "training.steps"), ("training.steps=1e1", "training.steps"),
    ("training.batch_size=16.0", "training.batch_size"), ("conditions.relora.rank=8.0", "conditions.relora.rank"),
    ("training.lr=.nan", "training.lr"), ("training.lr=.inf", "training.lr"),
])
def test_whole_number_floats_and_non_finite_numbers_are_rejected(assignment, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_study(STUDY, [assignment])


# --- 9. temporaries of dead writers ------------------------------------------------------------

def test_aggregate_sweeps_temporaries_of_dead_writers_only(tmp_path):
    from relora.results import aggregate

    root = tmp_path / "study"
    study = syn.write_synthetic_study(root, sizes=("tiny",), conditions=("full", "relora"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leftovers = [root / f".study.duckdb.tmp{dead.pid}", root / f".study.duckdb.tmp{dead.pid}.wal"]
        live = [root / f".study.duckdb.tmp{alive.pid}", root / f".study.duckdb.tmp{alive.pid}.wal"]
        for path in leftovers + live:
            path.write_bytes(b"x")
        aggregate(root, study, root / "study.duckdb")
        assert not any(p.exists() for p in leftovers)
        assert all(p.exists() for p in live)
    finally:
        alive.kill()
        alive.wait()


# --- 10. bad data gets a clear error ------------------------------------------------------------

def test_eval_file_with_a_wrong_tokens_type_names_file_and_column(tmp_path):
    from relora.data.shards import read_eval
    from relora.evaluate import read_eval_domains

    path = tmp_path / "eval" / "wiki.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"doc_id": ["a"], "tokens": ["1 2 3"], "n_bytes": [3]}), path)
    with pytest.raises(ValueError, match=r"wiki\.parquet: column 'tokens'"):
        read_eval_domains(path.parent)
    with pytest.raises(ValueError, match=r"wiki\.parquet: column 'tokens'"):
        read_eval(path)


def test_invalid_utf8_in_a_files_corpus_is_counted_in_the_manifest(tmp_path):
    from relora.data.corpus import build_corpus

    texts = tmp_path / "texts"
    texts.mkdir()
    files = write_domain_files(texts, docs=40)
    with open(texts / "beta" / "000.txt", "ab") as f:
        f.write(b" caf\xe9 \xff\xfe end")  # 3 bytes that are not UTF-8
    with open(files["alpha"][0], "ab") as f:
        f.write(b'{"text": "bad \xc3 byte in a long enough document of the alpha domain"}\n')  # 1 byte
    build_corpus(data_config(files=files), tmp_path / "data" / "corpus", log=lambda _: None)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    domains = manifest["stages"]["corpus"]["domains"]
    assert domains["beta"]["invalid_utf8_bytes"] == {str(texts / "beta" / "000.txt"): 3}
    assert domains["alpha"]["invalid_utf8_bytes"] == {files["alpha"][0]: 1}


def test_too_few_windows_names_the_keys_and_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"train\.npy.*data\.seq_len 16.*training\.batch_size 16"):
        TokenBatches(np.arange(40), seq_len=16, batch_size=16, seed=0, source=tmp_path / "train.npy")


# --- 11. the resume hash covers the trajectory only ---------------------------------------------

def test_run_config_hash_covers_the_trajectory_only():
    base = run_config_hash(resolved("relora"))
    for change in ({"save_state_every": 1}, {"log_every": 1}, {"device": "auto"}, {"checkpoint_every": 3}):
        assert run_config_hash(resolved("relora", **change)) == base, change
    for key in ("evaluation", "analysis"):
        assert run_config_hash(resolved("relora", study={**STUDY, key: {"every": 5}})) == base, key
    for change in ({"lr": 1e-3}, {"steps": 16}, {"batch_size": 8}):
        assert run_config_hash(resolved("relora", **change)) != base, change
    merges = {**STUDY, "conditions": {**STUDY["conditions"], "relora": {**STUDY["conditions"]["relora"],
                                                                        "reset_every": 5}}}
    assert run_config_hash(resolved("relora", study=merges)) != base


def test_resume_survives_changing_how_often_state_is_saved_or_evaluated(tmp_path, data_dir, caplog):
    train(resolved("relora"), data_dir, tmp_path / "run", tmp_path / "resume", progress=False, stop_after=6)
    changed = resolved("relora", study={**STUDY, "evaluation": {"every": 8}}, save_state_every=2)
    with caplog.at_level("INFO"):
        train(changed, data_dir, tmp_path / "run", tmp_path / "resume", progress=False)
    assert "at step 6" in caplog.text
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == \
           ["step_0", "step_12", "step_4", "step_8"]


def test_a_device_change_resumes_and_is_recorded(tmp_path, data_dir):
    resume = tmp_path / "resume"
    train(resolved(), data_dir, tmp_path / "run", resume, progress=False, stop_after=6)
    state = torch.load(resume / "state.pt", weights_only=True)
    assert state["devices"] == ["cpu"]
    state["devices"] = ["cuda"]  # as if the first part had run on a GPU
    torch.save(state, resume / "state.pt")
    record = train(resolved(), data_dir, tmp_path / "run", resume, progress=False)
    assert record["devices"] == ["cuda", "cpu"] and record["bitwise_reproducible"] is False
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["devices"] == ["cuda", "cpu"] and saved["bitwise_reproducible"] is False
