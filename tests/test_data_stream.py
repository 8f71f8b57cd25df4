"""The streamed training data (relora/data/stream.py) on local fakes of a pre-tokenized dataset:
parquet shards written here, read through the same code as the hub's (a fake hub serves a local
folder as a dataset repository; the hub itself is never reached). Shards, row counts, columns
and revisions in the manifest; a run stopped mid-shard resumes at exactly the next row, straight
from its shard and row group, and ends with the weights of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from relora.config import load_study, resolve_run
from relora.data import hub, stream
from relora.data.corpus import CorpusError, build_corpus
from relora.data.stream import StreamedBatches, StreamError, resolve_stream
from relora.train import Trainer, train

SEQ, VOCAB, BATCH = 16, 100, 4
STUDY = {
    "study": "s",
    "data": {"seq_len": SEQ, "tokenizer": {"vocab_size": VOCAB}},
    "sizes": {"tiny": {"d_model": 24, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2}},
    "training": {"steps": 12, "batch_size": BATCH, "grad_accum": 2, "lr": 3e-3, "checkpoint_every": 4,
                 "save_state_every": 1, "schedule": {"name": "linear", "warmup": 2}, "device": "cpu"},
    "conditions": {"relora": {"method": "relora", "rank": 4, "alpha": 8, "dropout": 0.1, "reset_every": 4,
                              "restart_warmup": 1,
                              "training": {"schedule": {"name": "jagged_cosine", "warmup": 4}}}},
    "seeds": [0],
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def rows_of(n, seed=1, length=SEQ + 1):
    return np.random.default_rng(seed).integers(0, VOCAB, (n, length))


def write_shards(folder, rows, per_shard=12, row_group=5, prefix="train", column="input_ids"):
    """Parquet shards of `per_shard` rows in row groups of `row_group` rows: rows [12 s, 12 s + 12)
    in shard s."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(rows) // per_shard)
    for s in range(n_shards):
        part = rows[s * per_shard:(s + 1) * per_shard]
        pq.write_table(pa.table({column: [r.tolist() for r in part]}),
                       folder / f"{prefix}-{s:03d}-of-{n_shards:03d}.parquet", row_group_size=row_group)
    return folder


