"""Evaluation of a checkpoint: per-domain perplexity and bits per byte, and BLiMP.

docs/design.md, Metrics. Perplexity per held-out domain is token-weighted, exp(sum NLL / predicted
tokens), the first token of every document not predicted; bits per byte = sum NLL / (ln 2 * UTF-8
bytes of the predicted tokens), which compares models with different tokenizers; beside them the
paper's convention, the mean over documents of per-document perplexity (Paloma, Magnusson et al.
2023, reports the token-weighted one). Documents longer than the context are, by
`evaluation.perplexity.long_documents`, scored with a sliding window (`sliding`: each token
predicted once, with at least `context - stride` tokens of context after the first window, so
stride < context; the Hugging Face "perplexity of fixed-length models" recipe) or cut to their
first `context` tokens (`truncate`, the paper's convention: the rest is not scored, and tokens,
bytes and NLL count the scored part only).

BLiMP (Warstadt et al. 2020): a minimal pair is correct when the grammatical sentence has the
higher total log-probability. With `evaluation.blimp.first_token: scored` that is the sum over all
its tokens with the first predicted from an EOS context; with `unscored` (the paper's
re-implementation) the sentence is read without EOS and its first token is context only: a pair
that differs only in its first word (all pairs of only_npi_licensor_present and
superlative_quantifiers_2) is then decided by how that word conditions the rest of the sentence,
not by its own probability (a one-token sentence scores 0, so such a pair is a tie, counted
wrong). Accuracy per paradigm (UID); per
phenomenon (`linguistics_term`) and overall as means of paradigms.

Both score token sequences in length-sorted batches padded on the right: the decoder is causal,
so padding after a sequence never changes its logits, and only the loss needs a mask.

Checkpoints of any condition and either layout are read by relora.checkpoint.load_snapshot.
Evaluation runs the effective weights `W + scale * B @ A` in a plain decoder: the function a
LoRA model computes with dropout off.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.blimp import load_paradigm_file
from .model import PicoDecoder


# ----------------------------------------------------------------------------------------------
# Scoring token sequences


@torch.no_grad()
def score_sequences(model: PicoDecoder, sequences: list, first_scored: list[int] | None = None,
                    batch_tokens: int = 4096, device=None) -> np.ndarray:
    """Sum of next-token NLL of each sequence over positions p >= first_scored[i] (p >= 1).

    Token p is predicted from tokens [0, p) of its own sequence. Sequences are sorted by length
    and batched so that a batch holds at most `batch_tokens` (padded) tokens; padding goes on
    the right, where causal attention keeps it from touching real positions. Returns float64.
    """
    device = device or next(model.parameters()).device
    n = len(sequences)
    first_scored = first_scored if first_scored is not None else [1] * n
    lengths = np.array([len(s) for s in sequences])
    if n and lengths.max() > model.config.max_seq_len:
        raise ValueError(f"a sequence of {lengths.max()} tokens exceeds the context {model.config.max_seq_len}")
    nll = np.zeros(n, dtype=np.float64)
    order = np.argsort(-lengths, kind="stable")
    start = 0
    while start < n:
        width = int(lengths[order[start]])
        size = max(1, batch_tokens // max(width, 1))
        rows = order[start:start + size]
        start += len(rows)
        if width < 2:
            continue  # nothing to predict
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        scored = torch.zeros(len(rows), width - 1, dtype=torch.bool)  # position j predicts token j+1
        for r, i in enumerate(rows):
            seq = torch.as_tensor(np.asarray(sequences[i], dtype=np.int64))
            tokens[r, :len(seq)] = seq
            scored[r, max(first_scored[i], 1) - 1:len(seq) - 1] = True
        tokens, scored = tokens.to(device), scored.to(device)
        hidden = model.residual_stream(tokens[:, :-1])  # (B, T-1, C), before the output norm
        row, pos = scored.nonzero(as_tuple=True)  # (N,), (N,)
        # the LM head (most of a small model's FLOPs) only where a prediction is scored:
        # padding and the context part of sliding windows cost no logits
        logits = model.de_embedding_proj(model.output_norm(hidden[row, pos])).float()  # (N, V)
        token_nll = F.cross_entropy(logits, tokens[row, pos + 1], reduction="none")  # (N,)
        sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row, token_nll.double())
        nll[rows] = sums.cpu().numpy()
    return nll


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) windows covering a document of n tokens: window tokens are
    [begin, end); it scores the predictions of positions first_scored..end-1 (relative to the
    document), so that every position 1..n-1 is predicted exactly once."""
    # a window's first token has no context inside it, so consecutive windows must overlap
    if not 1 <= stride < context:
        raise ValueError(f"stride {stride} must be at least 1 and below the context {context}")
    if n_tokens <= context:
        return [(0, n_tokens, 1)]
    windows, begin, scored_until = [], 0, 1
    while True:
        end = min(begin + context, n_tokens)
        windows.append((begin, end, scored_until))
        scored_until = end
        if end == n_tokens:
            return windows
        begin += stride


