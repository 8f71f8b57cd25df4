"""Evaluation of a checkpoint: per-domain perplexity and bits per byte, and BLiMP.

docs/design.md, Metrics. Perplexity per held-out domain is token-weighted, exp(sum NLL / predicted
tokens), the first token of every document not predicted; bits per byte = sum NLL / (ln 2 * UTF-8
bytes of the predicted tokens), which compares models with different tokenizers; beside them the
paper's convention, the mean over documents of per-document perplexity (Paloma, Magnusson et al.
2023, reports the token-weighted one). Documents longer than the context are scored with a sliding
window (each token predicted once, with at least `context - stride` tokens of context after the
first window, so stride < context; the Hugging Face "perplexity of fixed-length models" recipe).

BLiMP (Warstadt et al. 2020): a minimal pair is correct when the grammatical sentence has the
higher total log-probability, the sum over all its tokens with the first predicted from an EOS
context. Accuracy per paradigm (UID); per phenomenon (`linguistics_term`) and overall as means
of paradigms.

Both score token sequences in length-sorted batches padded on the right: the decoder is causal,
so padding after a sequence never changes its logits, and only the loss needs a mask.

Checkpoints of any condition are read here too (`load_snapshot`): this project's layout
(`model.safetensors` + `config.json` with `model`, `method`, `step`; ReLoRA stores `weight`,
`A_lora` and `B_lora` separately) and the paper's released Hugging Face folders (Pico names,
possibly prefixed `pico_decoder.`, Pico config keys). Evaluation runs the effective weights
`W + scale * B @ A` in a plain decoder: the function a LoRA model computes with dropout off.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.blimp import load_paradigm_file
from .io import sha256_file
from .model import ModelConfig, PicoDecoder, rope_tables
from .model_config import LINEAR_PARENTS, adapter_scale

HF_PREFIXES = ("pico_decoder.", "_orig_mod.", "module.")
# Pico's Hugging Face config keys -> ModelConfig fields
HF_CONFIG_KEYS = {"vocab_size": "vocab_size", "d_model": "d_model", "n_layers": "n_layers",
                  "attention_n_heads": "n_heads", "attention_n_kv_heads": "n_kv_heads",
                  "activation_hidden_dim": "ffn_hidden", "max_seq_len": "max_seq_len",
                  "position_emb_theta": "rope_theta", "norm_eps": "norm_eps"}


# ----------------------------------------------------------------------------------------------
# Checkpoints of any condition


def linear_key(layer: int, module: str) -> str:
    """State-dict prefix of a linear module: `layers.<i>.attention.q_proj`, `layers.<i>.swiglu.w_0`."""
    return f"layers.{layer}.{LINEAR_PARENTS[module]}.{module}"


@dataclass
class Snapshot:
    """One checkpoint's stored tensors (reference names) and what is needed to read them."""

    path: Path
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    step: int | None = None
    scale: float | None = None  # adapter scale alpha / r, when the checkpoint has adapters
    layout: str = "relora"  # "relora" (this project) or "huggingface" (the paper's releases)
    meta: dict = field(default_factory=dict)

    def has_adapter(self, layer: int, module: str) -> bool:
        return f"{linear_key(layer, module)}.A_lora" in self.tensors

    def weight(self, layer: int, module: str) -> torch.Tensor:
        """The stored (frozen, for ReLoRA) weight W, out x in, in its stored dtype."""
        return self.tensors[f"{linear_key(layer, module)}.weight"]

    def adapter(self, layer: int, module: str) -> torch.Tensor | None:
        """scale * B @ A in float64 from the stored factors; None for a plain linear."""
        if not self.has_adapter(layer, module):
            return None
        key = linear_key(layer, module)
        A, B = self.tensors[f"{key}.A_lora"].double(), self.tensors[f"{key}.B_lora"].double()
        return self.scale * (B @ A)  # (out, r) @ (r, in)

    def effective_weight(self, layer: int, module: str) -> torch.Tensor:
        """W + scale * B @ A in float64 (W for a plain linear)."""
        W = self.weight(layer, module).double()
        delta = self.adapter(layer, module)
        return W if delta is None else W + delta

    def effective_state_dict(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """A plain PicoDecoder state dict with every adapter folded into its weight."""
        state = {k: v.to(dtype) for k, v in self.tensors.items() if not k.endswith(("A_lora", "B_lora"))}
        for layer in range(self.config.n_layers):
            for module in LINEAR_PARENTS:
                if self.has_adapter(layer, module):
                    state[f"{linear_key(layer, module)}.weight"] = self.effective_weight(layer, module).to(dtype)
        return state

    def model(self, device="cpu", dtype=torch.float32) -> PicoDecoder:
        """A plain decoder computing what the checkpoint computes (adapter dropout off), eval mode."""
        with torch.device("meta"):
            model = PicoDecoder(self.config)
        model = model.to_empty(device=device)
        model.load_state_dict(self.effective_state_dict(dtype), strict=True)
        # the RoPE tables are not in the state dict (non-persistent): rebuild them on the device
        model.rope_cos, model.rope_sin = rope_tables(self.config.head_dim, self.config.max_seq_len,
                                                     self.config.rope_theta, device)
        return model.to(dtype).eval()


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{weights}: not a readable safetensors file: {e}") from None
    legacy = path / "pytorch_model.bin"  # older Hugging Face uploads
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{weights}: checkpoint weights not found")


def _hf_scale(config: dict) -> float | None:
    """An adapter scale from a Hugging Face config, if it records one."""
    for section in (config, config.get("relora") or {}, config.get("lora") or {}, config.get("method") or {}):
        if not isinstance(section, dict):
            continue
        if "scale" in section:
            return float(section["scale"])
        alpha = section.get("lora_alpha", section.get("alpha"))
        rank = section.get("lora_r", section.get("r", section.get("rank")))
        if alpha is not None and rank:
            return adapter_scale(float(alpha), float(rank))
    return None


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = PicoDecoder(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_snapshot(path, expected: ModelConfig | None = None, scale: float | None = None) -> Snapshot:
    """Read a checkpoint folder of either layout and check it against the run's model config.

    `expected`: the run's ModelConfig (a mismatch is an error naming the file and the field);
    `scale`: the run's adapter scale, used when the checkpoint does not record one.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder not found")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: checkpoint config not found")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON: {e}") from None
    if isinstance(raw.get("model"), dict):  # this project's layout
        layout = "relora"
        try:
            config = ModelConfig(**raw["model"])
        except TypeError as e:
            raise ValueError(f"{config_path}: model section does not describe a Pico decoder: {e}") from None
        method = raw.get("method") or {}
        stored_scale = method.get("scale")
        if stored_scale is None and method.get("alpha") is not None and method.get("rank"):
            stored_scale = adapter_scale(method["alpha"], method["rank"])
        step = raw.get("step")
    elif "d_model" in raw:  # the paper's Hugging Face releases
        layout = "huggingface"
        missing = [k for k in HF_CONFIG_KEYS if k not in raw and k not in ("position_emb_theta", "norm_eps")]
        if missing:
            raise ValueError(f"{config_path}: Pico config lacks {', '.join(missing)}")
        fields = {field_: raw[key] for key, field_ in HF_CONFIG_KEYS.items() if key in raw}
        config = ModelConfig(**fields)
        stored_scale, step = _hf_scale(raw), raw.get("step")
    else:
        raise ValueError(f"{config_path}: neither a relora checkpoint config (a 'model' section) "
                         "nor a Pico Hugging Face config (d_model, n_layers, ...)")
    if expected is not None:
        for name, want in expected.to_dict().items():
            got = getattr(config, name)
            if not (got == want or (isinstance(want, float) and math.isclose(got, want, rel_tol=1e-9))):
                raise ValueError(f"{config_path}: checkpoint does not match the run config: "
                                 f"{name} is {got} in the checkpoint, {want} in the run")

    weights_file = path / "model.safetensors"
    if raw.get("sha256") and weights_file.is_file():
        if sha256_file(weights_file) != raw["sha256"]:
            raise ValueError(f"{weights_file}: sha256 differs from {config_path} (truncated or altered checkpoint)")
    tensors = {}
    for key, value in _read_tensors(path).items():
        for prefix in HF_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        tensors[key] = value
    shapes = _expected_shapes(config)
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise ValueError(f"{weights_file}: missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{weights_file}: {key} has shape {tuple(tensors[key].shape)}, "
                             f"the config implies {shape}")
    has_adapters = False
    for key in tensors:
        if key in shapes:
            continue
        base, _, leaf = key.rpartition(".")
        if leaf in ("A_lora", "B_lora") and f"{base}.weight" in shapes:
            out_f, in_f = shapes[f"{base}.weight"]
            A, B = tensors.get(f"{base}.A_lora"), tensors.get(f"{base}.B_lora")
            if A is None or B is None:
                raise ValueError(f"{weights_file}: {base} has only one of A_lora / B_lora")
            rank = A.shape[0]
            if tuple(A.shape) != (rank, in_f) or tuple(B.shape) != (out_f, rank):
                raise ValueError(f"{weights_file}: {base} adapter shapes A {tuple(A.shape)}, B {tuple(B.shape)} "
                                 f"do not fit a {out_f} x {in_f} weight")
            has_adapters = True
        else:
            raise ValueError(f"{weights_file}: unexpected tensor {key}")
    if has_adapters:
        if stored_scale is not None and scale is not None and not math.isclose(stored_scale, scale, rel_tol=1e-9):
            raise ValueError(f"{config_path}: adapter scale {stored_scale} differs from the run's {scale}")
        stored_scale = stored_scale if stored_scale is not None else scale
        if stored_scale is None:
            raise ValueError(f"{config_path}: the checkpoint has adapters but records no scale (alpha / r)")
    return Snapshot(path=path, config=config, tensors=tensors, step=step,
                    scale=stored_scale if has_adapters else None, layout=layout, meta=raw)


def step_dir(checkpoints: Path, step: int) -> Path:
    """checkpoints/step_<k>, with an error naming the folder (and what exists) when absent."""
    path = Path(checkpoints) / f"step_{step}"
    if not path.is_dir():
        have = sorted(p.name for p in Path(checkpoints).glob("step_*")) if Path(checkpoints).is_dir() else []
        raise FileNotFoundError(f"{path}: no checkpoint at step {step} "
                                f"(found: {', '.join(have) if have else 'none'})")
    return path


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
    ppl_doc_mean: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan

    @property
    def bpb(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else math.nan


def score_documents(model: PicoDecoder, documents: list, n_bytes: list[int] | None = None,
                    stride: int | None = None, batch_tokens: int = 4096, device=None) -> DomainScore:
    """Token-weighted NLL, bits per byte and mean per-document perplexity of a set of documents."""
    context = model.config.max_seq_len
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
                       nll=float(doc_nll.sum()), ppl_doc_mean=float(doc_ppl.mean()) if doc_ppl.size else math.nan)


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


def score_sentences(model: PicoDecoder, sentences: list, eos_id: int, batch_tokens: int = 4096,
                    device=None) -> np.ndarray:
    """Total log-probability of each tokenised sentence, its first token predicted from EOS."""
    sequences = [[eos_id, *tokens] for tokens in sentences]
    return -score_sequences(model, sequences, None, batch_tokens, device)


@torch.no_grad()
def score_sentence_naive(model: PicoDecoder, tokens, eos_id: int) -> float:
    """The same, one sentence and one position at a time: the reference the batched path is tested on."""
    device = next(model.parameters()).device
    seq = torch.tensor([[eos_id, *tokens]], device=device)
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
                 device=None) -> list[dict]:
    """Per-paradigm accuracy rows (uid, phenomenon, field, pairs, correct, accuracy, source).

    `encode` maps a sentence to token ids. Good and bad sentences are scored together in
    length buckets; a pair is correct when log p(good) > log p(bad) (a tie counts as wrong).
    """
    sentences = [encode(p["good"]) for p in pairs] + [encode(p["bad"]) for p in pairs]
    log_probs = score_sentences(model, sentences, eos_id, batch_tokens, device)
    good, bad = log_probs[:len(pairs)], log_probs[len(pairs):]
    rows: dict[str, dict] = {}
    for pair, lp_good, lp_bad in zip(pairs, good, bad):
        row = rows.setdefault(pair["uid"], {"uid": pair["uid"], "phenomenon": pair["phenomenon"],
                                            "field": pair["field"], "pairs": 0, "correct": 0,
                                            "source": pair.get("source")})
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


# ----------------------------------------------------------------------------------------------
# Output


def write_parquet_atomic(rows: list[dict], path, columns: list[str]) -> None:
    """Write rows (a list of dicts) to Parquet under a temporary name, then rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = [k for k in (rows[0] if rows else {}) if k not in columns]
    table = pa.Table.from_pylist(rows, schema=None) if rows else pa.table({c: [] for c in columns})
    table = table.select(columns + extra)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
