"""`relora evaluate` and `relora dynamics` on a run directory built in the checkpoint contract."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from relora.cli import main
from relora.config import load_study, model_config, resolve_run
from relora.tables import PERPLEXITY
from test_evaluate import make_model, relora_adapters, save_checkpoint, train_tokenizer

BLIMP_UIDS = ("anaphor_gender_agreement", "determiner_noun_agreement_1")


def study_dict():
    return {
        "study": "evaltest",
        "data": {"seq_len": 32, "probe_batch": 2, "tokenizer": {"vocab_size": 120}},
        "sizes": {"nano": {"d_model": 24, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2}},
        "training": {"steps": 4, "batch_size": 2, "lr": 1e-3},
        "conditions": {"full": {"method": "full"},
                       "relora": {"method": "relora", "rank": 4, "alpha": 8, "reset_every": 2, "restart_warmup": 0}},
        "seeds": [0],
        "evaluation": {"every": 2, "batch_tokens": 256, "perplexity": {"stride": 16}},
        "analysis": {"every": 2},
    }


@pytest.fixture
def data_dir(tmp_path, blimp_dir):
    data = tmp_path / "data"
    (data / "eval").mkdir(parents=True)
    (data / "blimp").mkdir()
    lines = {uid: (blimp_dir / f"{uid}.jsonl").read_text().splitlines()[:6] for uid in BLIMP_UIDS}
    for uid, rows in lines.items():
        (data / "blimp" / f"{uid}.jsonl").write_text("\n".join(rows) + "\n")
    sentences = [s for rows in lines.values() for r in rows for s in (json.loads(r)["sentence_good"],
                                                                       json.loads(r)["sentence_bad"])]
    train_tokenizer(sentences).save(str(data / "tokenizer.json"))
    write_eval_and_probe(data)
    return data


def write_eval_and_probe(data: Path) -> None:
    rng = np.random.default_rng(0)
    for domain, lengths in {"wiki": [5, 50, 12, 1], "code": [31, 33]}.items():
        docs = [rng.integers(0, 120, n).tolist() for n in lengths]
        pq.write_table(pa.table({"doc_id": [f"{domain}-{i}" for i in range(len(docs))],
                                 "tokens": pa.array(docs, pa.list_(pa.int32())),
                                 "n_bytes": [3 * max(n - 1, 0) for n in lengths]}), data / "eval" / f"{domain}.parquet")
    np.save(data / "probe.npy", rng.integers(0, 120, (2, 33)))


@pytest.fixture
def analysis_data_dir(tmp_path):
    """What `relora dynamics` reads: eval/ and probe.npy."""
    data = tmp_path / "data"
    (data / "eval").mkdir(parents=True)
    write_eval_and_probe(data)
    return data


def make_run(tmp_path, condition: str, layout: str = "relora"):
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(study_dict()))
    study = load_study(config_path)
    run = resolve_run(study, "nano", condition, 0)
    run_dir = tmp_path / f"runs/size=nano/condition={condition}/seed=0"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(run))
    config = model_config(study, "nano")
    for i, step in enumerate(run["steps"]["checkpoint"]):
        model = make_model(config, seed=i)
        adapters = relora_adapters(config, 4, seed=i, zero_b=step == 0) if condition == "relora" else None
        save_checkpoint(run_dir / "checkpoints" / f"step_{step}", model, step, adapters, rank=4, alpha=8.0,
                        layout=layout)
    return config_path, run_dir, run


@pytest.mark.parametrize("condition", ["full", "relora"])
def test_evaluate_and_dynamics_write_the_contract_tables(tmp_path, data_dir, condition):
    config_path, run_dir, run = make_run(tmp_path, condition)
    args = ["--config", str(config_path), "--data", str(data_dir), "--run", str(run_dir), "--threads", "1"]
    assert main(["evaluate", *args]) == 0
    ppl = pq.read_table(run_dir / "perplexity.parquet").to_pylist()
    assert list(ppl[0]) == PERPLEXITY.names
    assert {(r["step"], r["domain"]) for r in ppl} == {(s, d) for s in (0, 2, 4) for d in ("wiki", "code")}
    wiki = next(r for r in ppl if r["domain"] == "wiki")
    assert wiki["tokens"] == 4 + 49 + 11 and wiki["bytes"] == 3 * 64 and wiki["docs"] == 3
    assert wiki["perplexity"] == pytest.approx(math.exp(wiki["nll"] / wiki["tokens"]))
    assert wiki["bits_per_byte"] == pytest.approx(wiki["nll"] / (math.log(2) * wiki["bytes"]))
    assert wiki["condition"] == condition and wiki["size"] == "nano" and wiki["seed"] == 0
    blimp = pq.read_table(run_dir / "blimp.parquet").to_pylist()
    assert {(r["step"], r["uid"]) for r in blimp} == {(s, u) for s in (0, 2, 4) for u in BLIMP_UIDS}
    assert all(r["pairs"] == 6 and 0 <= r["accuracy"] <= 1 for r in blimp)
    assert {r["phenomenon"] for r in blimp} == {"anaphor_agreement", "determiner_noun_agreement"}

    assert main(["dynamics", *args]) == 0
    dyn = pq.read_table(run_dir / "dynamics.parquet").to_pylist()
    assert list(dyn[0])[:9] == ["size", "condition", "seed", "step", "layer", "module", "target", "metric", "value"]
    targets = {r["target"] for r in dyn}
    assert targets == ({"weight", "base", "gradient", "update", "activation"} |
                       ({"adapter", "adapter_A"} if condition == "relora" else set()))
    final_cka = [r["value"] for r in dyn if r["metric"] == "cka_to_final" and r["step"] == 4]
    assert final_cka == pytest.approx([1.0, 1.0])
    update0 = [r["value"] for r in dyn if r["step"] == 0 and r["target"] == "update" and r["metric"] == "numerical_rank"]
    assert update0 and set(update0) == {0.0}


def test_each_checkpoint_is_hashed_once_per_stage(tmp_path, data_dir, monkeypatch):
    """A stage verifies every checkpoint before its first metric and then loads each (dynamics
    loads the final step twice, for CKA): one sha256 per checkpoint, not one per load."""
    from relora import checkpoint

    config_path, run_dir, run = make_run(tmp_path, "relora")
    steps = run["steps"]["checkpoint"]
    for step in steps:  # record the sha256 as the trainer does
        folder = run_dir / "checkpoints" / f"step_{step}"
        meta = json.loads((folder / "config.json").read_text())
        meta["sha256"] = checkpoint.sha256_file(folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(meta))
    hashed, real = [], checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: hashed.append(Path(path).parent.name) or real(path))
    args = ["--config", str(config_path), "--data", str(data_dir), "--run", str(run_dir), "--threads", "1"]
    for command in ("evaluate", "dynamics"):
        hashed.clear()
        assert main([command, *args]) == 0
        assert sorted(hashed) == sorted(f"step_{s}" for s in steps), command  # steps 0, 2, 4: once each


def test_paper_huggingface_checkpoints_go_through_the_same_commands(tmp_path, data_dir):
    config_path, run_dir, _ = make_run(tmp_path, "relora", layout="huggingface")
    args = ["--config", str(config_path), "--data", str(data_dir), "--run", str(run_dir)]
    assert main(["dynamics", *args]) == 0
    dyn = pq.read_table(run_dir / "dynamics.parquet").to_pylist()
    ranks = {r["value"] for r in dyn if r["step"] == 2 and r["target"] == "adapter" and r["metric"] == "numerical_rank"}
    assert ranks == {4.0}  # scale taken from the run's config


def test_bad_inputs_are_named(tmp_path, data_dir, capsys):
    config_path, run_dir, _ = make_run(tmp_path, "full")
    args = ["--config", str(config_path), "--data", str(data_dir), "--run", str(run_dir)]
    # missing checkpoint at a requested step
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step_2")
    assert main(["evaluate", *args]) == 3
    assert "step_2: no checkpoint at step 2 (found: step_0, step_4)" in capsys.readouterr().err
    # a probe that does not fit the run
    np.save(data_dir / "probe.npy", np.full((2, 40), 3))
    assert main(["dynamics", *args, "--steps", "0,4"]) == 3
    assert "probe.npy: windows of 39 tokens" in capsys.readouterr().err
    # missing probe
    (data_dir / "probe.npy").unlink()
    assert main(["dynamics", *args, "--steps", "0,4"]) == 3
    assert "probe.npy: probe batch not found" in capsys.readouterr().err
    # missing evaluation files
    shutil.rmtree(data_dir / "eval")
    assert main(["evaluate", *args, "--steps", "0,4"]) == 3
    assert "eval: no evaluation files" in capsys.readouterr().err
    # a checkpoint that does not match the run's config
    other = make_model(model_config(load_study(config_path), "nano"))
    from relora.model import ModelConfig, PicoDecoder

    wide = ModelConfig(**{**other.config.to_dict(), "d_model": 48, "ffn_hidden": 192})
    save_checkpoint(run_dir / "checkpoints" / "step_4", PicoDecoder(wide), 4)
    assert main(["dynamics", *args, "--steps", "0,4", "--set", "analysis.targets=[weight]",
                 "--set", "analysis.cka=false"]) == 3
    err = capsys.readouterr().err
    assert "step_4/config.json: checkpoint does not match the run config: d_model is 48" in err
    assert not (run_dir / "dynamics.parquet").exists()


def test_checkpoint_written_by_the_trainer_loads(tmp_path):
    checkpoint = pytest.importorskip("relora.checkpoint")
    from relora.checkpoint import load_snapshot
    from test_evaluate import tiny_config

    config = tiny_config()
    method = {"name": "relora", "rank": 4, "alpha": 8.0, "scale": 2.0, "dropout": 0.1,
              "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "w_0", "w_1", "w_2"]}
    torch.manual_seed(0)
    model = checkpoint.build_model(config.to_dict(), method)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("B_lora"):
                p.normal_()
    checkpoint.save_checkpoint(model, tmp_path / "step_3", config.to_dict(), method, 3)
    reference, _ = checkpoint.load_checkpoint(tmp_path / "step_3")
    snap = load_snapshot(tmp_path / "step_3", expected=config, scale=2.0)
    idx = torch.randint(0, config.vocab_size, (2, 12))
    torch.testing.assert_close(snap.model()(idx), reference(idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(snap.effective_weight(1, "w_0").float(),
                               reference.layers[1].swiglu.w_0.effective_weight())


@pytest.mark.parametrize("condition", ["relora", "warm"])
def test_commands_on_a_run_trained_by_relora_train(tmp_path, data_dir, condition):
    train_module = pytest.importorskip("relora.train")
    study = study_dict()
    study["conditions"]["warm"] = {"method": "relora", "rank": 4, "alpha": 8, "reset_every": 2,
                                   "restart_warmup": 0, "warm_start_steps": 3}
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(study))
    run = resolve_run(load_study(config_path), "nano", condition, 0)
    np.save(data_dir / "train.npy", np.random.default_rng(1).integers(0, 120, 3000).astype(np.uint16))
    run_dir = tmp_path / "runs" / condition
    train_module.train(run, data_dir, run_dir, tmp_path / "resume", threads=1)
    args = ["--config", str(config_path), "--data", str(data_dir), "--run", str(run_dir), "--threads", "1"]
    assert main(["evaluate", *args]) == 0 and main(["dynamics", *args]) == 0
    ppl = pq.read_table(run_dir / "perplexity.parquet").to_pylist()
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in ppl)
    dyn = pq.read_table(run_dir / "dynamics.parquet").to_pylist()
    adapter_steps = {r["step"] for r in dyn if r["target"] == "adapter"}
    # adapters exist from the wrap on (step 3 for the warm start, so not at steps 0 and 2)
    assert adapter_steps == ({4} if condition == "warm" else {0, 2, 4})
    ranks = [r["value"] for r in dyn if r["target"] == "weight" and r["metric"] == "numerical_rank"]
    assert min(ranks) > 0
    # merges after updates 1 and 3: the step-4 adapter holds one update (B != 0), the step-0 one is zero
    adapter_rank = {s: {r["value"] for r in dyn if r["step"] == s and r["target"] == "adapter"
                        and r["metric"] == "numerical_rank"} for s in adapter_steps}
    assert max(adapter_rank[4]) > 0
    if condition == "relora":
        assert adapter_rank[0] == {0.0}


def test_hf_repo_downloads_the_missing_steps(tmp_path, data_dir, monkeypatch):
    """The hub path, with huggingface_hub replaced by a fake serving locally built Pico folders."""
    import sys
    import types

    config_path, run_dir, _ = make_run(tmp_path, "full", layout="huggingface")
    served = tmp_path / "served"
    (run_dir / "checkpoints").rename(served)
    commits = [types.SimpleNamespace(title=f"Saving HF Model -- Step {s}", commit_id=f"c{s}") for s in (4, 2, 0)]
    commits.append(types.SimpleNamespace(title="Saving Tokenizer -- Step 0", commit_id="tok"))
    calls = []

    def snapshot_download(repo_id, revision, local_dir, allow_patterns):
        import shutil

        calls.append((repo_id, revision))
        shutil.copytree(served / f"step_{revision[1:]}", local_dir, dirs_exist_ok=True)  # as the hub: into a folder
        return local_dir

    fake = types.SimpleNamespace(HfApi=lambda: types.SimpleNamespace(list_repo_commits=lambda repo_id, revision: commits),
                                 snapshot_download=snapshot_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    args = ["--config", str(config_path), "--data", str(data_dir), "--run", str(run_dir),
            "--hf-repo", "pico-lm/some-run@main"]
    assert main(["dynamics", *args, "--set", "analysis.cka=false"]) == 0
    assert sorted(calls) == [("pico-lm/some-run", "c0"), ("pico-lm/some-run", "c2"), ("pico-lm/some-run", "c4")]
    assert main(["dynamics", *args, "--steps", "0,4", "--set", "analysis.cka=false"]) == 0
    assert len(calls) == 3  # already there: nothing downloaded again
    commits[:] = commits[1:]
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step_4")
    assert main(["dynamics", *args]) == 3


def test_dynamics_with_the_papers_conventions(tmp_path, analysis_data_dir):
    """OV target, last-token CKA of w_2 and the OV heads over the evaluation documents (each cut
    to the context), and the adapter restart rows; no probe batch is read when neither the
    gradient target nor probe rows are asked for."""
    config_path, run_dir, run = make_run(tmp_path, "relora")
    (analysis_data_dir / "probe.npy").unlink()
    args = ["--config", str(config_path), "--data", str(analysis_data_dir), "--run", str(run_dir), "--threads", "1",
            "--set", "analysis.targets=[base, adapter, adapter_A, ov]",
            "--set", "analysis.cka={features: [w2_last_token, ov_last_token], rows: eval}"]
    assert main(["dynamics", *args]) == 0
    dyn = pq.read_table(run_dir / "dynamics.parquet").to_pylist()
    assert {r["target"] for r in dyn} == {"base", "adapter", "adapter_A", "ov", "activation"}
    ov_modules = {r["module"] for r in dyn if r["target"] == "ov"}
    assert ov_modules == {f"head_{h}" for h in range(6)} | {"all_heads"}
    head_rank = [r["value"] for r in dyn if r["target"] == "ov" and r["module"] == "head_0"
                 and r["metric"] == "numerical_rank"]
    assert head_rank and max(head_rank) <= 4  # hd = 24 / 6
    cka = [r for r in dyn if r["metric"] == "cka_to_final"]
    assert {r["module"] for r in cka} == {"w_2"} | {f"head_{h}" for h in range(6)}
    assert len(cka) == 3 * 2 * 7  # steps 0, 2, 4 x layers x (w_2 + 6 heads)
    assert [r["value"] for r in cka if r["step"] == 4] == pytest.approx([1.0] * 14)
    assert all(-1e-9 <= r["value"] <= 1 + 1e-9 for r in cka)
    raw = [r for r in dyn if r["metric"] == "condition_number_raw"]
    assert len(raw) == 3 * 2 * 7 and all(r["target"] == "adapter" for r in raw)
    restarted = [r for r in dyn if r["metric"] == "adapter_A_restarted"]
    assert {r["step"] for r in restarted} == {2, 4}  # against steps 0 and 2
    # every checkpoint of this run holds an independent draw of A: each counts as re-drawn
    assert {r["value"] for r in restarted} == {1.0}
    # the rows: every document of every domain (in name order), cut to the context of 32 tokens
    from relora.commands.dynamics import eval_rows

    assert [len(r) for r in eval_rows(analysis_data_dir, 32, 120)] == [31, 32, 5, 32, 12, 1]
    with pytest.raises(ValueError, match="outside the run's vocabulary"):
        eval_rows(analysis_data_dir, 32, 100)
    # the gradient target still needs the probe batch, and says so
    assert main(["dynamics", *args, "--set", "analysis.targets=[gradient]"]) == 3


@pytest.fixture
def own_data_dir(tmp_path):
    """A data directory whose BLiMP pairs are written here (no published BLiMP needed)."""
    data = tmp_path / "data"
    (data / "eval").mkdir(parents=True)
    (data / "blimp").mkdir()
    pairs = [("the dog runs", "a dog runs"), ("the cat sleeps", "the cats sleeps")]
    (data / "blimp" / "own_pairs.jsonl").write_text("".join(
        json.dumps({"sentence_good": g, "sentence_bad": b, "field": "syntax", "linguistics_term": "own",
                    "UID": "own_pairs", "pairID": str(i)}) + "\n" for i, (g, b) in enumerate(pairs)))
    tokenizer = train_tokenizer([s for pair in pairs for s in pair] * 20)
    tokenizer.save(str(data / "tokenizer.json"))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, tokenizer.get_vocab_size(), n).tolist() for n in (5, 50)]  # 50 > context 32
    pq.write_table(pa.table({"doc_id": ["d0", "d1"], "tokens": pa.array(docs, pa.list_(pa.int32())),
                             "n_bytes": [3 * (n - 1) for n in (5, 50)]}), data / "eval" / "wiki.parquet")
    return data


def test_evaluate_records_the_conventions_it_used(tmp_path, own_data_dir):
    from tokenizers import Tokenizer

    from relora.data.tokenizer import token_byte_lengths

    config_path, run_dir, _ = make_run(tmp_path, "full")
    base = ["--config", str(config_path), "--data", str(own_data_dir), "--run", str(run_dir),
            "--threads", "1", "--steps", "4"]
    assert main(["evaluate", *base]) == 0
    [sliding] = pq.read_table(run_dir / "perplexity.parquet").to_pylist()
    assert sliding["long_documents"] == "sliding" and sliding["tokens"] == 4 + 49
    assert {r["first_token"] for r in pq.read_table(run_dir / "blimp.parquet").to_pylist()} == {"scored"}
    assert main(["evaluate", *base, "--set", "evaluation.perplexity.long_documents=truncate",
                 "--set", "evaluation.blimp.first_token=unscored"]) == 0
    [truncated] = pq.read_table(run_dir / "perplexity.parquet").to_pylist()
    assert truncated["long_documents"] == "truncate" and truncated["tokens"] == 4 + 31
    docs = pq.read_table(own_data_dir / "eval" / "wiki.parquet").column("tokens").to_pylist()
    lengths = token_byte_lengths(Tokenizer.from_file(str(own_data_dir / "tokenizer.json")))
    assert truncated["bytes"] == 3 * 4 + int(lengths[docs[1][1:32]].sum())  # the cut document recounted
    assert truncated["nll"] < sliding["nll"]
    assert {r["first_token"] for r in pq.read_table(run_dir / "blimp.parquet").to_pylist()} == {"unscored"}


def test_evaluation_scores_with_the_kernels_the_run_trained_with(tmp_path):
    import torch

    from relora.commands.evaluate import _use_training_kernels
    from relora.model import KERNELS

    chosen = {"attention": "small_head", "rope": "real", "lm_head_chunk_logits": 2**20}
    _use_training_kernels({"kernels": chosen, "device": "cpu"}, torch.device("cpu"), tmp_path / "run.json")
    assert {k: KERNELS[k] for k in chosen} == chosen
    # trained on another kind of device: its measurement says nothing about this one
    _use_training_kernels({"kernels": {"attention": "sdpa"}, "device": "cuda:0"}, torch.device("cpu"),
                          tmp_path / "run.json")
    assert KERNELS["attention"] == "small_head"
    with pytest.raises(ValueError, match=r"run.json: kernel attention: 'fast'"):
        _use_training_kernels({"kernels": {"attention": "fast"}, "device": "cpu"}, torch.device("cpu"),
                              tmp_path / "run.json")