@dataclass
class DomainScore:
    docs: int
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the predicted tokens
    nll: float  # sum over predicted tokens, nats
    perplexity_doc_mean: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else math.nan


LONG_DOCUMENTS = ("sliding", "truncate")


def truncate_documents(documents: list, n_bytes: list[int] | None, context: int,
                       token_bytes: np.ndarray | None) -> tuple[list, list[int] | None]:
    """Each document cut to its first `context` tokens, and the UTF-8 bytes of its predicted
    tokens recounted for those cut (`token_bytes[id]`: the bytes a token stands for); documents
    that fit keep their recorded bytes."""
    cut = [doc[:context] for doc in documents]
    if n_bytes is None:
        return cut, None
    long = [i for i, doc in enumerate(documents) if len(doc) > context]
    if long and token_bytes is None:
        raise ValueError("truncating documents needs the tokenizer's bytes per token to count their bytes")
    n_bytes = list(n_bytes)
    for i in long:
        if max(cut[i]) >= len(token_bytes):
            raise ValueError(f"document {i} has token id {max(cut[i])} outside the tokenizer's "
                             f"{len(token_bytes)} tokens")
        n_bytes[i] = int(token_bytes[np.asarray(cut[i][1:], dtype=np.int64)].sum())
    return cut, n_bytes


