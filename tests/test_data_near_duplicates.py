"""The split keeps near-copies together (relora/data/near_duplicates.py) and the check that
measures it with the study's tokens (relora/data/overlap.py)."""

import json
import random
from collections import Counter

import numpy as np
import pytest

from data_helpers import data_config, sentences
from relora.data.corpus import CorpusError, build_corpus, read_docs
from relora.data.near_duplicates import group_documents, normalised_words, split_groups
from relora.data.overlap import heldout_overlap, window_hashes, windows_seen

quiet = dict(log=lambda m: None)


def _near_copies(rng: random.Random, base: str) -> list[str]:
    """Three near-copies of a passage: other case and punctuation, an overlapping window (its
    second half followed by new text), one word changed in the middle."""
    words = base.split()
    changed = list(words)
    changed[len(words) // 2] = "zebra"
    return [base.upper().replace(".", " !"),
            " ".join(words[len(words) // 2:]) + " " + sentences(rng, 4),
            " ".join(changed)]


def test_normalised_words():
    assert normalised_words("Hello, WORLD! It's $x^2$-ready\n\tnow") == \
        ["hello", "world", "it", "s", "x", "2", "ready", "now"]


def test_window_hashes_and_windows_seen_on_known_sequences():
    train = np.arange(100, 140)  # windows of 13 ids: 100..112, 101..113, ..., 127..139
    assert window_hashes(train, 13).size == 28 and np.unique(window_hashes(train, 13)).size == 28
    assert window_hashes([1, 2, 3], 13).size == 0
    inside = list(range(110, 130))                 # all 8 windows in train
    half = list(range(120, 140)) + [7] * 8         # windows start at 120..134: 8 of 16 in train
    outside = list(range(110, 125))[::-1]          # reversed: no window in train
    assert windows_seen(train, [inside, half, outside, [1, 2]], n=13) == [1.0, 0.5, 0.0, None]


def test_near_copies_form_one_group_and_singletons_stay_alone():
    rng = random.Random(0)
    unique = [sentences(rng, 6) for _ in range(300)]
    bases = [sentences(rng, 10) for _ in range(20)]
    docs = unique + bases + [c for b in bases for c in _near_copies(rng, b)]
    labels, stats = group_documents([normalised_words(t) for t in docs], 13, 10)
    assert labels[:300].tolist() == list(range(300))  # a label is the group's first document
    for i in range(20):
        cluster = [300 + i] + [320 + 3 * i + k for k in range(3)]
        assert set(labels[cluster].tolist()) == {300 + i}, i
    assert stats["groups"] == 320 and stats["largest_group"] == 4
    assert stats["documents_in_groups_of_2_or_more"] == 80


def test_a_frequent_boilerplate_shingle_does_not_merge_everything():
    rng = random.Random(1)
    boilerplate = "The following passage is reproduced here for the purposes of evaluation only and nothing else ."
    docs = [f"{boilerplate} {sentences(rng, 5)}" for _ in range(100)]
    sequences = [normalised_words(t) for t in docs]
    labels, stats = group_documents(sequences, 13, max_docs=10)
    assert np.unique(labels).size == 100 and stats["largest_group"] == 1
    assert stats["frequent_shingles_ignored"] == len(normalised_words(boilerplate)) - 13 + 1
    # the same shingles allowed in every document chain all of them into one group
    labels, stats = group_documents(sequences, 13, max_docs=100)
    assert np.unique(labels).size == 1 and stats["largest_group"] == 100


def test_short_documents_link_only_when_equal_after_normalisation():
    docs = ["Open a jar. Twist the lid.", "open a JAR -- twist the lid!", "Open a jar. Hit it."]
    labels, _ = group_documents([normalised_words(t) for t in docs], 13, 10)
    assert labels.tolist() == [0, 0, 2]


def test_split_fills_each_domain_share_with_whole_groups():
    rng = np.random.default_rng(0)
    sizes = rng.choice([1, 1, 1, 2, 3, 5, 8, 13], size=700)
    labels = np.repeat(np.arange(sizes.size), sizes)
    # groups in either domain, and a few spanning both (a near-copy across domains)
    domains = [("alpha" if g % 3 else "beta") for g in labels]
    for g in range(0, sizes.size, 50):
        first = int(np.flatnonzero(labels == g)[0])
        domains[first] = "beta" if domains[first] == "alpha" else "alpha"
    keys = {int(g): float(k) for g, k in zip(range(sizes.size), rng.random(sizes.size))}
    for fraction in (0.05, 0.2, 0.5):
        held = split_groups(labels, domains, keys, fraction)
        for domain, n in Counter(domains).items():
            in_domain = np.array([d == domain for d in domains])
            assert held[in_domain].sum() == round(fraction * n), (fraction, domain)
            assert abs(held[in_domain].mean() - fraction) <= 0.02
        for g in range(sizes.size):  # whole groups only
            assert len(set(held[labels == g].tolist())) == 1
    # a group larger than a domain's quota goes to training
    labels = np.r_[np.zeros(30, int), np.arange(1, 71)]
    held = split_groups(labels, ["a"] * 100, {g: 0.0 if g == 0 else 0.5 for g in range(71)}, 0.1)
    assert not held[:30].any() and held.sum() == 10


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return [str(path)]


def _sides(corpus_dir, domains):
    """{text: "train" | "heldout"} of every written document or chunk, and {id of a document
    cut into chunks: sides of its chunks}."""
    side, chunks = {}, {}
    for split in ("train", "heldout"):
        for domain in domains:
            for doc in read_docs(corpus_dir, split, domain):
                side[doc["text"]] = split
                if "#" in doc["id"]:
                    chunks.setdefault(doc["id"].split("#")[0], set()).add(split)
    return side, chunks


def test_corpus_keeps_near_copies_and_chunks_on_one_side(tmp_path):
    rng = random.Random(2)
    bases = [sentences(rng, 10) for _ in range(30)]
    copies = {b: _near_copies(rng, b) for b in bases}
    # alpha: unique documents, the passages and two of their copies; beta: unique documents,
    # the third copy (a near-copy across domains) and a few long documents cut into chunks
    alpha = [sentences(rng, 6) for _ in range(200)] + bases + [c for b in bases for c in copies[b][:2]]
    beta = [sentences(rng, 6) for _ in range(150)] + [copies[b][2] for b in bases]
    long_docs = ["\n\n".join(sentences(rng, 8) for _ in range(8)) for _ in range(20)]
    files = {"alpha": _write(tmp_path / "alpha.jsonl", alpha),
             "beta": _write(tmp_path / "beta.jsonl", beta + long_docs)}
    held_sets = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}" / "corpus"
        data = data_config(files=files, split_seed=seed, max_doc_chars=1000)
        info = build_corpus(data, out, **quiet)
        side, chunks = _sides(out, ("alpha", "beta"))
        for b in bases:
            assert {side[b]} == {side[c] for c in copies[b]}, (seed, b)
        assert any(side[b] == "heldout" for b in bases)  # the test holds some groups out
        assert len(chunks) == len(long_docs) and all(len(sides) == 1 for sides in chunks.values())
        grouping = info["near_duplicates"]
        assert grouping["shingle_words"] == 13 and grouping["largest_group"] == 4
        assert grouping["groups"] == len(alpha) + len(beta) + len(long_docs) - 3 * len(bases)
        for domain, n in (("alpha", len(alpha)), ("beta", len(beta) + len(long_docs))):
            meta = info["domains"][domain]
            assert meta["heldout"]["documents"] == round(0.2 * n)
            assert meta["heldout"]["share_of_documents"] == pytest.approx(round(0.2 * n) / n, abs=1e-5)
        held_sets.append({t for t, s in side.items() if s == "heldout"})
    assert held_sets[0] != held_sets[1]  # the seed decides which groups are held out


def test_corpus_rejects_a_domain_whose_groups_are_too_large(tmp_path):
    rng = random.Random(3)
    words = " ".join(sentences(rng, 200) for _ in range(2)).split()
    chained = [" ".join(words[10 * k:10 * k + 40]) for k in range(50)]  # each overlaps the next
    singles = [sentences(rng, 6) for _ in range(5)]
    files = {"gamma": _write(tmp_path / "gamma.jsonl", chained + singles)}
    with pytest.raises(CorpusError, match=r"domain 'gamma': only 5 of 55 documents .* too large"):
        build_corpus(data_config(files=files), tmp_path / "c1", **quiet)
    # without grouping every document is alone and the share is filled
    info = build_corpus(data_config(files=files, shingle_words=None), tmp_path / "c2", **quiet)
    assert info["domains"]["gamma"]["heldout"]["documents"] == 11


@pytest.mark.slow
def test_no_heldout_document_of_the_default_corpus_is_mostly_in_training(default_corpus_data):
    """The study's own check: 13-token windows of its trained BPE. Before documents were grouped
    (split one by one), 15 of the 1,850 held-out documents had more than half of their windows
    in train.npy, up to all of them (a LAMBADA window inside a longer one)."""
    root = default_corpus_data.data
    data = default_corpus_data.study["data"]
    overlap = heldout_overlap(root, n=13)
    shares = {doc_id: s for rows in overlap.values() for doc_id, s in rows if s is not None}
    assert len(shares) > 1000
    worst = max(shares, key=shares.get)
    assert shares[worst] <= 0.5, (worst, shares[worst])
    corpus = json.loads((root / "corpus" / "corpus.json").read_text())
    fraction = data["corpus"]["heldout_fraction"]
    for domain, meta in corpus["domains"].items():
        assert abs(meta["heldout"]["share_of_documents"] - fraction) <= 0.02, domain
    grouping = corpus["near_duplicates"]
    assert grouping["documents_in_groups_of_2_or_more"] > 0 and grouping["largest_heldout_group"] > 1
