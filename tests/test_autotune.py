"""relora.autotune: the model's kernels chosen by measurement, cached, overridable, and kept by a
resumed run. Timings are never asserted: only that a choice is one of the candidates, where it is
stored and that it is honoured."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import relora.model as model_module
from relora import autotune
from relora.config import load_study, resolve_run
from relora.train import Trainer, train

STUDY = {
    "study": "t",
    "data": {"seq_len": 16, "tokenizer": {"vocab_size": 100}},
    "sizes": {"tiny": {"d_model": 24, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2}},
    "training": {"steps": 10, "batch_size": 4, "lr": 3e-3, "save_state_every": 2, "device": "cpu",
                 "schedule": {"name": "linear", "warmup": 2}},
    "conditions": {"full": {"method": "full"},
                   "relora": {"method": "relora", "rank": 4, "alpha": 8, "dropout": 0.1, "reset_every": 4,
                              "restart_warmup": 1}},
    "seeds": [0],
}
SMALL_HEAD = {"attention": "small_head", "rope": "complex", "lm_head_chunk_logits": 2**20}
SDPA = {"attention": "sdpa", "rope": "real", "lm_head_chunk_logits": 2**22}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "autotune.json"
    monkeypatch.setenv(autotune.CACHE_FILE_ENV, str(path))
    return path


def resolved(condition="full", **training):
    study = {**STUDY, "training": {**STUDY["training"], **training}}
    return resolve_run(load_study(study), "tiny", condition, 0)


def key_of(run, micro_batch=4):
    return autotune.shape_key(run["model"], micro_batch, run["data"]["seq_len"], run["training"]["precision"], "cpu")


def put_in_cache(path, run, kernels):
    autotune.write_cache(path, key_of(run), {"kernels": kernels})


def test_cache_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(autotune.CACHE_FILE_ENV, raising=False)
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
    assert autotune.cache_path() == tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.CACHE_FILE_ENV, str(tmp_path / "x.json"))
    assert autotune.cache_path() == tmp_path / "x.json"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_measure_picks_a_candidate_of_each_kernel_and_leaves_rng_and_kernels_alone(precision):
    model = resolved()["model"]
    rng, kernels = torch.get_rng_state(), dict(model_module.KERNELS)
    result = autotune.measure(model, micro_batch=2, seq_len=16, precision=precision, device="cpu", rounds=1)
    assert set(result["kernels"]) == set(model_module.KERNEL_CHOICES)
    for name, choice in result["kernels"].items():
        assert choice in model_module.KERNEL_CHOICES[name]
    # the fastest measured is the one chosen
    for name, seconds in result["seconds"].items():
        assert str(result["kernels"][name]) == min(seconds, key=seconds.get)
    # 2 x 16 rows x vocab 100 logits: every chunk size but the smallest is one chunk, not timed
    assert result["kernels"]["lm_head_chunk_logits"] == 2**20 and "lm_head_chunk_logits" not in result["seconds"]
    assert torch.equal(torch.get_rng_state(), rng) and model_module.KERNELS == kernels


def test_sequences_beyond_the_small_head_bound_use_pytorchs_attention():
    model = resolved()["model"]
    result = autotune.measure(model, 1, model_module.SMALL_HEAD_MAX_SEQ + 2, "fp32", "cpu", ["attention"], rounds=1)
    assert result == {"kernels": {"attention": "sdpa"}, "seconds": {}}


def test_choice_is_measured_once_then_read_from_the_cache(cache, monkeypatch):
    run = resolved()
    first = autotune.choose_kernels(run, 4, "cpu")
    assert set(first) == set(model_module.KERNEL_CHOICES)
    stored = json.loads(cache.read_text())
    assert stored["version"] == autotune.CACHE_VERSION and stored["choices"][key_of(run)]["kernels"] == first

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although cached")

    monkeypatch.setattr(autotune, "measure", no_measuring)
    assert autotune.choose_kernels(run, 4, "cpu") == first
    put_in_cache(cache, run, SDPA)  # what the cache says is what a new run uses
    assert autotune.choose_kernels(run, 4, "cpu") == SDPA
    # another shape is another key: measured again
    with pytest.raises(AssertionError, match="measured although cached"):
        autotune.choose_kernels(run, 2, "cpu")


def test_config_fixes_kernels_without_measuring(cache, monkeypatch):
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured a fixed choice"))
    run = resolved(kernels=SMALL_HEAD)
    assert autotune.choose_kernels(run, 4, "cpu") == SMALL_HEAD
    assert not cache.exists()


def test_config_rejects_an_unknown_kernel():
    with pytest.raises(Exception, match="attention"):
        resolved(kernels={"attention": "flash"})


def test_unreadable_or_edited_cache_is_measured_again(cache, caplog):
    run = resolved()
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        chosen = autotune.choose_kernels(run, 4, "cpu")
    assert "unreadable autotune cache" in caplog.text and json.loads(cache.read_text())["choices"]
    put_in_cache(cache, run, {**chosen, "attention": "os.system"})  # not a candidate: measured again
    again = autotune.choose_kernels(run, 4, "cpu")
    assert again["attention"] in model_module.KERNEL_CHOICES["attention"]


def test_set_kernels_refuses_what_is_not_a_candidate():
    with pytest.raises(ValueError, match="attention"):
        model_module.set_kernels({"attention": "flash"})
    with pytest.raises(ValueError, match="kernel nope"):
        model_module.set_kernels({"nope": 1})


def final_weights(run_dir):
    return load_file(run_dir / "checkpoints" / f"step_{STUDY['training']['steps']}" / "model.safetensors")


@pytest.mark.parametrize("condition", ["full", "relora"])
def test_resumed_run_keeps_its_recorded_kernels_and_stays_bitwise_equal(tmp_path, cache, data_dir, condition):
    run = resolved(condition)
    put_in_cache(cache, run, SMALL_HEAD)
    record = train(run, data_dir, tmp_path / "whole", tmp_path / "r-whole", progress=False)
    assert record["kernels"] == SMALL_HEAD
    assert json.loads((tmp_path / "whole" / "run.json").read_text())["kernels"] == SMALL_HEAD

    train(run, data_dir, tmp_path / "cut", tmp_path / "r-cut", progress=False, stop_after=4)
    assert torch.load(tmp_path / "r-cut" / "state.pt", weights_only=True)["kernels"] == SMALL_HEAD
    put_in_cache(cache, run, SDPA)  # the machine's choice changed between interruption and resume
    record = train(run, data_dir, tmp_path / "cut", tmp_path / "r-cut", progress=False)
    assert record["kernels"] == SMALL_HEAD
    whole, cut = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)

    # the test can fail: the other kernels, from the start, round differently
    other = train(run, data_dir, tmp_path / "other", tmp_path / "r-other", progress=False)
    assert other["kernels"] == SDPA
    other_weights = final_weights(tmp_path / "other")
    assert any(not torch.equal(whole[k], other_weights[k]) for k in whole)
    for k in whole:  # ... and only by rounding
        torch.testing.assert_close(other_weights[k], whole[k], rtol=1e-3, atol=1e-4)


def test_fixed_kernels_changed_at_resume_are_ignored_with_a_warning(tmp_path, cache, data_dir, caplog):
    train(resolved(kernels=SMALL_HEAD), data_dir, tmp_path / "run", tmp_path / "resume", progress=False,
          stop_after=4)
    trainer = Trainer(resolved(kernels=SDPA), data_dir, tmp_path / "run", tmp_path / "resume", progress=False)
    with caplog.at_level(logging.WARNING):
        trainer.prepare_resume_dir()
        trainer.use_kernels()
    trainer.release()
    assert trainer.step == 4 and trainer.kernels == SMALL_HEAD and model_module.KERNELS == SMALL_HEAD
    assert "differs from the kernels this run started with" in caplog.text


def test_config_schema_offers_exactly_the_models_kernels():
    from relora.config import load_schema

    offered = load_schema()["$defs"]["training"]["properties"]["kernels"]["properties"]
    assert set(offered) == set(model_module.KERNEL_CHOICES)
    for name, choices in model_module.KERNEL_CHOICES.items():
        assert offered[name]["enum"] == ["auto", *choices] and offered[name]["default"] == "auto"
