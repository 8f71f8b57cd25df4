"""Token shards: train.npy, eval/<domain>.parquet and probe.npy (docs/design.md, Files).

- `train.npy`: 1-D token ids (uint16 when the vocabulary fits, else uint32) of every training
  document, shuffled across domains with the split seed, each followed by EOS and the whole
  preceded by one EOS, so every document starts from an EOS context as BLiMP sentences do:
  `EOS d1 EOS d2 EOS ... dn EOS`. Read it with `np.load(path, mmap_mode="r")`.
- `eval/<domain>.parquet`: held-out documents (doc_id, source, tokens list<int32>, n_bytes =
  UTF-8 bytes of all tokens but the first) in hash order up to `data.eval.max_tokens_per_domain`.
  From the corpus's held-out split (`data.eval.source: corpus`) or from Hugging Face / local
  Paloma-style rows (`hf`).
- `probe.npy`: int64 [probe_batch, seq_len + 1], windows drawn with the split seed from the held-out
  documents of every evaluation domain joined the same way, the same for every run.

Encoding is batched through `tokenizers`' encode_batch, which runs on all the threads given.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ..io import safe_name
from .manifest import atomic_path, write_stage

log_progress = logging.getLogger(__name__).info  # the default `log` of the stage builders


class ShardError(ValueError):
    """Shards that cannot be built; the message names the file or domain."""


def encode_texts(tokenizer, texts: list[str], batch_size: int = 8192) -> list[list[int]]:
    """Token ids of many texts, encoded in parallel batches (no offsets computed)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    ids: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        ids.extend(e.ids for e in encode(texts[i:i + batch_size], add_special_tokens=False))
    return ids


def join_documents(docs: list[list[int]], eos_id: int, dtype) -> np.ndarray:
    """EOS d1 EOS d2 EOS ... dn EOS as one array."""
    total = 1 + sum(len(d) + 1 for d in docs)
    out = np.empty(total, dtype=dtype)
    out[0] = eos_id
    pos = 1
    for doc in docs:
        out[pos:pos + len(doc)] = doc
        pos += len(doc)
        out[pos] = eos_id
        pos += 1
    return out


