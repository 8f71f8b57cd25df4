"""BLiMP minimal pairs for the study: a local folder, the Hugging Face dataset, or generated.

`evaluation.blimp.source`:
- `generated`: the project's templates and lexicon (generate_blimp.py), words filtered to those
  frequent in the corpus's training split (offline; the default study);
- `nyu-mll/blimp` or `hf:<dataset id>`: the Hugging Face dataset, one config per paradigm
  (for users with internet; needs the `datasets` package);
- any other value: a local folder of `<UID>.jsonl` files in BLiMP's own format.

Real pairs are subset to `pairs_per_paradigm` per paradigm by a seeded hash of the pair id (the
same subset every time); the output is `<out>/<UID>.jsonl` in BLiMP's format plus a `source`
field. Malformed files (bad JSON, missing fields, empty, several paradigms in one file) get an
error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..io import safe_name
from .manifest import atomic_path, write_stage

log_progress = logging.getLogger(__name__).info  # the default `log` of the stage builders

REQUIRED = ("sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pairID")
HF_DATASET = "nyu-mll/blimp"


class BlimpError(ValueError):
    """A BLiMP source or file that cannot be used; the message names the file and line."""


def load_paradigm_file(path: str | os.PathLike) -> list[dict]:
    """The pairs of one BLiMP <UID>.jsonl file, validated."""
    path = Path(path)
    pairs, uid = [], None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pair = json.loads(line)
            except json.JSONDecodeError as e:
                raise BlimpError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(pair, dict):
                raise BlimpError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in REQUIRED if k not in pair]
            if missing:
                raise BlimpError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            for key in ("sentence_good", "sentence_bad"):
                if not isinstance(pair[key], str) or not pair[key].strip():
                    raise BlimpError(f"{path}:{lineno}: {key} is empty")
            uid = uid or pair["UID"]
            if pair["UID"] != uid:
                raise BlimpError(f"{path}:{lineno}: UID '{pair['UID']}' differs from '{uid}' of the "
                                 "lines before (one paradigm per file)")
            pair["pairID"] = str(pair["pairID"])
            pairs.append(pair)
    if not pairs:
        raise BlimpError(f"{path}: no pairs (empty file)")
    if uid != path.name.removesuffix(".jsonl"):
        raise BlimpError(f"{path}: holds paradigm '{uid}' but is named {path.name} (expected {uid}.jsonl)")
    return pairs


def load_local(folder: str | os.PathLike, paradigms: list[str] | None = None) -> dict[str, list[dict]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise BlimpError(f"evaluation.blimp.source: '{folder}' is not a folder of BLiMP .jsonl files "
                         "(nor 'generated' or a Hugging Face dataset id)")
    paths = sorted(folder.glob("*.jsonl"))
    if paradigms:
        missing = [p for p in paradigms if not (folder / f"{p}.jsonl").exists()]
        if missing:
            raise BlimpError(f"{folder}: no file for paradigm(s) {', '.join(missing)}")
        paths = [folder / f"{p}.jsonl" for p in paradigms]
    if not paths:
        raise BlimpError(f"{folder}: no BLiMP .jsonl files")
    return {p.name.removesuffix(".jsonl"): load_paradigm_file(p) for p in paths}


def require_datasets(dataset: str):
    try:
        import datasets
    except ImportError:
        raise BlimpError(f"evaluation.blimp.source: the Hugging Face dataset '{dataset}' needs the "
                         "`datasets` package and internet access; or point source at a local folder "
                         "or use 'generated'") from None
    return datasets


def load_hf(dataset: str = HF_DATASET, paradigms: list[str] | None = None,
            revision: str | None = None) -> dict[str, list[dict]]:
    """BLiMP from the Hugging Face hub at a commit (`revision`, resolved by the caller): one
    config per paradigm, split `train`."""
    datasets = require_datasets(dataset)
    names = paradigms or datasets.get_dataset_config_names(dataset, revision=revision)
    out = {}
    for uid in names:
        rows = datasets.load_dataset(dataset, uid, split="train", revision=revision)
        missing = [k for k in REQUIRED if k not in rows.column_names]
        if missing:
            raise BlimpError(f"{dataset}@{revision}/{uid}: expected columns {', '.join(REQUIRED)}, found "
                             f"columns: {', '.join(rows.column_names)} (missing: {', '.join(missing)})")
        out[uid] = [{**row, "pairID": str(row["pairID"])} for row in rows]
    return out


def subset(pairs: list[dict], n: int | None, seed: int) -> list[dict]:
    """A deterministic subset of n pairs (by a seeded hash of UID and pairID), in pairID order."""
    if not n or n >= len(pairs):
        return list(pairs)
    from .corpus import split_key

    chosen = sorted(pairs, key=lambda p: split_key(f"{p['UID']}\0{p['pairID']}", seed))[:n]
    return sorted(chosen, key=lambda p: (len(p["pairID"]), p["pairID"]))


def previous_paradigm_files(out: Path) -> list[Path]:
    """The .jsonl files in `out` that an earlier run of this stage wrote (its stage record lists
    them); any other file there is not ours to delete."""
    record = Path(out).parent / "stages" / "blimp.json"
    try:
        files = json.loads(record.read_text())["files"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return []
    paths = [Path(out).parent / f["path"] for f in files if isinstance(f, dict) and "path" in f]
    return [p for p in paths if p.parent.resolve() == Path(out).resolve() and p.suffix == ".jsonl"]


def write_paradigm(path: Path, pairs: list[dict], source: str) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps({**pair, "source": source}, ensure_ascii=False) + "\n")
    return path


def _unigram_scorer(spec: dict, data_dir: Path, tokenizer: str | os.PathLike, log):
    """The frequency scorer of the study (unigram.py) and how its counts were obtained."""
    from .tokenizer import load_tokenizer
    from .unigram import UnigramScorer, study_unigram_counts

    tok = load_tokenizer(tokenizer)
    counts, info = study_unigram_counts(data_dir, tok.get_vocab_size(), spec.get("unigram_rows", 10000))
    log(f"blimp: unigram counts from {info['counts_from']} ({info['tokens']:,} tokens)")
    return UnigramScorer(counts, lambda text: tok.encode(text, add_special_tokens=False).ids), info


def build_blimp(study: dict, out: str | os.PathLike, corpus_dir: str | os.PathLike | None = None,
                tokenizer: str | os.PathLike | None = None, log=log_progress) -> dict:
    """Run the blimp stage: <out>/<UID>.jsonl for every paradigm of evaluation.blimp.

    With a `tokenizer`, the training tokens of the data folder (out's parent: train.npy, or the
    stream the tokenize stage recorded) give a unigram frequency scorer: generated paradigms are
    balanced against it, and its accuracy on every paradigm of any source is written to
    <data>/blimp_unigram.parquet (recorded in the stage record and the manifest)."""
    spec = study["evaluation"]["blimp"]
    source, n, seed = spec["source"], spec["pairs_per_paradigm"], spec["seed"]
    out = Path(out)
    info: dict = {"source": source, "seed": seed, "pairs_per_paradigm": n}
    scorer = None
    if tokenizer is not None:
        scorer, info["unigram"] = _unigram_scorer(spec, out.parent, tokenizer, log)
    if source == "generated":
        from .generate_blimp import generate, word_counts

        counts = None
        if corpus_dir is not None and spec["min_word_count"] > 0:
            from .corpus import corpus_domains, read_docs

            domains = corpus_domains(corpus_dir)
            counts = word_counts(doc["text"] for d, meta in domains.items() if not meta.get("streamed")
                                 for doc in read_docs(corpus_dir, "train", d) if "text" in doc)
        paradigms, gen_info = generate(n or 200, seed, counts, spec["min_word_count"], spec["paradigms"],
                                       balance=scorer.correct if scorer is not None else None)
        info.update(gen_info, min_word_count=spec["min_word_count"],
                    filtered_on="corpus/train" if counts is not None else None,
                    balanced_on="unigram" if scorer is not None else None)
        label = "generated"
    elif Path(os.path.expanduser(source)).is_dir() or not (source == HF_DATASET or source.startswith("hf:")):
        folder = Path(os.path.expanduser(source))
        paradigms = {uid: subset(p, n, seed) for uid, p in load_local(folder, spec["paradigms"]).items()}
        label = f"local:{folder.resolve()}"
    else:
        from .hub import source_revision

        dataset = source.removeprefix("hf:")
        require_datasets(dataset)  # before the revision is resolved: say what is missing first
        info.update(source_revision(dataset, spec.get("revision"), local=False))
        paradigms = {uid: subset(p, n, seed)
                     for uid, p in load_hf(dataset, spec["paradigms"], info["resolved_revision"]).items()}
        label = f"hf:{dataset}"
    written = []
    for uid in paradigms:  # UIDs can come from dataset rows: each must be one file name
        safe_name(uid, f"{label}: BLiMP paradigm")
    out.mkdir(parents=True, exist_ok=True)
    for stale in previous_paradigm_files(out):  # a previous source's paradigms must not linger
        if stale.name.removesuffix(".jsonl") not in paradigms:
            stale.unlink(missing_ok=True)
    for uid, pairs in paradigms.items():
        written.append(write_paradigm(out / f"{uid}.jsonl", pairs, label))
    if scorer is not None:
        from .unigram import BALANCED_RANGE, UNIGRAM_FILE, outside_range, unigram_accuracy, write_unigram_table

        rows = unigram_accuracy(paradigms, scorer, label)
        written.append(write_unigram_table(rows, out.parent / UNIGRAM_FILE))
        info["unigram"]["file"] = UNIGRAM_FILE
        low, high = spec.get("balanced_range", BALANCED_RANGE)
        outside = outside_range(rows, low, high)
        log(f"blimp: the unigram scorer is outside [{low}, {high}] on {len(outside)} of {len(rows)} "
            f"paradigms{': ' + ', '.join(outside) if outside else ''} ({UNIGRAM_FILE})")
    info.update(source_label=label, paradigms={uid: len(p) for uid, p in paradigms.items()},
                phenomena=sorted({p[0]["linguistics_term"] for p in paradigms.values()}))
    write_stage(out.parent, "blimp", written, info)
    log(f"blimp: {len(paradigms)} paradigms, {sum(map(len, paradigms.values()))} pairs from {label} -> {out}")
    return info