def stream_data_dir(tmp_path, rows, **shards):
    """A data folder whose manifest says: train on the stream of these rows."""
    spec = resolve_stream({"path": str(write_shards(tmp_path / "dolma", rows, **shards)),
                           "tokens_field": "input_ids", "stream": True}, "test")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"train": {"kind": "stream", "datasets": [spec]}}))
    return data


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A dataset repository `org/dolma` at COMMIT served from a local folder: train and val
    shards, and a file that is no shard."""
    repo = tmp_path / "repo"
    rows = rows_of(30)
    write_shards(repo / "data", rows, per_shard=12)
    write_shards(repo / "data", rows_of(7, seed=2), per_shard=12, prefix="val")
    (repo / "README.md").write_text("a dataset card\n")
    resolved = []

    def resolve_revision(name, revision):
        assert name == "org/dolma"
        resolved.append(revision)
        return revision if hub.is_commit(revision) else COMMIT

    def list_files(name, commit):
        assert commit in (COMMIT, "f" * 40)
        return [{"file": p.relative_to(repo).as_posix(), "bytes": p.stat().st_size, "sha256": "lfs-" + p.name}
                for p in sorted(repo.rglob("*")) if p.is_file()]

    def open_file(name, commit, path):
        return open(repo / path, "rb")

    monkeypatch.setattr(hub, "resolve_revision", resolve_revision)
    monkeypatch.setattr(hub, "list_files", list_files)
    monkeypatch.setattr(hub, "open_file", open_file)
    return rows, resolved


def test_update_k_reads_rows_of_its_step_across_shards_and_row_groups(tmp_path):
    rows = rows_of(50)
    spec = resolve_stream({"path": str(write_shards(tmp_path / "d", rows)), "tokens_field": "input_ids"}, "t")
    assert [s["rows"] for s in spec["shards"]] == [12, 12, 12, 12, 2] and spec["rows"] == 50
    assert spec["hub"] is False and spec["revision"] is None
    batches = StreamedBatches([spec], SEQ, BATCH, VOCAB)
    assert batches.locate(0) == (0, 0) and batches.locate(20) == (1, 8) and batches.locate(49) == (4, 1)
    for start in range(50):  # every row, from every position
        first = next(batches.rows_from(start))
        assert np.array_equal(first, rows[start])
    for step in (1, 3, 7, 12, 2):  # in order, then jumps back and forth
        assert torch.equal(batches.batch(step), torch.from_numpy(rows[(step - 1) * BATCH:step * BATCH]))
    assert torch.equal(batches.batch(5, slice(1, 3)), torch.from_numpy(rows[17:19]))
    with pytest.raises(StreamError, match="the training stream ended at row 50: update 13 needs rows 48..51"):
        batches.batch(13)


def test_a_run_stopped_mid_shard_resumes_at_the_next_row_and_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    rows = rows_of(12 * BATCH)
    data = stream_data_dir(tmp_path, rows)
    run = resolve_run(load_study(STUDY), "tiny", "relora", 0)
    train(run, data, tmp_path / "reference", tmp_path / "r0", progress=False)

    # stopped after update 5 (the project's stop hook): rows 0..19 read, row 20 is row 8 of
    # shard 1, the 4th row of its second row group
    assert train(run, data, tmp_path / "run", tmp_path / "resume", progress=False, stop_after=5) == {"stopped_at": 5}
    opened = []
    read_shard = stream.read_shard

    def recording_read_shard(dataset, shard, start):
        opened.append((shard["file"].rsplit("/", 1)[-1], start))
        for tokens in read_shard(dataset, shard, start):
            opened.append(tokens)
            yield tokens

    monkeypatch.setattr(stream, "read_shard", recording_read_shard)
    trainer = Trainer(run, data, tmp_path / "run", tmp_path / "resume", progress=False)
    trainer.prepare_resume_dir()
    assert trainer.step == 5
    assert torch.equal(trainer.batches.batch(6), torch.from_numpy(rows[20:24]))
    assert opened[0] == ("train-001-of-004.parquet", 8)  # straight to shard 1, row 8
    assert np.array_equal(opened[1], rows[20])  # the first row read is the next row
    trainer.release()
    opened.clear()
    train(run, data, tmp_path / "run", tmp_path / "resume", progress=False)
    assert [o for o in opened if isinstance(o, tuple)] == [("train-001-of-004.parquet", 8),
                                                           ("train-002-of-004.parquet", 0),
                                                           ("train-003-of-004.parquet", 0)]
    assert len([o for o in opened if not isinstance(o, tuple)]) == 7 * BATCH  # no row read twice
    for step in (0, 4, 8, 12):
        a = load_file(tmp_path / f"reference/checkpoints/step_{step}/model.safetensors")
        b = load_file(tmp_path / f"run/checkpoints/step_{step}/model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"step {step} differs"
    ref = pq.read_table(tmp_path / "reference/train_metrics.parquet").drop(["tokens_per_s"]).to_pylist()
    assert pq.read_table(tmp_path / "run/train_metrics.parquet").drop(["tokens_per_s"]).to_pylist() == ref


@pytest.mark.slow
def test_sigterm_mid_shard_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The cluster's preemption: `relora train` gets SIGTERM (the fault hooks slow its steps so
    that it is caught mid-run), saves its state and exits; the rerun continues from the
    shard and row of its step and publishes the weights of an uninterrupted run."""
    from reliability_helpers import fault_env

    steps = 30
    rows = rows_of(steps * BATCH)
    data = stream_data_dir(tmp_path, rows, per_shard=10, row_group=3)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({**STUDY, "training": {**STUDY["training"], "steps": steps,
                                                            "checkpoint_every": 10}}))

    def command(out, resume):
        return [sys.executable, "-m", "relora", "train", "--config", str(config), "--size", "tiny",
                "--condition", "relora", "--seed", "0", "--data", str(data), "--out", str(out),
                "--resume-dir", str(resume), "--threads", "1"]

    subprocess.run(command(tmp_path / "reference", tmp_path / "r0"), check=True, capture_output=True)
    out, resume = tmp_path / "run", tmp_path / "resume"
    process = subprocess.Popen(command(out, resume), stderr=subprocess.PIPE, text=True,
                               env=fault_env(step_delay=0.3))
    deadline = time.time() + 120
    while not ((resume / "state.pt").exists() and torch.load(resume / "state.pt", weights_only=True)["step"] >= 3):
        assert process.poll() is None and time.time() < deadline, "no state saved before the run ended"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    stopped = torch.load(resume / "state.pt", weights_only=True)["step"]
    assert 3 <= stopped < steps
    result = subprocess.run(command(out, resume), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shard, row = divmod(stopped * BATCH, 10)
    assert (f"training stream: update {stopped + 1} starts at row {stopped * BATCH}, row {row} of shard "
            f"train-{shard:03d}-of-012.parquet") in result.stderr
    for step in (0, 10, 20, 30):
        a = load_file(tmp_path / f"reference/checkpoints/step_{step}/model.safetensors")
        b = load_file(out / f"checkpoints/step_{step}/model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), f"step {step} differs"


def test_a_failed_hub_read_is_reopened_at_the_row_it_stopped_at(tmp_path, monkeypatch, fake_hub):
    rows, _ = fake_hub
    spec = resolve_stream({"path": "org/dolma", "tokens_field": "input_ids"}, "t")
    read_shard, failures = stream.read_shard, []

    def flaky_read_shard(dataset, shard, start):
        for n, tokens in enumerate(read_shard(dataset, shard, start)):
            if n == 3 and len(failures) < 2:  # the connection drops after 3 rows, twice
                failures.append((shard["file"], start + n))
                raise ConnectionError("connection reset by peer")
            yield tokens

    monkeypatch.setattr(stream, "RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(stream, "read_shard", flaky_read_shard)
    got = list(StreamedBatches([spec], SEQ, BATCH, VOCAB).rows_from(10))
    assert np.array_equal(np.stack(got), rows[10:])
    assert failures == [("data/train-001-of-003.parquet", 3), ("data/train-001-of-003.parquet", 6)]
    # a local shard that fails is not a dropped connection: no retry
    local = resolve_stream({"path": str(write_shards(tmp_path / "local", rows)), "tokens_field": "input_ids"}, "t")
    failures.clear()
    with pytest.raises(StreamError, match=r"train-000-of-003.parquet: reading row 3 failed \(ConnectionError"):
        list(StreamedBatches([local], SEQ, BATCH, VOCAB).rows_from(0))
    # a hub shard that keeps failing ends with the last error
    monkeypatch.setattr(stream, "RETRIES", 1)
    failures.clear()
    with pytest.raises(StreamError, match=r"reading row 6 failed \(ConnectionError"):
        list(StreamedBatches([spec], SEQ, BATCH, VOCAB).rows_from(0))


def test_hub_revisions_shards_and_columns_are_recorded_in_the_manifest(tmp_path, fake_hub):
    from relora.data.manifest import read_manifest

    _, resolved = fake_hub
    spec = resolve_stream({"path": "org/dolma", "split": "train", "tokens_field": "input_ids"}, "t")
    assert {k: spec[k] for k in ("hub", "revision", "resolved_revision", "pinned")} == \
        {"hub": True, "revision": None, "resolved_revision": COMMIT, "pinned": False}
    assert [(s["file"], s["rows"], s["sha256"]) for s in spec["shards"]] == [
        ("data/train-000-of-003.parquet", 12, "lfs-train-000-of-003.parquet"),
        ("data/train-001-of-003.parquet", 12, "lfs-train-001-of-003.parquet"),
        ("data/train-002-of-003.parquet", 6, "lfs-train-002-of-003.parquet")]
    pinned = resolve_stream({"path": "org/dolma", "split": "val", "tokens_field": "input_ids",
                             "revision": "f" * 40}, "t")
    assert pinned["pinned"] is True and pinned["resolved_revision"] == "f" * 40
    assert [s["file"] for s in pinned["shards"]] == ["data/val-000-of-001.parquet"]

    # through the data stage: corpus lists the shards once, tokenize records them for the trainer
    data = {"seq_len": SEQ, "tokenizer": {"vocab_size": VOCAB, "kind": "train", "eos_token": "<|endoftext|>"},
            "corpus": {"source": "hf", "hf": [{"path": "org/dolma", "split": "train", "domain": "dolma",
                                               "tokens_field": "input_ids", "stream": True, "revision": "main"}],
                       "split_seed": 0, "max_chars_per_domain": None, "heldout_fraction": 0.05,
                       "min_doc_chars": 32, "max_doc_chars": None, "shingle_words": None, "shingle_max_docs": 10}}
    info = build_corpus(data, tmp_path / "data" / "corpus", log=lambda m: None)
    assert resolved[-1] == "main"
    record = info["domains"]["dolma"]
    assert record["streamed"] is True and record["revision"] == "main" and record["pinned"] is False
    assert record["resolved_revision"] == COMMIT and record["rows"] == 30
    manifest = read_manifest(tmp_path / "data")
    assert manifest["stages"]["corpus"]["domains"]["dolma"]["resolved_revision"] == COMMIT


def test_columns_a_dataset_really_has_are_checked(tmp_path, fake_hub, monkeypatch):
    rows = rows_of(10)
    write_shards(tmp_path / "ids", rows, column="ids")
    with pytest.raises(StreamError, match=r"expected column 'input_ids' \(the tokens_field\), found columns: ids"):
        resolve_stream({"path": str(tmp_path / "ids"), "tokens_field": "input_ids"}, "data.corpus.hf[0]")
    pq.write_table(pa.table({"input_ids": ["a b c"] * 3}), tmp_path / "text.parquet")
    with pytest.raises(StreamError, match="column 'input_ids' holds string, expected a list of integer"):
        resolve_stream({"path": str(tmp_path / "text.parquet"), "tokens_field": "input_ids"}, "t")
    with pytest.raises(StreamError, match="found columns: input_ids"):
        resolve_stream({"path": "org/dolma", "tokens_field": "tokens"}, "t")
    # a shard replaced after the data stage (other row count) is named before a row is used
    spec = resolve_stream({"path": str(write_shards(tmp_path / "d", rows)), "tokens_field": "input_ids"}, "t")
    write_shards(tmp_path / "d", rows[:9])
    with pytest.raises(StreamError, match="9 rows, the data manifest says 10"):
        StreamedBatches([spec], SEQ, BATCH, VOCAB).batch(1)

    # a text dataset read through `datasets` (faked): the first row's columns are checked
    class FakeDatasets:
        @staticmethod
        def load_dataset(path, name, split, streaming, revision):
            assert streaming and revision == COMMIT
            return iter([{"content": "some text", "id": 1}])

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    data = {"corpus": {"source": "hf", "hf": [{"path": "org/dolma", "domain": "web"}], "split_seed": 0,
                       "max_chars_per_domain": 1000, "heldout_fraction": 0.05, "min_doc_chars": 1,
                       "max_doc_chars": None, "shingle_words": None, "shingle_max_docs": 10}}
    with pytest.raises(CorpusError, match=r"expected column\(s\) 'text', found columns: content, id"):
        build_corpus(data, tmp_path / "c" / "corpus", log=lambda m: None)


def test_a_local_path_has_no_revision(tmp_path):
    write_shards(tmp_path / "d", rows_of(5))
    with pytest.raises(hub.HubError, match="a local path has no revision"):
        resolve_stream({"path": str(tmp_path / "d"), "tokens_field": "input_ids", "revision": "main"}, "t")
