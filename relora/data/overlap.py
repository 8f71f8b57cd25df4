"""How much of each held-out document training has seen: its n-token windows found in train.npy.

The corpus stage keeps near-copies on one side of the split (corpus.py: grouping by shared word
shingles) before any tokenizer exists; this module checks the result afterwards with the study's
own tokens. A window is a run of n consecutive token ids; a held-out document's overlap is the
share of its windows that also occur anywhere in the training tokens. Windows are compared by a
64-bit polynomial hash of their ids: with a few million training windows a false match has a
probability of about 1e-13 per window, far below anything a fraction can show.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# an odd 64-bit multiplier (the fractional part of the golden ratio): ids mix in every bit
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


def window_hashes(tokens, n: int) -> np.ndarray:
    """uint64 hash of every window of n consecutive ids (len(tokens) - n + 1 of them)."""
    ids = np.asarray(tokens).astype(np.uint64)
    count = ids.size - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 on purpose
        for k in range(n):
            h = h * _MULTIPLIER + ids[k:k + count] + np.uint64(1)
    return h


def windows_seen(train_tokens, docs: list, n: int = 13) -> list[float | None]:
    """For each document (a sequence of token ids), the share of its n-token windows that occur
    in train_tokens; None for a document shorter than n tokens (it has no window)."""
    seen = np.unique(window_hashes(train_tokens, n))
    out: list[float | None] = []
    for doc in docs:
        h = window_hashes(doc, n)
        if not h.size:
            out.append(None)
            continue
        where = np.minimum(np.searchsorted(seen, h), seen.size - 1)
        out.append(float((seen[where] == h).mean()))
    return out


def heldout_overlap(data_dir: str | os.PathLike, n: int = 13) -> dict:
    """Overlap of every held-out document (chunk) of a built data dir with its train.npy, in the
    dir's tokenizer: {domain: [(doc id, share of windows seen or None), ...]}."""
    from .corpus import corpus_domains, read_docs
    from .shards import _doc_tokens, load_train
    from .tokenizer import load_tokenizer

    data_dir = Path(data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    train = np.asarray(load_train(data_dir))
    vocab_size = tokenizer.get_vocab_size()
    ids, tokens = {}, []
    for domain, meta in corpus_domains(data_dir / "corpus").items():
        if meta.get("streamed"):
            continue
        docs = list(read_docs(data_dir / "corpus", "heldout", domain))
        ids[domain] = [d["id"] for d in docs]
        tokens.extend(_doc_tokens(tokenizer, docs, vocab_size, f"heldout/{domain}.jsonl"))
    shares = iter(windows_seen(train, tokens, n))
    return {domain: [(doc_id, next(shares)) for doc_id in doc_ids] for domain, doc_ids in ids.items()}
