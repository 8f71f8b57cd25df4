"""The trainer: determinism across conditions, resume, signals, divergence, DDP, bad input."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from relora.checkpoint import CheckpointError, load_checkpoint
from relora.config import load_study, resolve_run
from relora.data.batches import TokenBatches
from relora.lora import lora_modules
from relora.train import Trainer, TrainingDiverged, train

STUDY = {
    "study": "t",
    "data": {"seq_len": 16, "tokenizer": {"vocab_size": 100}},
    "sizes": {"tiny": {"d_model": 24, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2}},
    "training": {"steps": 12, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "checkpoint_every": 4,
                 "save_state_every": 3, "schedule": {"name": "linear", "warmup": 2}, "device": "cpu"},
    "conditions": {"full": {"method": "full"},
                   "relora": {"method": "relora", "rank": 4, "alpha": 8, "dropout": 0.1, "reset_every": 4,
                              "restart_warmup": 1,
                              "optimizer_reset": {"mode": "random", "ratio": 0.9, "masks": "shared"},
                              "training": {"schedule": {"name": "jagged_cosine", "warmup": 4, "min_ratio": 0.1}}},
                   "relora-paper": {"method": "relora", "rank": 4, "alpha": 8, "reset_every": 4,
                                    "restart_warmup": 1, "lora_init": "paper", "merge_scale": "paper",
                                    "training": {"schedule": {"name": "jagged_cosine", "warmup": 4}}},
                   "warm": {"method": "relora", "rank": 4, "alpha": 8, "reset_every": 4, "restart_warmup": 1,
                            "warm_start_steps": 5}},
    "seeds": [0, 1],
}


def resolved(condition="full", seed=0, **training):
    study = {**STUDY, "training": {**STUDY["training"], **training}}
    return resolve_run(load_study(study), "tiny", condition, seed)


def run_dir_state(run_dir):
    return load_file(run_dir / "checkpoints" / f"step_{STUDY['training']['steps']}" / "model.safetensors")


def test_conditions_share_initial_weights_and_batches(tmp_path, data_dir):
    initial = {}
    for condition in ("full", "relora", "relora-paper"):
        trainer = Trainer(resolved(condition), data_dir, tmp_path / condition, tmp_path / f"r-{condition}")
        state = trainer.model.state_dict()
        initial[condition] = {k: v for k, v in state.items() if not k.endswith(("A_lora", "B_lora"))}
        assert [trainer.batches.window_ids(k).tolist() for k in (1, 7)] == \
               [Trainer(resolved("full"), data_dir, tmp_path / "x", tmp_path / "y").batches.window_ids(k).tolist()
                for k in (1, 7)]
    for key, value in initial["full"].items():
        assert torch.equal(initial["relora"][key], value)
        assert torch.equal(initial["relora-paper"][key], value)
    other_seed = Trainer(resolved("full", seed=1), data_dir, tmp_path / "s1", tmp_path / "rs1")
    assert not torch.equal(other_seed.model.embedding_proj.weight, initial["full"]["embedding_proj.weight"])


def test_batches_cover_every_window_once_per_epoch():
    batches = TokenBatches(np.arange(16 * 10 + 1), seq_len=16, batch_size=5, seed=3)
    epoch = np.concatenate([batches.window_ids(1), batches.window_ids(2)])
    assert sorted(epoch.tolist()) == list(range(10))
    assert batches.batch(1).shape == (5, 17)


def test_run_outputs_and_merges(tmp_path, data_dir):
    run = resolved("relora")
    record = train(run, data_dir, tmp_path / "run", tmp_path / "resume", progress=False)
    run_dir = tmp_path / "run"
    assert not (tmp_path / "resume").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0", "step_12", "step_4", "step_8"]
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["params_total"] == record["params_total"] > saved["params_trainable"]
    metrics = pq.read_table(run_dir / "train_metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == list(range(1, 13))
    assert [r["step"] for r in metrics if r["merged"]] == [5, 9] == run["steps"]["merge"]
    # the update just before each merge runs with learning rate zero (f(4) = f(8) = 0)
    assert [r["lr"] for r in metrics if r["merged"]] == [0.0, 0.0]
    assert all(r["tokens"] == r["step"] * 4 * 16 for r in metrics)
    model, meta = load_checkpoint(run_dir / "checkpoints" / "step_12")
    assert meta["step"] == 12 and len(lora_modules(model)) == 14


def test_paper_init_trains_nothing_low_rank_until_the_first_reset(tmp_path, data_dir):
    train(resolved("relora-paper"), data_dir, tmp_path / "run", tmp_path / "resume", progress=False)
    before, _ = load_checkpoint(tmp_path / "run/checkpoints/step_4")
    start, _ = load_checkpoint(tmp_path / "run/checkpoints/step_0")
    for m0, m4 in zip(lora_modules(start), lora_modules(before)):
        assert torch.equal(m4.A_lora, torch.zeros_like(m4.A_lora)) and torch.equal(m4.B_lora, m0.B_lora)
        assert torch.equal(m4.weight, m0.weight)
    # the first merge (after update 5) adds B A = 0; then A is Kaiming-initialised and B learns,
    # and the second merge (after update 9) changes the frozen weights
    step8, _ = load_checkpoint(tmp_path / "run/checkpoints/step_8")
    assert all(torch.count_nonzero(m.B_lora) > 0 for m in lora_modules(step8))
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(lora_modules(step8), lora_modules(before)))
    step12, _ = load_checkpoint(tmp_path / "run/checkpoints/step_12")
    assert all(not torch.equal(a.weight, b.weight) for a, b in zip(lora_modules(step12), lora_modules(step8)))


@pytest.mark.parametrize("masks", ["shared", "independent"])
def test_merge_resets_adapter_moments_with_the_configured_masks(tmp_path, data_dir, masks):
    """Right after the merge at step 5 the trainer's reset leaves no adapter entry with a first
    moment but no second one when the masks are shared; independent masks (quirk 4) do."""
    study = copy.deepcopy(STUDY)
    study["conditions"]["relora"]["optimizer_reset"] = {"mode": "random", "ratio": 0.5, "masks": masks}
    trainer = Trainer(resolve_run(load_study(study), "tiny", "relora", 0), data_dir, tmp_path / "run",
                      tmp_path / "resume", progress=False)
    while trainer.step < 5:
        trainer.train_step()
    adapters = [p for m in lora_modules(trainer.model) for p in (m.A_lora, m.B_lora)]
    states = [trainer.optimizer.state[p] for p in adapters]
    orphans = sum(int(((s["exp_avg_sq"] == 0) & (s["exp_avg"] != 0)).sum()) for s in states)
    kept = sum(int((s["exp_avg_sq"] != 0).sum()) for s in states)
    total = sum(p.numel() for p in adapters)
    assert 0.4 * total < kept < 0.6 * total  # the reset did run, at ratio 0.5
    if masks == "shared":
        assert orphans == 0
    else:  # B's first moments are nonzero before the merge: about a quarter of them are orphaned
        assert orphans > 0.1 * total


def test_warm_start_attaches_adapters_after_full_rank_steps(tmp_path, data_dir):
    run = resolved("warm")
    train(run, data_dir, tmp_path / "run", tmp_path / "resume", progress=False)
    step4, meta4 = load_checkpoint(tmp_path / "run/checkpoints/step_4")
    step8, meta8 = load_checkpoint(tmp_path / "run/checkpoints/step_8")
    assert lora_modules(step4) == [] and not meta4["method"]["attached"]
    assert len(lora_modules(step8)) == 14 and meta8["method"]["attached"]
    assert run["steps"]["merge"] == [9]


def _train_cmd(config, data_dir, out, resume, condition="relora"):
    return [sys.executable, "-m", "relora.cli", "train", "--config", str(config), "--size", "tiny",
            "--condition", condition, "--seed", "0", "--data", str(data_dir), "--out", str(out),
            "--resume-dir", str(resume), "--threads", "1"]


def _slow_study(tmp_path, steps=40):
    config = tmp_path / "study.yaml"
    study = {**STUDY, "training": {**STUDY["training"], "steps": steps, "save_state_every": 2,
                                   "checkpoint_every": 10}}
    config.write_text(yaml.safe_dump(study))
    return config


def _wait_for_state(resume, process, min_step=4, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (resume / "state.pt").exists():
            state = torch.load(resume / "state.pt", weights_only=True)
            if state["step"] >= min_step:
                return state["step"]
        assert process.poll() is None, "training finished before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no state saved in time")


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, data_dir):
    config = _slow_study(tmp_path)
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(config, data_dir, reference, tmp_path / "r0"), check=True, capture_output=True)

    out, resume = tmp_path / "run", tmp_path / "resume"
    process = subprocess.Popen(_train_cmd(config, data_dir, out, resume), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    killed_after = _wait_for_state(resume, process)
    process.kill()
    process.wait()
    assert not (out / "run.json").exists()
    result = subprocess.run(_train_cmd(config, data_dir, out, resume), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {resume / 'state.pt'} at step" in result.stderr
    assert killed_after < 40

    for step in (0, 10, 20, 30, 40):
        a = load_file(reference / f"checkpoints/step_{step}/model.safetensors")
        b = load_file(out / f"checkpoints/step_{step}/model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"step {step} differs"
    ref_rows = pq.read_table(reference / "train_metrics.parquet").drop(["tokens_per_s"]).to_pylist()
    rows = pq.read_table(out / "train_metrics.parquet").drop(["tokens_per_s"]).to_pylist()
    assert rows == ref_rows


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_exits_nonzero(tmp_path, data_dir, signum):
    config = _slow_study(tmp_path, steps=400)
    out, resume = tmp_path / "run", tmp_path / "resume"
    process = subprocess.Popen(_train_cmd(config, data_dir, out, resume), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    _wait_for_state(resume, process, min_step=2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert "state saved" in stderr
    state = torch.load(resume / "state.pt", weights_only=True)
    assert 2 <= state["step"] < 400 and not out.exists()


def test_stale_state_from_another_config_is_discarded(tmp_path, data_dir, caplog):
    train(resolved("full"), data_dir, tmp_path / "a", tmp_path / "resume", progress=False, stop_after=6)
    assert (tmp_path / "resume" / "state.pt").exists()
    changed = resolved("full", lr=1e-3)
    with caplog.at_level("WARNING"):
        trainer = Trainer(changed, data_dir, tmp_path / "a", tmp_path / "resume", progress=False)
        trainer.prepare_resume_dir()
    assert trainer.step == 0 and "saved under another run config" in caplog.text
    same = Trainer(resolved("full"), data_dir, tmp_path / "b", tmp_path / "resume2", progress=False)
    assert not same.try_resume()


def test_nan_loss_stops_with_the_step(tmp_path, data_dir):
    run = resolved("full", lr=1e4, schedule={"name": "constant", "warmup": 0})
    with pytest.raises(TrainingDiverged, match=r"(loss|gradient norm) is (nan|inf) at step \d+"):
        train(run, data_dir, tmp_path / "run", tmp_path / "resume", progress=False)
    assert (tmp_path / "resume" / "checkpoints" / "step_0").is_dir()  # the last good checkpoint stays
    assert not (tmp_path / "run" / "run.json").exists()


def test_bad_tokens_and_missing_data(tmp_path, data_dir):
    np.save(data_dir / "train.npy", np.array([1, 2, 300, 4] * 100, dtype=np.uint16))
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary of 100"):
        Trainer(resolved("full"), data_dir, tmp_path / "run", tmp_path / "resume")
    with pytest.raises(FileNotFoundError, match="nowhere/train.npy"):
        Trainer(resolved("full"), tmp_path / "nowhere", tmp_path / "run", tmp_path / "resume")


def test_truncated_and_altered_checkpoints_are_reported(tmp_path, data_dir):
    train(resolved("full"), data_dir, tmp_path / "run", tmp_path / "resume", progress=False)
    step = tmp_path / "run/checkpoints/step_4"
    weights = step / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step_4/model.safetensors: sha256 differs"):
        load_checkpoint(step)
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(step, verify=False)
    with pytest.raises(CheckpointError, match="step_99/config.json: checkpoint config not found"):
        load_checkpoint(tmp_path / "run/checkpoints/step_99")


def test_cli_reports_errors_cleanly(tmp_path, data_dir):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    result = subprocess.run(_train_cmd(config, data_dir, tmp_path / "o", tmp_path / "r", condition="lora"),
                            capture_output=True, text=True)
    assert result.returncode == 3 and "condition 'lora' is not in the study" in result.stderr
    assert "Traceback" not in result.stderr


DDP_SCRIPT = """
import sys, torch
from relora.config import load_study, resolve_run
from relora.train import train
import yaml
study = load_study(yaml.safe_load(open(sys.argv[1])))
run = resolve_run(study, "tiny", sys.argv[2], 0)
torch.set_num_threads(1)
train(run, sys.argv[3], sys.argv[4], sys.argv[5], progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("condition", ["full", "relora"])
def test_ddp_two_processes_equal_one(tmp_path, data_dir, condition):
    study = {**STUDY, "training": {**STUDY["training"], "steps": 6}}
    study["conditions"]["relora"] = {**study["conditions"]["relora"], "dropout": 0.0, "reset_every": 3,
                                     "training": {"schedule": {"name": "jagged_cosine", "warmup": 2}}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = [sys.executable, str(script), str(config), condition, str(data_dir)]
    subprocess.run(single + [str(tmp_path / "one"), str(tmp_path / "r1")], check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    result = subprocess.run(torchrun + [str(script), str(config), condition, str(data_dir), str(tmp_path / "two"),
                                        str(tmp_path / "r2")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_file(tmp_path / d / "checkpoints/step_6/model.safetensors") for d in ("one", "two"))
    for key in one:
        # Adam normalises tiny gradient differences (reduction order) into visible ones: 1e-4
        torch.testing.assert_close(one[key], two[key], rtol=1e-3, atol=1e-4)
    losses = [pq.read_table(tmp_path / d / "train_metrics.parquet")["loss"].to_pylist() for d in ("one", "two")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_streamed_rows_train_like_a_token_file(tmp_path):
    """A pre-tokenized stream (local parquet standing in for pico-lm/pretokenized-dolma) gives
    update k the rows [(k-1)B, kB), and a run trains from it without train.npy."""
    import pyarrow as pa

    rows = np.random.default_rng(1).integers(0, 100, (60, 17))
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"input_ids": [r.tolist() for r in rows]}), tmp_path / "dolma.parquet")
    spec = {"path": str(tmp_path / "dolma.parquet"), "tokens_field": "input_ids", "stream": True}
    (data / "manifest.json").write_text(json.dumps({"train": {"kind": "stream", "datasets": [spec]}}))
    trainer = Trainer(resolved("full"), data, tmp_path / "run", tmp_path / "resume")
    assert torch.equal(trainer.batches.batch(3), torch.from_numpy(rows[8:12]))
    assert torch.equal(trainer.batches.batch(1)[2:], torch.from_numpy(rows[2:4]))  # re-opened at step 1
    trainer.fit()
    assert (tmp_path / "run" / "run.json").exists()
    with pytest.raises(ValueError, match="the training stream ended at row 60"):
        trainer.batches.batch(16)


def test_micro_batch_and_checkpointing_keep_the_updates(tmp_path, data_dir):
    """micro_batch_size 2 of batch 4 is grad_accum 2, and activation checkpointing recomputes the
    same blocks with the same dropout masks: the same losses and weights, under the same hash."""
    reference = Trainer(resolved("relora"), data_dir, tmp_path / "a", tmp_path / "ra")
    rows = [reference.train_step() for _ in range(6)]
    run = resolved("relora", grad_accum=None, micro_batch_size=2, activation_checkpointing=True)
    trainer = Trainer(run, data_dir, tmp_path / "b", tmp_path / "rb")
    assert (trainer.micro_batch, trainer.accum) == (2, 2) and trainer.model.activation_checkpointing
    # memory settings, not the trajectory: a run resumes under another micro-batch
    assert trainer.hash == Trainer(resolved("relora", grad_accum=None, micro_batch_size=4), data_dir,
                                   tmp_path / "c", tmp_path / "rc").hash
    for row in rows:
        assert trainer.train_step()["loss"] == pytest.approx(row["loss"], rel=1e-6)
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
