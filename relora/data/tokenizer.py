"""Tokenizer stage: train a byte-level BPE, or take a tokenizer.json, or OLMo's from the wheel.

`data.tokenizer.kind`:
- `train`: byte-level BPE (GPT-2 style: no unknown tokens, every byte representable) trained
  with Hugging Face `tokenizers` on the corpus's training split only, with `eos_token` as its one
  special token and NFC normalisation (the corpus is NFC already, so byte counts are unchanged);
- `file`: a tokenizer.json at `data.tokenizer.path`;
- `olmo`: the OLMo tokenizer (GPT-NeoX based, 50280 tokens, EOS `<|endoftext|>` = 50279) from the
  pinned ai2-olmo-eval wheel, the paper's tokenizer family.

The stage checks that the tokenizer has exactly `data.tokenizer.vocab_size` tokens and contains
the EOS token, then writes `tokenizer.json` under the data dir and records `eos_id`,
`vocab_size`, the token dtype of train.npy and the kind in `stages/tokenizer.json`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from .manifest import atomic_path, write_stage

log_progress = logging.getLogger(__name__).info  # the default `log` of the stage builders


class TokenizerError(ValueError):
    """A tokenizer that does not fit the config; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def set_threads(threads: int | None) -> None:
    """tokenizers' Rayon pool reads this once, at its first parallel call."""
    if threads:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def train_bpe(texts, vocab_size: int, eos_token: str, min_frequency: int = 2):
    """A byte-level BPE with exactly vocab_size tokens (if the corpus has enough merges)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found") from None
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None


def eos_id_of(tokenizer_path: str | os.PathLike, eos_token: str) -> tuple:
    """(tokenizer, eos id) of a tokenizer.json."""
    tokenizer = load_tokenizer(tokenizer_path)
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise TokenizerError(f"{tokenizer_path}: no EOS token '{eos_token}' (data.tokenizer.eos_token)")
    return tokenizer, eos_id


def check_tokenizer(tokenizer, vocab_size: int, eos_token: str, source: str) -> int:
    """Raise unless the tokenizer has exactly vocab_size tokens and an EOS; return the EOS id."""
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual != vocab_size:
        raise TokenizerError(f"{source}: the tokenizer has {actual} tokens but "
                             f"data.tokenizer.vocab_size is {vocab_size}")
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise TokenizerError(f"{source}: the tokenizer has no EOS token '{eos_token}' "
                             "(data.tokenizer.eos_token)")
    return eos_id


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for (special tokens: 0), so that the bytes of a token
    sequence are a sum; used for bits per byte. Byte-level tokens map one character to one
    byte; other tokenizers fall back to decoding each token alone."""
    spec = json.loads(tokenizer.to_str())
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    lengths = np.zeros(size, dtype=np.int64)
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    for token_id in range(size):
        if token_id in added:
            token = added[token_id]
            lengths[token_id] = 0 if token.get("special") else len(token["content"].encode("utf-8"))
        elif byte_level:
            lengths[token_id] = len(tokenizer.id_to_token(token_id))
        else:
            lengths[token_id] = len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


def build_tokenizer(data: dict, corpus_dir: str | os.PathLike, out: str | os.PathLike,
                    threads: int | None = None, log=log_progress) -> dict:
    """Run the tokenizer stage: write `out` (normally <data dir>/tokenizer.json); returns the
    stage info."""
    set_threads(threads)
    spec, out = data["tokenizer"], Path(out)
    data_dir = out.parent
    kind, vocab_size, eos_token = spec["kind"], spec["vocab_size"], spec["eos_token"]
    info = {"kind": kind, "eos_token": eos_token}
    if kind == "train":
        from .corpus import corpus_domains, read_docs

        domains = corpus_domains(corpus_dir)
        texts = (doc["text"] for domain, meta in domains.items() if not meta.get("streamed")
                 for doc in read_docs(corpus_dir, "train", domain) if "text" in doc)
        tokenizer = train_bpe(texts, vocab_size, eos_token, spec["min_frequency"])
        source = f"BPE trained on {Path(corpus_dir) / 'train'}"
        if tokenizer.get_vocab_size() < vocab_size:
            raise TokenizerError(f"{source}: the training corpus yields only "
                                 f"{tokenizer.get_vocab_size()} tokens, fewer than "
                                 f"data.tokenizer.vocab_size {vocab_size} (more text, or a "
                                 "smaller vocab_size / min_frequency)")
        info.update(min_frequency=spec["min_frequency"], algorithm="byte-level BPE",
                    trained_on="corpus/train")
    elif kind == "file":
        if not spec.get("path"):
            raise TokenizerError("data.tokenizer.path: kind 'file' needs the path of a tokenizer.json")
        source = str(spec["path"])
        tokenizer = load_tokenizer(source)
        info["path"] = source
    elif kind == "olmo":
        from . import olmo_bundle

        wheel = olmo_bundle.fetch_wheel(data.get("cache_dir"))
        tmp = data_dir / f".olmo-tokenizer.{os.getpid()}.json"
        data_dir.mkdir(parents=True, exist_ok=True)
        olmo_bundle.extract_member(wheel, olmo_bundle.OLMO_TOKENIZER_MEMBER, tmp)
        source = f"{wheel}:{olmo_bundle.OLMO_TOKENIZER_MEMBER}"
        tokenizer = load_tokenizer(tmp)
        tmp.unlink()
        info.update(wheel=olmo_bundle.WHEEL_FILE, wheel_sha256=olmo_bundle.WHEEL_SHA256,
                    member=olmo_bundle.OLMO_TOKENIZER_MEMBER)
    else:
        raise TokenizerError(f"data.tokenizer.kind: unknown kind '{kind}'")
    eos_id = check_tokenizer(tokenizer, vocab_size, eos_token, source)
    with atomic_path(out) as tmp:
        tokenizer.save(str(tmp))
    info.update(vocab_size=vocab_size, eos_id=eos_id, dtype=token_dtype(vocab_size).name)
    write_stage(data_dir, "tokenizer", [out], info)
    log(f"tokenizer: {kind}, {vocab_size} tokens, eos_id {eos_id} -> {out}")
    return info
