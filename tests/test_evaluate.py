import json
import math

import numpy as np
import pytest
import torch

from relora.checkpoint import load_snapshot
from relora.evaluate import (blimp_scores, blimp_summary, read_blimp,
                             score_documents, score_sentence_naive, score_sentences, score_sequences,
                             sliding_windows)
from relora.model import ModelConfig, PicoDecoder
from relora.model_config import LINEAR_PARENTS, linear_key

# ---------------------------------------------------------------- helpers (also used by test_dynamics*)


def tiny_config(**overrides) -> ModelConfig:
    spec = dict(vocab_size=128, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=96, max_seq_len=16)
    spec.update(overrides)
    return ModelConfig(**spec)


def make_model(config: ModelConfig, seed: int = 0) -> PicoDecoder:
    torch.manual_seed(seed)
    return PicoDecoder(config).eval()


def relora_adapters(config: ModelConfig, rank: int, seed: int = 0, zero_b: bool = False, targets=None) -> dict:
    """A_lora / B_lora tensors for every targeted linear of a model of this config."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in PicoDecoder(config).state_dict().items()}
    out = {}
    for layer in range(config.n_layers):
        for module in targets or LINEAR_PARENTS:
            o, i = shapes[f"{linear_key(layer, module)}.weight"]
            out[f"{linear_key(layer, module)}.A_lora"] = torch.randn(rank, i, generator=g) * 0.1
            out[f"{linear_key(layer, module)}.B_lora"] = (torch.zeros(o, rank) if zero_b
                                                          else torch.randn(o, rank, generator=g) * 0.1)
    return out


def save_checkpoint(path, model: PicoDecoder, step: int, adapters: dict | None = None, rank: int = 0,
                    alpha: float = 0.0, layout: str = "relora", prefix: str = "pico_decoder.", config=None):
    """Write a checkpoint folder in this project's layout or the paper's Hugging Face layout."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.update(adapters or {})
    cfg = config or model.config
    if layout == "relora":
        method = {"name": "relora", "rank": rank, "alpha": alpha, "scale": alpha / rank} if adapters else {"name": "full"}
        meta = {"model": cfg.to_dict(), "method": method, "step": step}
    else:
        state = {prefix + k: v for k, v in state.items()}
        meta = {"model_type": "pico_decoder", "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                "attention_n_heads": cfg.n_heads, "attention_n_kv_heads": cfg.n_kv_heads,
                "activation_hidden_dim": cfg.ffn_hidden, "vocab_size": cfg.vocab_size,
                "max_seq_len": cfg.max_seq_len, "norm_eps": cfg.norm_eps, "position_emb_theta": cfg.rope_theta,
                "batch_size": 1024}
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(meta))
    return path


# ---------------------------------------------------------------- perplexity


def uniform_model(config):
    model = make_model(config)
    with torch.no_grad():
        model.de_embedding_proj.weight.zero_()  # logits 0 everywhere: a uniform distribution
    return model


def test_uniform_model_has_perplexity_vocab_size():
    config = tiny_config()
    model = uniform_model(config)
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, 128, n)) for n in (1, 2, 5, 16, 40)]  # 40 > context 16: windows
    n_bytes = [0, 3, 11, 30, 100]
    score = score_documents(model, docs, n_bytes, stride=5)
    assert score.tokens == 0 + 1 + 4 + 15 + 39
    assert score.nll == pytest.approx(score.tokens * math.log(128), rel=1e-6)
    assert score.perplexity == pytest.approx(128, rel=1e-6)
    assert score.perplexity_doc_mean == pytest.approx(128, rel=1e-6)
    assert score.bits_per_byte == pytest.approx(score.tokens * math.log2(128) / sum(n_bytes), rel=1e-6)
    assert score.docs == 4  # a one-token document predicts nothing


def test_sliding_windows_predict_every_token_once():
    for n, context, stride in [(5, 8, 4), (8, 8, 4), (9, 8, 4), (40, 16, 5), (41, 16, 15), (17, 16, 1)]:
        covered = []
        for begin, end, first in sliding_windows(n, context, stride):
            assert end - begin <= context and begin < first <= end
            covered += range(first, end)
        assert covered == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 8, 8)


def test_batched_document_scoring_equals_one_window_at_a_time():
    config = tiny_config()
    model = make_model(config, seed=3)
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(0, 128, n)) for n in (3, 16, 7, 35, 2, 12)]
    score = score_documents(model, docs, [1] * len(docs), stride=6, batch_tokens=40)
    naive = 0.0
    for doc in docs:
        for begin, end, first in sliding_windows(len(doc), 16, 6):
            with torch.no_grad():
                logits = model(torch.tensor([doc[begin:end]]))[0].double().log_softmax(-1)
            naive -= sum(float(logits[p - 1 - begin, doc[p]]) for p in range(first, end))
    assert score.nll == pytest.approx(naive, rel=1e-5)