def score_documents(model: PicoDecoder, documents: list, n_bytes: list[int] | None = None,
                    stride: int | None = None, batch_tokens: int = 4096, device=None,
                    long_documents: str = "sliding", token_bytes: np.ndarray | None = None) -> DomainScore:
    """Token-weighted NLL, bits per byte and mean per-document perplexity of a set of documents.

    `long_documents`: `sliding` scores every token of a document longer than the context with
    sliding windows; `truncate` scores its first `context` tokens only (`token_bytes` recounts
    their bytes)."""
    context = model.config.max_seq_len
    if long_documents not in LONG_DOCUMENTS:
        raise ValueError(f"long_documents '{long_documents}' is not one of {', '.join(LONG_DOCUMENTS)}")
    if long_documents == "truncate":
        documents, n_bytes = truncate_documents(documents, n_bytes, context, token_bytes)
    stride = stride or max(context // 2, 1)
    windows, owners, first = [], [], []
    for d, doc in enumerate(documents):
        for begin, end, scored_from in sliding_windows(len(doc), context, stride):
            windows.append(doc[begin:end])
            owners.append(d)
            first.append(scored_from - begin)
    window_nll = score_sequences(model, windows, first, batch_tokens, device)
    doc_nll = np.bincount(np.asarray(owners, dtype=np.int64), weights=window_nll, minlength=len(documents))
    predicted = np.array([max(len(doc) - 1, 0) for doc in documents], dtype=np.int64)
    has_tokens = predicted > 0
    doc_ppl = np.exp(doc_nll[has_tokens] / predicted[has_tokens])
    return DomainScore(docs=int(has_tokens.sum()), tokens=int(predicted.sum()),
                       bytes=int(np.sum(n_bytes)) if n_bytes is not None else 0,
                       nll=float(doc_nll.sum()),
                       perplexity_doc_mean=float(doc_ppl.mean()) if doc_ppl.size else math.nan)


def read_eval_domains(eval_dir, max_docs: int | None = None) -> dict[str, tuple[list, list[int]]]:
    """{domain: (token lists, n_bytes)} from eval/<domain>.parquet (doc_id, tokens, n_bytes)."""
    import pyarrow.parquet as pq

    from .data.shards import check_eval_columns

    eval_dir = Path(eval_dir)
    files = sorted(eval_dir.glob("*.parquet")) if eval_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{eval_dir}: no evaluation files (<domain>.parquet) found")
    domains = {}
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as e:
            raise ValueError(f"{file}: not a readable Parquet file: {e}") from None
        missing = {"tokens", "n_bytes"} - set(table.column_names)
        if missing:
            raise ValueError(f"{file}: missing column(s) {', '.join(sorted(missing))}")
        check_eval_columns(table, file)
        if "doc_id" in table.column_names:
            table = table.sort_by("doc_id")
        if max_docs is not None:
            table = table.slice(0, max_docs)
        domains[file.stem] = (table.column("tokens").to_pylist(), table.column("n_bytes").to_pylist())
    return domains


# ----------------------------------------------------------------------------------------------
# BLiMP


FIRST_TOKEN = ("scored", "unscored")


def _sentence_sequence(tokens, eos_id: int, first_token: str) -> list[int]:
    """What the model reads for a sentence: EOS then the sentence (`scored`: the first token is
    predicted from EOS), or the sentence alone (`unscored`: its first token is context only)."""
    if first_token not in FIRST_TOKEN:
        raise ValueError(f"first_token '{first_token}' is not one of {', '.join(FIRST_TOKEN)}")
    return [eos_id, *tokens] if first_token == "scored" else list(tokens)


def score_sentences(model: PicoDecoder, sentences: list, eos_id: int, batch_tokens: int = 4096,
                    device=None, first_token: str = "scored") -> np.ndarray:
    """Total log-probability of each tokenised sentence: every token predicted from the ones
    before it, the first from EOS (`scored`) or not at all (`unscored`)."""
    sequences = [_sentence_sequence(tokens, eos_id, first_token) for tokens in sentences]
    return -score_sequences(model, sequences, None, batch_tokens, device)


@torch.no_grad()
def score_sentence_naive(model: PicoDecoder, tokens, eos_id: int, first_token: str = "scored") -> float:
    """The same, one sentence and one position at a time: the reference the batched path is tested on."""
    device = next(model.parameters()).device
    seq = torch.tensor([_sentence_sequence(tokens, eos_id, first_token)], device=device)
    log_probs = torch.log_softmax(model(seq).double(), dim=-1)[0]  # (T, V)
    return float(sum(log_probs[p - 1, seq[0, p]] for p in range(1, seq.shape[1])))


def read_blimp(blimp_dir) -> list[dict]:
    """Every pair of blimp/<UID>.jsonl: sentence_good, sentence_bad, UID, linguistics_term, field
    (and the `source` the data stage records)."""
    blimp_dir = Path(blimp_dir)
    files = sorted(blimp_dir.glob("*.jsonl")) if blimp_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{blimp_dir}: no BLiMP files (<UID>.jsonl) found")
    pairs = []
    for file in files:  # the data stage's validating reader: errors name the file and line
        for row in load_paradigm_file(file):
            pairs.append({"uid": row["UID"], "phenomenon": row["linguistics_term"], "field": row["field"],
                          "good": row["sentence_good"], "bad": row["sentence_bad"],
                          "source": row.get("source")})
    return pairs


def blimp_scores(model: PicoDecoder, pairs: list[dict], encode, eos_id: int, batch_tokens: int = 4096,
                 device=None, first_token: str = "scored") -> list[dict]:
    """Per-paradigm accuracy rows (uid, phenomenon, field, pairs, correct, accuracy, source,
    first_token).

    `encode` maps a sentence to token ids. Good and bad sentences are scored together in
    length buckets; a pair is correct when log p(good) > log p(bad) (a tie counts as wrong).
    `first_token`: whether a sentence's first token is scored (module docstring).
    """
    sentences = [encode(p["good"]) for p in pairs] + [encode(p["bad"]) for p in pairs]
    log_probs = score_sentences(model, sentences, eos_id, batch_tokens, device, first_token)
    good, bad = log_probs[:len(pairs)], log_probs[len(pairs):]
    rows: dict[str, dict] = {}
    for pair, lp_good, lp_bad in zip(pairs, good, bad):
        row = rows.setdefault(pair["uid"], {"uid": pair["uid"], "phenomenon": pair["phenomenon"],
                                            "field": pair["field"], "pairs": 0, "correct": 0,
                                            "source": pair.get("source"), "first_token": first_token})
        row["pairs"] += 1
        row["correct"] += int(lp_good > lp_bad)
    for row in rows.values():
        row["accuracy"] = row["correct"] / row["pairs"]
    return sorted(rows.values(), key=lambda r: r["uid"])


def blimp_summary(rows: list[dict]) -> dict:
    """Accuracy per phenomenon and overall, each a mean of paradigm accuracies."""
    by_phenomenon: dict[str, list[float]] = {}
    for row in rows:
        by_phenomenon.setdefault(row["phenomenon"], []).append(row["accuracy"])
    return {"overall": float(np.mean([r["accuracy"] for r in rows])) if rows else math.nan,
            "phenomenon": {k: float(np.mean(v)) for k, v in sorted(by_phenomenon.items())}}


EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>")


def load_tokenizer(data_dir):
    """(encode, eos_id) from DATA_DIR/tokenizer.json (Hugging Face `tokenizers` format). The EOS
    id comes from manifest.json (`eos_id`, top level or under `tokenizer`) or a known EOS name."""
    from tokenizers import Tokenizer

    data_dir = Path(data_dir)
    path = data_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable tokenizer: {e}") from None
    eos_id = None
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        eos_id = info.get("eos_id", (info.get("tokenizer") or {}).get("eos_id") if isinstance(info.get("tokenizer"), dict) else None)
    if eos_id is None:
        for name in EOS_NAMES:
            eos_id = tokenizer.token_to_id(name)
            if eos_id is not None:
                break
    if eos_id is None:
        raise ValueError(f"{path}: no EOS token found (looked for {', '.join(EOS_NAMES)} and manifest eos_id)")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    return encode, int(eos_id)
