"""Near-copies stay on one side of the train/held-out split: documents grouped by shared shingles.

Removing exact duplicates is not enough for evaluation sets: LAMBADA's passages are overlapping
windows of the same novels, HellaSwag items built from one video share their context. Split
document by document, a held-out passage can sit almost whole inside a training one (in the
default corpus, 15 of 1,850 held-out documents had more than half of their 13-token windows in
train.npy, one all of them). The split is decided before any tokenizer exists, so
documents are compared by shingles: runs of n words, normalised (lower case, letters and digits
only) so that punctuation, markup and spacing do not hide a copy. A document of fewer than n
words has one shingle, all its words.

Documents that share a shingle are linked, and linked documents form a group (connected
components by union-find); the split then assigns whole groups. A shingle found in more than
`max_docs` documents is boilerplate (a standard question stem, a figure's code preamble, a
licence line) rather than evidence of a copy: it is ignored, and so are the shingles that
overlap it in a document, so that boilerplate does not chain a whole domain into one group.

Groups are held out in a seeded order (a hash of the seed and the group's smallest document
digest, so a group's chance does not grow with its size) while each of their domains still has
room: every domain's held-out share, counted in documents, ends at round(fraction x documents),
unless its groups are too large to reach it. A group larger than the room left goes to training.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from .overlap import window_hashes

_WORD = re.compile(r"\w+")


def normalised_words(text: str) -> list[str]:
    """The words a shingle is made of: lower-cased runs of letters, digits and underscores."""
    return _WORD.findall(text.lower())


def document_shingles(sequences: list, n: int, max_docs: int) -> tuple:
    """Every shingle occurrence of every document, sorted by hash then document: (hash, document
    index, number of documents with that shingle, whether the occurrence can link). `sequences`
    are each document's words (or, for pretokenized documents, token ids); a document of fewer
    than n of them has one shingle, all of them.

    An occurrence cannot link when its shingle is in more than max_docs documents, nor when it
    overlaps such a frequent shingle in its document: a shingle of boilerplate plus a word or
    two of text (the common words after a standard question stem) would otherwise still chain
    the documents that happen to continue the boilerplate alike."""
    vocab: defaultdict = defaultdict()
    vocab.default_factory = vocab.__len__  # word -> id in order of first sight: deterministic
    ids = [np.fromiter(map(vocab.__getitem__, seq), dtype=np.int64, count=len(seq))
           for seq in sequences]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    flat = np.concatenate(ids) if ids else np.empty(0, np.int64)
    doc_of = np.repeat(np.arange(len(ids)), lengths)
    h = window_hashes(flat, n)
    inside = doc_of[:h.size] == doc_of[n - 1:n - 1 + h.size]  # no window across documents
    start = np.flatnonzero(inside)  # each window's first word in `flat`
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    hashes = np.concatenate([h[inside], *[window_hashes(ids[i], len(ids[i])) for i in short]])
    docs = np.concatenate([doc_of[start], short])
    start = np.concatenate([start, np.full(short.size, -1)])  # -1: the whole of a short document

    order = np.lexsort((docs, hashes))
    hashes, docs, start = hashes[order], docs[order], start[order]
    new_shingle = np.ones(hashes.size, dtype=bool)
    new_shingle[1:] = hashes[1:] != hashes[:-1]
    new_doc = new_shingle.copy()
    new_doc[1:] |= docs[1:] != docs[:-1]
    shingle = np.cumsum(new_shingle) - 1
    n_docs = np.bincount(shingle, weights=new_doc).astype(np.int64)[shingle]

    # words covered by a frequent shingle are boilerplate; no occurrence touching one links
    frequent = np.zeros(flat.size + n, dtype=np.int64)
    frequent[start[(n_docs > max_docs) & (start >= 0)]] = 1
    seen = np.r_[0, np.cumsum(frequent)]  # seen[k] = frequent windows starting before k
    lo, hi = np.maximum(start - n + 1, 0), np.minimum(start + n, flat.size + n)
    touches = (start >= 0) & (seen[hi] - seen[lo] > 0)
    can_link = new_doc & (n_docs <= max_docs) & ~touches
    return hashes, docs, n_docs, can_link


def group_documents(sequences: list, n: int, max_docs: int) -> tuple[np.ndarray, dict]:
    """A group label per document (the smallest document index of its group) and statistics:
    documents sharing a shingle found in at most max_docs documents are in one group."""
    hashes, docs, n_docs, can_link = document_shingles(sequences, n, max_docs)
    # each linking occurrence is linked to the previous linking occurrence of the same shingle
    linking = np.flatnonzero(can_link)
    same = hashes[linking[1:]] == hashes[linking[:-1]]
    a, b = docs[linking[:-1][same]], docs[linking[1:][same]]

    parent = list(range(len(sequences)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    labels = np.array([root(x) for x in range(len(sequences))], dtype=np.int64)
    sizes = np.bincount(labels, minlength=len(sequences))
    first = np.ones(hashes.size, dtype=bool)
    first[1:] = hashes[1:] != hashes[:-1]
    stats = {"shingles": int(first.sum()),
             "shared_shingles": int((first & (n_docs >= 2) & (n_docs <= max_docs)).sum()),
             "frequent_shingles_ignored": int((first & (n_docs > max_docs)).sum()),
             "groups": int((sizes > 0).sum()),
             "documents_in_groups_of_2_or_more": int(sizes[sizes > 1].sum()),
             "largest_group": int(sizes.max()) if sizes.size else 0}
    return labels, stats


def split_groups(labels: np.ndarray, domains: list[str], keys: dict[int, float],
                 fraction: float) -> np.ndarray:
    """Held-out mask: whole groups in increasing key order, each while every domain it touches
    has room below its quota round(fraction x its documents)."""
    labels = np.asarray(labels)
    members: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels.tolist()):
        members[label].append(i)
    total: dict[str, int] = defaultdict(int)
    for domain in domains:
        total[domain] += 1
    room = {domain: round(fraction * n) for domain, n in total.items()}
    heldout = np.zeros(len(domains), dtype=bool)
    for label in sorted(members, key=lambda g: (keys[g], g)):
        need: dict[str, int] = defaultdict(int)
        for i in members[label]:
            need[domains[i]] += 1
        if all(room[domain] >= k for domain, k in need.items()):
            for domain, k in need.items():
                room[domain] -= k
            heldout[members[label]] = True
            if not any(room.values()):
                break
    return heldout