def save_npy(path: Path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return path


def load_train(data_dir: str | os.PathLike) -> np.memmap:
    """train.npy memory-mapped (checked against the manifest's size by the caller if wanted)."""
    return np.load(Path(data_dir) / "train.npy", mmap_mode="r")


def _doc_tokens(tokenizer, docs: list[dict], vocab_size: int, where: str) -> list[list[int]]:
    texts = [d["text"] for d in docs if "text" in d]
    encoded = iter(encode_texts(tokenizer, texts))
    out = []
    for doc in docs:
        if "text" in doc:
            out.append(next(encoded))
        else:
            tokens = doc["tokens"]
            if tokens and (max(tokens) >= vocab_size or min(tokens) < 0):
                raise ShardError(f"{where}: document {doc['id']} has token id {max(tokens)} outside "
                                 f"the tokenizer's {vocab_size} tokens (pretokenized with another "
                                 "tokenizer?)")
            out.append(list(tokens))
    return out


def _eval_docs_hf(data: dict, sources: list | None = None) -> dict[str, list[dict]]:
    """Held-out documents by domain from Paloma-style datasets (`data.eval.hf`); where each was
    read (hub.source_revision) is appended to `sources`."""
    sources = [] if sources is None else sources
    from . import hub
    from .corpus import iter_hf, require_datasets
    from .stream import is_local

    by_domain: dict[str, list[dict]] = {}
    for i, spec in enumerate(data["eval"]["hf"] or []):
        local = is_local(spec["path"])
        if not local:  # before the revision is resolved: say what is missing first
            require_datasets(spec["path"], f"data.eval.hf[{i}]")
        spec = {**spec, **hub.source_revision(spec["path"], spec.get("revision"), local)}
        sources.append(spec)
        field = spec.get("tokens_field") or spec.get("text_field") or "text"
        kind = "tokens" if spec.get("tokens_field") else "text"
        domain_field = spec.get("domain_field")
        extra = (domain_field,) if domain_field else ()
        for source, row_id, value in iter_hf(spec, f"data.eval.hf[{i}]", extra):
            row = value if extra else {field: value}
            domain = str(row[domain_field]) if domain_field else (spec.get("domain") or "eval")
            domain = domain.replace("/", "_").replace(" ", "_")
            safe_name(domain, f"data.eval.hf[{i}]: domain ({domain_field or 'domain'} of {source} row {row_id})")
            by_domain.setdefault(domain, []).append(
                {"id": f"{source}:{row_id}", "source": source, kind: row[field]})
    if not by_domain:
        raise ShardError("data.eval.hf: no evaluation documents")
    return by_domain


def build_shards(data: dict, corpus_dir: str | os.PathLike, tokenizer_path: str | os.PathLike,
                 data_dir: str | os.PathLike, threads: int | None = None, log=log_progress) -> dict:
    """Run the tokenize stage: data_dir/train.npy and data_dir/eval/<domain>.parquet from the
    corpus dir and the tokenizer; returns the stage info."""
    from .corpus import corpus_domains, read_docs
    from .tokenizer import (check_tokenizer, load_tokenizer, set_threads, token_byte_lengths,
                            token_dtype)

    set_threads(threads)
    data_dir = Path(data_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = data["tokenizer"]["vocab_size"]
    eos_id = check_tokenizer(tokenizer, vocab_size, data["tokenizer"]["eos_token"], str(tokenizer_path))
    dtype = token_dtype(vocab_size)
    domains = corpus_domains(corpus_dir)
    seed = data["corpus"]["split_seed"]
    info: dict = {"dtype": dtype.name, "eos_id": eos_id, "layout": "EOS d1 EOS d2 ... dn EOS"}
    written: list[Path] = []

    # training tokens
    started, n_encoded = time.perf_counter(), 0
    train_docs, per_domain = [], {}
    streamed = {d: m for d, m in domains.items() if m.get("streamed")}
    for domain, meta in domains.items():
        if meta.get("streamed"):
            continue
        docs = list(read_docs(corpus_dir, "train", domain))
        tokens = _doc_tokens(tokenizer, docs, vocab_size, f"{corpus_dir}/train/{domain}.jsonl")
        n = sum(map(len, tokens))
        n_encoded += n if docs and "text" in docs[0] else 0
        per_domain[domain] = {"documents": len(tokens), "tokens": n}
        train_docs.extend(tokens)
    seconds = time.perf_counter() - started
    if train_docs:
        order = np.random.default_rng(seed).permutation(len(train_docs))
        train = join_documents([train_docs[i] for i in order], eos_id, dtype)
        written.append(save_npy(data_dir / "train.npy", train))
        info["train"] = {"kind": "npy", "path": "train.npy", "tokens": int(train.size),
                         "documents": len(train_docs), "domains": per_domain}
        log(f"tokenize: train.npy {train.size:,} tokens from {len(train_docs):,} documents "
            f"({n_encoded / max(seconds, 1e-9):,.0f} tokens/s encoding, {threads or 'all'} threads)")
    elif streamed:
        info["train"] = {"kind": "stream", "datasets": list(streamed.values())}
        log("tokenize: training tokens are streamed during training; no train.npy")
    else:
        raise ShardError(f"{Path(corpus_dir) / 'train'}: no training documents")
    info["encode"] = {"tokens": n_encoded, "seconds": round(seconds, 3),
                      "tokens_per_s": round(n_encoded / max(seconds, 1e-9))}

    # held-out evaluation documents
    evaluation = data["eval"]
    if evaluation["source"] == "hf":
        info["eval_sources"] = []
        eval_docs = _eval_docs_hf(data, info["eval_sources"])
    else:
        wanted = evaluation["domains"] or [d for d in domains if not domains[d].get("streamed")]
        unknown = [d for d in wanted if d not in domains]
        if unknown:
            raise ShardError(f"data.eval.domains: {unknown} not among the corpus domains "
                             f"({', '.join(domains)})")
        eval_docs = {d: list(read_docs(corpus_dir, "heldout", d)) for d in wanted}
    byte_lengths = token_byte_lengths(tokenizer)
    info["eval"] = {}
    for domain, docs in eval_docs.items():
        tokens = _doc_tokens(tokenizer, docs, vocab_size, f"eval domain '{domain}'")
        rows = {"doc_id": [], "source": [], "tokens": [], "n_bytes": []}
        total = 0
        for doc, ids in zip(docs, tokens):
            if len(ids) < 2:  # nothing to predict
                continue
            if evaluation["max_tokens_per_domain"] and total >= evaluation["max_tokens_per_domain"]:
                break
            rows["doc_id"].append(doc["id"])
            rows["source"].append(doc.get("source", ""))
            rows["tokens"].append(ids)
            rows["n_bytes"].append(int(byte_lengths[np.asarray(ids[1:])].sum()))
            total += len(ids)
        if len(rows["doc_id"]) < evaluation["min_docs_per_domain"]:
            raise ShardError(f"eval domain '{domain}': {len(rows['doc_id'])} held-out documents, "
                             f"fewer than data.eval.min_docs_per_domain "
                             f"{evaluation['min_docs_per_domain']} (raise "
                             "data.corpus.heldout_fraction or give the domain more text)")
        path = _write_eval(data_dir / "eval" / f"{domain}.parquet", rows)
        written.append(path)
        info["eval"][domain] = {"documents": len(rows["doc_id"]), "tokens": total,
                                "bytes": int(sum(rows["n_bytes"]))}
    log("tokenize: eval " + ", ".join(f"{d} {v['documents']} docs / {v['tokens']:,} tokens"
                                      for d, v in info["eval"].items()))
    write_stage(data_dir, "tokenize", written, info)
    return info


def _write_eval(path: Path, rows: dict) -> Path:
    """eval/<domain>.parquet (relora.tables.EVAL_DOCUMENTS) from columns of equal length."""
    from ..tables import EVAL_DOCUMENTS, write_table

    names = EVAL_DOCUMENTS.names
    return write_table(EVAL_DOCUMENTS, [dict(zip(names, values)) for values in zip(*(rows[c] for c in names))],
                       path)


def check_eval_columns(table, path) -> None:
    """Raise naming the file and column when an eval table's `tokens` is not a list of integers
    or its `n_bytes` not an integer (a file written by something else)."""
    import pyarrow as pa

    expected = {"tokens": ("a list of integers", lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t))
                           and pa.types.is_integer(t.value_type)),
                "n_bytes": ("integers", pa.types.is_integer)}
    for column, (what, ok) in expected.items():
        if column in table.column_names and not ok(table.schema.field(column).type):
            raise ShardError(f"{path}: column '{column}' holds {table.schema.field(column).type}, "
                             f"expected {what}")


