
import numpy as np
import pytest

from data_helpers import data_config, write_domain_files
from relora.data import olmo_bundle, read_manifest, verify_manifest
from relora.data.corpus import build_corpus, read_docs
from relora.data.manifest import ManifestError
from relora.data.shards import ShardError, build_probe, build_shards, read_eval
from relora.data.tokenizer import (TokenizerError, build_tokenizer, load_tokenizer,
                                   token_byte_lengths, token_dtype)

quiet = dict(log=lambda m: None)


@pytest.fixture
def built(tmp_path):
    """corpus -> tokenizer -> tokenize -> probe on a tiny two-domain corpus."""
    (tmp_path / "src").mkdir()
    data = data_config(files=write_domain_files(tmp_path / "src"))
    root = tmp_path / "data"
    build_corpus(data, root / "corpus", **quiet)
    build_tokenizer(data, root / "corpus", root / "tokenizer.json", threads=2, **quiet)
    build_shards(data, root / "corpus", root / "tokenizer.json", root, threads=2, **quiet)
    build_probe(data, root / "eval", root / "probe.npy", **quiet)
    return data, root


def test_tokenizer_has_the_configured_size_and_eos(built):
    data, root = built
    tok = load_tokenizer(root / "tokenizer.json")
    assert tok.get_vocab_size() == 300
    manifest = read_manifest(root)
    assert manifest["vocab_size"] == 300 and manifest["eos_id"] == tok.token_to_id("<|endoftext|>")
    assert manifest["dtype"] == "uint16"


def test_train_npy_layout_and_no_heldout_tokens(built):
    data, root = built
    manifest = verify_manifest(root)
    tok = load_tokenizer(root / "tokenizer.json")
    eos = manifest["eos_id"]
    train = np.load(root / "train.npy", mmap_mode="r")
    assert train.dtype == np.uint16 and train.ndim == 1 and train[0] == eos and train[-1] == eos
    docs = [tok.decode(d.tolist()) for d in np.split(np.asarray(train), np.flatnonzero(train == eos))
            if d.size > 1 for d in [d[1:]]]
    train_texts = {d["text"] for dom in ("alpha", "beta") for d in read_docs(root / "corpus", "train", dom)}
    held_texts = {d["text"] for dom in ("alpha", "beta") for d in read_docs(root / "corpus", "heldout", dom)}
    assert set(docs) == train_texts and not set(docs) & held_texts
    assert manifest["train"]["tokens"] == train.size


def test_eval_parquet_bytes_and_probe(built):
    data, root = built
    tok = load_tokenizer(root / "tokenizer.json")
    held = {d["id"]: d["text"] for dom in ("alpha", "beta") for d in read_docs(root / "corpus", "heldout", dom)}
    for domain in ("alpha", "beta"):
        ev = read_eval(root / "eval" / f"{domain}.parquet")
        assert len(ev["doc_id"]) >= 2
        for doc_id, tokens, n_bytes in zip(ev["doc_id"], ev["tokens"], ev["n_bytes"]):
            text = held[doc_id]
            assert tok.decode(tokens.tolist()) == text
            first = len(tok.decode(tokens[:1].tolist()).encode())
            assert n_bytes == len(text.encode()) - first
    probe = np.load(root / "probe.npy")
    assert probe.shape == (4, 17) and probe.dtype == np.int64
    # every probe window comes from held-out text: its tokens (between EOS) decode into it
    eos = read_manifest(root)["eos_id"]
    for row in probe:
        for piece in np.split(row, np.flatnonzero(row == eos)):
            piece = piece[piece != eos]
            if piece.size > 3:
                assert any(tok.decode(piece[1:-1].tolist()) in t for t in held.values())
    # the same every time
    build_probe(data, root / "eval", root / "probe2.npy", **quiet)
    assert np.array_equal(np.load(root / "probe2.npy"), probe)


def test_probe_needs_enough_heldout_tokens(built):
    data, root = built
    data = {**data, "seq_len": 100_000}
    with pytest.raises(ShardError, match="fewer than data.probe_batch"):
        build_probe(data, root / "eval", root / "p.npy", **quiet)
    assert not (root / "p.npy").exists()


def test_manifest_catches_corruption(built):
    _, root = built
    manifest = verify_manifest(root)
    assert {"train.npy", "tokenizer.json", "probe.npy", "eval/alpha.parquet"} <= set(manifest["files"])
    path = root / "eval" / "alpha.parquet"
    blob = bytearray(path.read_bytes())
    blob[10] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match=r"alpha.parquet: sha256 differs"):
        verify_manifest(root)
    path.write_bytes(bytes(blob[:-5]))
    with pytest.raises(ManifestError, match=r"alpha.parquet: \d+ bytes, the manifest says"):
        verify_manifest(root, ["eval/alpha.parquet"])
    (root / "train.npy").unlink()
    with pytest.raises(ManifestError, match="train.npy: missing"):
        verify_manifest(root, ["train.npy"])


