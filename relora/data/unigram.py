"""A context-free baseline for BLiMP: each sentence scored by its tokens' unigram log-probabilities.

A minimal pair that such a scorer gets right (or wrong) nearly always is decided by which words
are frequent, not by grammar; a model's accuracy on it says little about what it learnt of the
phenomenon. The data stage records this scorer's accuracy per paradigm (`blimp_unigram.parquet`,
loaded into the study database as `blimp_baselines`), and the generator balances its paradigms
against it (generate_blimp.py).

- score(sentence) = sum over its tokens t of log p(t), with add-one (Laplace) smoothing over the
  tokenizer's V tokens: p(t) = (count(t) + 1) / (total + V), so a token the counts never saw has a
  low but finite probability.
- Every token is scored, the first included: the models predict a sentence's first token from an
  EOS context (evaluate.score_sentences), and a context-free scorer's prediction from any
  context is the token's unigram probability.
- A pair is correct when score(good) > score(bad); a tie (e.g. the two sentences hold the same
  tokens in another order) counts as incorrect, as it does for the models.
- Counts: the training tokens in train.npy (documents joined by EOS, EOS counted), or, for a
  study that streams its training rows, the first `evaluation.blimp.unigram_rows` rows of the
  stream; the source and the number of tokens are recorded in the data manifest.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np

UNIGRAM_FILE = "blimp_unigram.parquet"
SMOOTHING = "add-one"
BALANCED_RANGE = (0.35, 0.65)


def counts_from_token_file(path: str | os.PathLike, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """How often each token id occurs in a 1-D token file (train.npy), read memory-mapped."""
    path = Path(path)
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D array of token ids, got shape {tokens.shape}")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, tokens.size, chunk):
        part = np.asarray(tokens[start:start + chunk], dtype=np.int64)
        if part.size and (part.max() >= vocab_size or part.min() < 0):
            raise ValueError(f"{path}: token id {int(part.max())} is outside the tokenizer's "
                             f"{vocab_size} tokens")
        counts += np.bincount(part, minlength=vocab_size)
    return counts


def counts_from_rows(rows, vocab_size: int, what: str = "the training stream") -> np.ndarray:
    """How often each token id occurs in an iterable of token-id rows (a streamed corpus)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for n, row in enumerate(rows):
        ids = np.asarray(row, dtype=np.int64)
        if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
            raise ValueError(f"{what}, row {n}: token id {int(ids.max())} is outside the "
                             f"tokenizer's {vocab_size} tokens")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def counts_from_stream(datasets: list[dict], rows: int, vocab_size: int) -> np.ndarray:
    """Token counts of the first `rows` rows of the concatenated training streams, in the order
    the trainer reads them (relora/data/stream.py)."""
    from .stream import StreamedBatches

    stream = StreamedBatches(datasets, seq_len=1, batch_size=1, vocab_size=vocab_size).rows_from(0)
    return counts_from_rows(itertools.islice(stream, rows), vocab_size)


class UnigramScorer:
    """Sentence log-probabilities under add-one-smoothed unigram token frequencies."""

    def __init__(self, counts, encode=None):
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
            raise ValueError("unigram counts must be a non-empty 1-D array of non-negative counts")
        self.vocab_size = counts.size
        self.total = float(counts.sum())
        self.log_probs = np.log(counts + 1.0) - math.log(self.total + self.vocab_size)
        self.encode = encode

    def score_ids(self, ids) -> float:
        """Sum of the tokens' log-probabilities, the first token included."""
        return float(self.log_probs[np.asarray(ids, dtype=np.int64)].sum())

    def score(self, sentence: str) -> float:
        if self.encode is None:
            raise ValueError("UnigramScorer.score needs an `encode` (text -> token ids)")
        return self.score_ids(self.encode(sentence))

    def correct(self, good: str, bad: str) -> bool:
        """Whether the scorer prefers the grammatical sentence (a tie is incorrect)."""
        return self.score(good) > self.score(bad)


def unigram_accuracy(paradigms: dict[str, list[dict]], scorer: UnigramScorer,
                     source: str | None = None) -> list[dict]:
    """One row per paradigm ({UID: pairs in BLiMP's format}): the unigram scorer's accuracy."""
    rows = []
    for uid, pairs in sorted(paradigms.items()):
        correct = sum(scorer.correct(p["sentence_good"], p["sentence_bad"]) for p in pairs)
        rows.append({"uid": uid, "phenomenon": pairs[0]["linguistics_term"], "field": pairs[0]["field"],
                     "baseline": "unigram", "pairs": len(pairs), "correct": int(correct),
                     "accuracy": correct / len(pairs) if pairs else math.nan, "source": source})
    return rows


def outside_range(rows: list[dict], low: float = BALANCED_RANGE[0],
                  high: float = BALANCED_RANGE[1]) -> list[str]:
    """The paradigms a frequency scorer solves or anti-solves: accuracy outside [low, high]."""
    return [r["uid"] for r in rows if not low <= r["accuracy"] <= high]


def write_unigram_table(rows: list[dict], path: str | os.PathLike) -> Path:
    """blimp_unigram.parquet: the table `blimp_baselines` of the study database
    (relora.tables.BLIMP_BASELINES)."""
    from ..tables import BLIMP_BASELINES, write_table

    return write_table(BLIMP_BASELINES, rows, path)


def study_unigram_counts(data_dir: str | os.PathLike, vocab_size: int,
                         stream_rows: int) -> tuple[np.ndarray, dict]:
    """(counts, how they were obtained) for the study whose data folder is `data_dir`: from
    train.npy, or from the first `stream_rows` rows of the training stream the tokenize stage
    recorded (train.kind 'stream')."""
    from .manifest import read_stage

    data_dir = Path(data_dir)
    train = (read_stage(data_dir, "tokenize").get("info") or {}).get("train") or {}
    kind = train.get("kind", "npy")
    if kind == "stream":
        counts = counts_from_stream(train.get("datasets") or [], stream_rows, vocab_size)
        info = {"counts_from": "stream", "rows": stream_rows,
                "datasets": [d.get("path") for d in train.get("datasets") or []]}
    else:
        path = data_dir / train.get("path", "train.npy")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: training tokens not found (run `relora tokenize` first)")
        counts = counts_from_token_file(path, vocab_size)
        info = {"counts_from": path.name}
    info.update(tokens=int(counts.sum()), vocab_size=vocab_size, smoothing=SMOOTHING)
    return counts, info