def read_eval(path: str | os.PathLike) -> dict:
    """doc_id, tokens (list of int arrays) and n_bytes of one eval/<domain>.parquet."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    check_eval_columns(table, path)
    return {"doc_id": table.column("doc_id").to_pylist(),
            "tokens": [np.asarray(t, dtype=np.int64) for t in table.column("tokens").to_pylist()],
            "n_bytes": np.asarray(table.column("n_bytes").to_pylist(), dtype=np.int64)}


def build_probe(data: dict, eval_dir: str | os.PathLike, out: str | os.PathLike,
                tokenizer_path: str | os.PathLike | None = None, log=log_progress) -> dict:
    """Run the probe stage: `out` (normally <data dir>/probe.npy) from the held-out evaluation
    documents in eval_dir; the EOS id comes from the tokenizer (default <eval_dir>/../tokenizer.json)."""
    from .tokenizer import eos_id_of

    eval_dir, out = Path(eval_dir), Path(out)
    tokenizer_path = tokenizer_path or eval_dir.parent / "tokenizer.json"
    _, eos_id = eos_id_of(tokenizer_path, data["tokenizer"]["eos_token"])
    seq_len, batch, seed = data["seq_len"], data["probe_batch"], data["corpus"]["split_seed"]
    paths = sorted(eval_dir.glob("*.parquet"))
    if not paths:
        raise ShardError(f"{eval_dir}: no eval/<domain>.parquet files (run `relora tokenize` first)")
    docs = []
    for path in paths:
        docs.extend(t.tolist() for t in read_eval(path)["tokens"])
    stream = join_documents(docs, eos_id, np.int64)
    window = seq_len + 1
    slots = stream.size // window
    if slots < batch:
        raise ShardError(f"{eval_dir}: {stream.size:,} held-out tokens make {slots} windows "
                         f"of seq_len + 1 = {window}, fewer than data.probe_batch {batch}")
    chosen = np.sort(np.random.default_rng(seed).choice(slots, size=batch, replace=False))
    probe = np.stack([stream[s * window:(s + 1) * window] for s in chosen])  # [probe_batch, seq_len + 1]
    path = save_npy(out, probe)
    info = {"shape": list(probe.shape), "dtype": "int64", "windows": chosen.tolist(),
            "from": "eval/*.parquet joined as EOS d1 EOS d2 ... (domains sorted by name)"}
    write_stage(out.parent, "probe", [path], info)
    log(f"probe: {batch} windows of {window} tokens -> {path}")
    return info