def test_tokenizer_size_mismatch_and_file_kind(built, tmp_path):
    data, root = built
    bad = {**data, "tokenizer": {**data["tokenizer"], "kind": "file", "path": str(root / "tokenizer.json"),
                                 "vocab_size": 512}}
    with pytest.raises(TokenizerError, match="has 300 tokens but data.tokenizer.vocab_size is 512"):
        build_tokenizer(bad, root / "corpus", tmp_path / "t" / "tokenizer.json", **quiet)
    assert not (tmp_path / "t" / "tokenizer.json").exists()
    good = {**bad, "tokenizer": {**bad["tokenizer"], "vocab_size": 300}}
    info = build_tokenizer(good, root / "corpus", tmp_path / "t" / "tokenizer.json", **quiet)
    assert info["kind"] == "file"
    too_big = {**data, "tokenizer": {**data["tokenizer"], "vocab_size": 50_000}}
    with pytest.raises(TokenizerError, match="yields only"):
        build_tokenizer(too_big, root / "corpus", tmp_path / "u" / "tokenizer.json", **quiet)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="junk.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "junk.json")


def test_eval_from_hf_rows_with_domains(built, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, root = built
    tok = load_tokenizer(root / "tokenizer.json")
    texts = ["the dog sat by the river", "a small green book", "old stone house in the town"] * 2
    ids = [tok.encode(t).ids for t in texts]
    sources = ["c4", "c4", "wiki", "wiki", "c4", "wiki"]
    pq.write_table(pa.table({"input_ids": ids, "source": sources}),
                   tmp_path / "paloma.parquet")
    hf = dict(data, eval={**data["eval"], "source": "hf", "min_docs_per_domain": 1, "hf": [
        {"path": str(tmp_path / "paloma.parquet"), "tokens_field": "input_ids", "domain_field": "source"}]})
    info = build_shards(hf, root / "corpus", root / "tokenizer.json", tmp_path / "out", **quiet)
    assert set(info["eval"]) == {"c4", "wiki"}
    ev = read_eval(tmp_path / "out" / "eval" / "wiki.parquet")
    assert ev["n_bytes"].tolist() == [len(t.encode()) - len(tok.decode(i[:1]).encode())
                                      for t, i, s in zip(texts, ids, sources) if s == "wiki"]


def test_token_dtype():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


REAL_WHEEL = olmo_bundle.cache_dir() / olmo_bundle.WHEEL_FILE


@pytest.mark.skipif(not REAL_WHEEL.exists(), reason=f"cached wheel not found at {REAL_WHEEL}")
def test_olmo_tokenizer_from_the_real_wheel(built, tmp_path):
    data, root = built
    olmo = {**data, "tokenizer": {**data["tokenizer"], "kind": "olmo", "vocab_size": 50280}}
    info = build_tokenizer(olmo, root / "corpus", tmp_path / "olmo" / "tokenizer.json", **quiet)
    assert info["eos_id"] == 50279 and info["dtype"] == "uint16"
    tok = load_tokenizer(tmp_path / "olmo" / "tokenizer.json")
    lengths = token_byte_lengths(tok)
    text = "Grüße — naïve café, 3 × 4 = 12.\n\tindented  spaces"
    assert lengths[tok.encode(text).ids].sum() == len(text.encode())


def test_eval_from_a_text_column_is_retokenized_and_its_columns_are_checked(built, tmp_path, monkeypatch):
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from relora.data import hub
    from relora.data.corpus import CorpusError

    data, root = built
    tok = load_tokenizer(root / "tokenizer.json")
    texts = ["the dog sat by the river", "a small green book", "old stone house in the town"]
    pq.write_table(pa.table({"text": texts, "source": ["c4", "wiki", "wiki"], "input_ids": [[1], [2], [3]]}),
                   tmp_path / "paloma.parquet")
    spec = {"path": str(tmp_path / "paloma.parquet"), "text_field": "text", "domain_field": "source"}
    hf = dict(data, eval={**data["eval"], "source": "hf", "min_docs_per_domain": 1, "hf": [spec]})
    build_shards(hf, root / "corpus", root / "tokenizer.json", tmp_path / "out", **quiet)
    wiki = read_eval(tmp_path / "out" / "eval" / "wiki.parquet")
    # the text re-tokenized with the study's tokenizer, not the file's input_ids
    assert [t.tolist() for t in wiki["tokens"]] == [tok.encode(t).ids for t in texts[1:]]

    # a local file without the column: the error names the expected and the found columns
    pq.write_table(pa.table({"content": texts, "source": ["c4"] * 3}), tmp_path / "other.parquet")
    bad = dict(hf, eval={**hf["eval"], "hf": [{**spec, "path": str(tmp_path / "other.parquet")}]})
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: content, source\)"):
        build_shards(bad, root / "corpus", root / "tokenizer.json", tmp_path / "out2", **quiet)

    # a hub dataset (faked: the hub is not reached) is checked on its first row
    class FakeDatasets:
        @staticmethod
        def load_dataset(path, name, split, streaming, revision):
            return iter([{"input_ids": [1, 2], "source": "c4"}])

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    monkeypatch.setattr(hub, "resolve_revision", lambda repo, revision: "0" * 40)
    remote = dict(hf, eval={**hf["eval"], "hf": [{**spec, "path": "pico-lm/pretokenized-paloma-tinsy"}]})
    with pytest.raises(CorpusError, match=r"expected column\(s\) 'text', 'source', found columns: input_ids, source"):
        build_shards(remote, root / "corpus", root / "tokenizer.json", tmp_path / "out3", **quiet)