def bigram_model(config, seed=0):
    """A decoder whose blocks add nothing (attention and FFN outputs zeroed): the residual stream
    is the current token's embedding, so the next-token log-probabilities depend on the current
    token alone, table[a, b] = log p(b | a), whatever the context."""
    model = make_model(config, seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.o_proj.weight.zero_()
            layer.swiglu.w_2.weight.zero_()
        emb = model.embedding_proj.weight  # (V, C)
        table = model.de_embedding_proj(model.output_norm(emb)).double().log_softmax(-1)  # (V, V)
    return model, table.numpy()


def test_truncate_scores_the_first_context_tokens_and_sliding_all_of_them():
    config = tiny_config()  # context 16
    model, table = bigram_model(config, seed=7)
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 128, n).tolist() for n in (5, 16, 40)]
    n_bytes = [4 * (len(d) - 1) for d in docs]
    token_bytes = np.full(128, 4)  # every token 4 bytes: the cut document's bytes are 4 x its predicted tokens

    def nll(doc):  # closed form: the sum of -log p(x_p | x_{p-1})
        return -sum(table[a, b] for a, b in zip(doc, doc[1:]))

    sliding = score_documents(model, docs, n_bytes, stride=5)
    truncated = score_documents(model, docs, n_bytes, stride=5, long_documents="truncate", token_bytes=token_bytes)
    assert sliding.tokens == 4 + 15 + 39 and truncated.tokens == 4 + 15 + 15
    assert sliding.nll == pytest.approx(sum(nll(d) for d in docs), rel=1e-5)
    assert truncated.nll == pytest.approx(sum(nll(d[:16]) for d in docs), rel=1e-5)
    assert truncated.bytes == 4 * (4 + 15 + 15) and sliding.bytes == sum(n_bytes)
    per_doc = [math.exp(nll(d[:16]) / (len(d[:16]) - 1)) for d in docs]
    assert truncated.perplexity_doc_mean == pytest.approx(np.mean(per_doc), rel=1e-5)
    assert truncated.perplexity == pytest.approx(math.exp(truncated.nll / truncated.tokens))
    # documents that fit the context score the same either way
    short = docs[:2]
    assert score_documents(model, short, long_documents="truncate").nll == \
        pytest.approx(score_documents(model, short).nll, rel=1e-6)
    with pytest.raises(ValueError, match="bytes per token"):
        score_documents(model, docs, n_bytes, long_documents="truncate")
    with pytest.raises(ValueError, match="long_documents 'cut'"):
        score_documents(model, docs, long_documents="cut")


def test_unscored_first_token_leaves_its_own_probability_out():
    config = tiny_config()
    model, table = bigram_model(config, seed=8)
    eos = 0
    good, bad = [5, 9, 11, 3], [6, 9, 11, 3]  # differ only in the first token
    scored = score_sentences(model, [good, bad], eos)
    unscored = score_sentences(model, [good, bad], eos, first_token="unscored")

    def log_prob(sentence, first_token):  # closed form under the bigram model
        seq = [eos, *sentence] if first_token == "scored" else sentence
        return sum(table[a, b] for a, b in zip(seq, seq[1:]))

    for sentence, s, u in zip((good, bad), scored, unscored):
        assert s == pytest.approx(log_prob(sentence, "scored"), rel=1e-5)
        assert u == pytest.approx(log_prob(sentence, "unscored"), rel=1e-5)
        assert u == pytest.approx(score_sentence_naive(model, sentence, eos, "unscored"), rel=1e-5)
    # scored, the two first tokens' own log-probabilities differ; unscored, they are left out
    assert scored[0] - unscored[0] == pytest.approx(table[eos, 5], rel=1e-5)
    assert scored[1] - unscored[1] == pytest.approx(table[eos, 6], rel=1e-5)
    pairs = [{"uid": "only_first", "phenomenon": "p", "field": "f", "good": "g", "bad": "b"}]
    encode = {"g": [5, 9], "b": [6, 9]}.get
    both = {}
    for first_token in ("scored", "unscored"):
        [row] = blimp_scores(model, pairs, encode, eos, first_token=first_token)
        assert row["first_token"] == first_token
        both[first_token] = row["correct"]
    # scored: whichever of log p(5|eos) + log p(9|5) and log p(6|eos) + log p(9|6) is higher;
    # unscored: log p(9|5) vs log p(9|6)
    assert both["scored"] == int(table[eos, 5] + table[5, 9] > table[eos, 6] + table[6, 9])
    assert both["unscored"] == int(table[5, 9] > table[6, 9])
    one_token = [{"uid": "u", "phenomenon": "p", "field": "f", "good": "g", "bad": "b"}]
    [row] = blimp_scores(model, one_token, {"g": [5], "b": [6]}.get, eos, first_token="unscored")
    assert row["correct"] == 0  # one-token sentences: nothing scored, a tie, wrong


def test_padding_never_changes_a_score():
    config = tiny_config()
    model = make_model(config, seed=4)
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    together = score_sequences(model, seqs, batch_tokens=1000)
    alone = [score_sequences(model, [s])[0] for s in seqs]
    np.testing.assert_allclose(together, alone, rtol=1e-5)


# ---------------------------------------------------------------- BLiMP


def train_tokenizer(sentences):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False)
    tokenizer.train_from_iterator(sentences, trainer)
    return tokenizer


def test_blimp_batched_equals_naive_on_real_pairs(blimp_dir):
    pairs = [p for uid in ("anaphor_gender_agreement", "adjunct_island", "regular_plural_subject_verb_agreement_1")
             for p in read_blimp_file(blimp_dir / f"{uid}.jsonl")[:8]]
    tokenizer = train_tokenizer([s for p in pairs for s in (p["good"], p["bad"])])
    eos = tokenizer.token_to_id("<|endoftext|>")
    encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
    config = tiny_config(max_seq_len=128)
    model = make_model(config, seed=5)
    sentences = [encode(p[k]) for p in pairs for k in ("good", "bad")]
    assert max(max(s) for s in sentences) < 120 and max(map(len, sentences)) > 5
    batched = score_sentences(model, sentences, eos, batch_tokens=200)
    naive = np.array([score_sentence_naive(model, s, eos) for s in sentences])
    np.testing.assert_allclose(batched, naive, rtol=1e-5, atol=1e-4)
    rows = blimp_scores(model, pairs, encode, eos, batch_tokens=200)
    assert [r["uid"] for r in rows] == sorted({p["uid"] for p in pairs})
    for row in rows:
        mine = [p for p in pairs if p["uid"] == row["uid"]]
        correct = sum(score_sentence_naive(model, encode(p["good"]), eos) > score_sentence_naive(model, encode(p["bad"]), eos)
                      for p in mine)
        assert row["pairs"] == len(mine) and row["correct"] == correct
        assert row["phenomenon"] == mine[0]["phenomenon"] and row["field"] == mine[0]["field"]
    summary = blimp_summary(rows)
    assert summary["overall"] == pytest.approx(np.mean([r["accuracy"] for r in rows]))
    assert set(summary["phenomenon"]) == {"anaphor_agreement", "island_effects", "subject_verb_agreement"}


def read_blimp_file(path):
    import shutil
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / path.name)  # read_blimp reads a folder; the copy is temporary
        return read_blimp(tmp)


def test_blimp_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no BLiMP files"):
        read_blimp(tmp_path)
    (tmp_path / "x.jsonl").write_text('{"sentence_good": "a"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: missing field\(s\) sentence_bad"):
        read_blimp(tmp_path)


# ---------------------------------------------------------------- checkpoints


def test_huggingface_folder_loads_like_the_model(tmp_path):
    config = tiny_config()
    model = make_model(config, seed=6)
    save_checkpoint(tmp_path / "hf", model, step=0, layout="huggingface")
    snap = load_snapshot(tmp_path / "hf", expected=config)
    assert snap.layout == "huggingface" and snap.scale is None
    idx = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(snap.model()(idx), model(idx))


def test_huggingface_relora_folder_takes_the_runs_scale(tmp_path):
    config = tiny_config()
    model = make_model(config, seed=6)
    adapters = relora_adapters(config, rank=4, seed=0)
    save_checkpoint(tmp_path / "hf", model, step=0, adapters=adapters, layout="huggingface")
    with pytest.raises(ValueError, match="records no scale"):
        load_snapshot(tmp_path / "hf")
    snap = load_snapshot(tmp_path / "hf", scale=2.0)
    key = linear_key(0, "v_proj")
    torch.testing.assert_close(snap.adapter(0, "v_proj"),
                               2.0 * adapters[f"{key}.B_lora"].double() @ adapters[f"{key}.A_lora"].double())


def test_a_verified_checkpoint_is_not_hashed_again_until_it_changes(tmp_path, monkeypatch):
    from relora import checkpoint

    path = save_checkpoint(tmp_path / "step_0", make_model(tiny_config()), step=0)
    meta = json.loads((path / "config.json").read_text())
    meta["sha256"] = checkpoint.sha256_file(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(meta))
    hashed, real = [], checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: hashed.append(p) or real(p))
    load_snapshot(path)
    assert len(hashed) == 1  # one load, one hash (the reader checks once)
    verified = checkpoint.verify_weights(path)
    load_snapshot(path, verified=verified)
    load_snapshot(path, verified=verified)
    assert len(hashed) == 2  # the verification; the loads trust it
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # changed since: hashed again, and refused
    with pytest.raises(checkpoint.CheckpointError, match="sha256 differs from config.json"):
        load_snapshot(path, verified=verified)
    assert len(hashed) == 3


def test_checkpoint_not_matching_the_config_is_named(tmp_path):
    config = tiny_config()
    save_checkpoint(tmp_path / "step_0", make_model(config), step=0)
    with pytest.raises(ValueError, match=r"step_0/config.json.*d_model is 24 in the checkpoint, 48 in the run"):
        load_snapshot(tmp_path / "step_0", expected=tiny_config(d_model=48))
    # weights that do not fit the config they came with
    save_checkpoint(tmp_path / "bad", make_model(config), step=0, config=tiny_config(ffn_hidden=48))
    with pytest.raises(ValueError, match=r"bad/model.safetensors: layers.0.swiglu.w_0.weight has shape"):
        load_snapshot(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint folder not found"):
        load_snapshot(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/config.json"):
        load_snapshot(tmp_path / "empty")
