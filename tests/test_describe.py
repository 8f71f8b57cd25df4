"""`relora describe`: the learning rate of the first update after a merge, the run's and the paper's."""

import math
from pathlib import Path

import pytest

from relora.cli import main
from relora.config import load_study, resolve_run
from relora.describe import describe_run, describe_study, paper_lr_after_merge


PAPER_STUDY = Path(__file__).resolve().parent.parent / "workflow" / "studies" / "paper.yaml"


def cosine(p):
    return 0.5 * (1 + math.cos(math.pi * p))


def test_paper_value_is_its_formula_at_the_first_update_after_the_first_merge():
    # update 2002 runs with 3e-4 * f(2001): 2001 mod 2000 = 1 < w, so (1 / 100) x the cosine's
    # value at the end of the re-warmup, (kR + w - W) / (T - W) = (2000 + 100 - 2000) / 198000
    expected = 3e-4 * (1 / 100) * (0.1 + 0.9 * cosine(100 / 198_000))
    assert paper_lr_after_merge() == pytest.approx(expected, rel=1e-12)


def study(reset_every=40, restart_warmup=2, lr=3e-3):
    return {
        "study": "d",
        "data": {"seq_len": 16, "tokenizer": {"vocab_size": 100}},
        "sizes": {"tiny": {"d_model": 24, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2}},
        "training": {"steps": 200, "batch_size": 4, "lr": lr, "device": "cpu",
                     "schedule": {"name": "linear", "warmup": 25, "horizon": 2000}},
        "conditions": {
            "full": {"method": "full"},
            "relora": {"method": "relora", "rank": 4, "alpha": 8, "reset_every": reset_every,
                       "restart_warmup": restart_warmup,
                       "training": {"schedule": {"name": "jagged_cosine", "warmup": 20, "min_ratio": 0.1}}},
        },
        "seeds": [0],
    }


def test_run_value_is_its_schedule_formula_after_its_first_merge():
    s = load_study(study())
    row = describe_run(resolve_run(s, "tiny", "relora", 0))
    # first merge after update 41 (41 mod 40 = 1); update 42 runs with f(41) = (1 / 2) x the
    # cosine at (40 + 2 - 20) / (2000 - 20)
    expected = 3e-3 * 0.5 * (0.1 + 0.9 * cosine(22 / 1980))
    assert row["n_merges"] == 4
    assert row["lr_after_merge"] == pytest.approx(expected, rel=1e-12)
    assert row["lr_after_merge_over_paper"] == pytest.approx(expected / paper_lr_after_merge(), rel=1e-12)
    full = describe_run(resolve_run(s, "tiny", "full", 0))
    assert full["n_merges"] == 0 and full["lr_after_merge"] is None and full["paper_lr_after_merge"] is None


def test_the_paper_study_matches_the_paper_value():
    rows = {r["condition"]: r for r in describe_study(load_study(PAPER_STUDY))
            if r["size"] == "tiny"}
    assert rows["relora"]["lr_after_merge"] == pytest.approx(paper_lr_after_merge(), rel=1e-12)
    assert rows["relora"]["lr_after_merge_over_paper"] == pytest.approx(1.0)


def test_describe_prints_both_values(tmp_path, capsys):
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study()))
    assert main(["describe", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    lr = header.index("lr_after_merge")
    assert header[lr:lr + 3] == ["lr_after_merge", "paper_lr_after_merge", "lr_after_merge_over_paper"]
    relora = next(line.split() for line in out.splitlines() if " relora " in line)
    assert float(relora[lr + 1]) == pytest.approx(paper_lr_after_merge(), rel=1e-3)


def test_checkpoints_disk_use_and_evaluation_cost_follow_from_the_steps():
    from relora.model_config import model_flops_per_token

    s = load_study({**study(), "evaluation": {"every": 50},
                    "conditions": {**study()["conditions"],
                                   "relora": {**study()["conditions"]["relora"],
                                              "evaluation": {"every": [[40, 10], [200, 40]]}}}})
    rows = {r["condition"]: r for r in describe_study(s, eval_tokens=1000)}
    full_run, relora_run = resolve_run(s, "tiny", "full", 0), resolve_run(s, "tiny", "relora", 0)
    assert relora_run["steps"]["evaluation"] == [0, 10, 20, 30, 40, 80, 120, 160, 200]
    assert rows["relora"]["n_evaluations"] == 9 and rows["full"]["n_evaluations"] == 5  # 0, 50, ..., 200
    for name, run in (("full", full_run), ("relora", relora_run)):
        row = rows[name]
        assert row["n_checkpoints"] == len(run["steps"]["checkpoint"])
        assert row["n_analyses"] == len(run["steps"]["analysis"])
        # fp32 state: every parameter, the adapters' A (rank x in) and B (out x rank) included
        assert row["checkpoint_bytes"] == 4 * row["params_total"]
        assert row["checkpoints_disk_bytes"] == row["n_checkpoints"] * row["checkpoint_bytes"]
        # a forward pass is a third of the training FLOPs per token (2 vs 6 per weight, attention alike)
        forward = model_flops_per_token(describe_config(run), run["data"]["seq_len"]) / 3
        assert row["eval_flops"] == pytest.approx(row["n_evaluations"] * 1000 * forward)
    m = full_run["model"]
    adapters = m["n_layers"] * 4 * sum(o + i for o, i in describe_config(full_run).linear_shapes.values())
    assert rows["relora"]["checkpoint_bytes"] - rows["full"]["checkpoint_bytes"] == 4 * adapters
    assert describe_study(s)[0]["eval_flops"] is None  # no token count, no estimate


def describe_config(run):
    from relora.model_config import ModelConfig

    return ModelConfig(**run["model"])


def test_describe_prints_checkpoints_and_evaluation_cost(tmp_path, capsys):
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**study(), "evaluation": {"every": 50}}))
    assert main(["describe", "--config", str(path), "--eval-tokens", "1000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line.split() for line in lines if "n_checkpoints" in line)
    assert header == ["size", "condition", "n_checkpoints", "checkpoint_bytes", "checkpoints_disk_bytes",
                      "n_evaluations", "n_analyses", "eval_flops"]
    s = load_study(yaml.safe_load(path.read_text()))
    row = describe_study(s, 1000)[1]
    relora = [line.split() for line in lines[lines.index(next(x for x in lines if "n_checkpoints" in x)):]
              if " relora " in line][0]
    assert relora[2:6] == [f"{row['n_checkpoints']:,}", f"{row['checkpoint_bytes']:,}",
                           f"{row['checkpoints_disk_bytes']:,}", f"{row['n_evaluations']:,}"]
    assert relora[6] == f"{row['n_analyses']:,}"
    assert float(relora[7]) == pytest.approx(row["eval_flops"], rel=1e-3)


def test_describe_counts_the_papers_analysed_steps():
    """paper.yaml: 0, 2000, ..., 20000 and 2101, ..., 18101 (after each restart warmup)."""
    rows = describe_study(load_study(PAPER_STUDY))
    assert {r["n_analyses"] for r in rows} == {11 + 9}


def test_describe_prints_micro_batch_accumulation_and_memory(tmp_path, capsys):
    import yaml

    from relora.memory import GIB, training_memory
    from relora.model_config import ModelConfig

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**study(), "workflow": {"gpus": {"train": 2}}}))
    assert main(["describe", "--config", str(path), "--set", "training.micro_batch_size=1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    relora = next(line.split() for line in lines if " relora " in line)
    run = resolve_run(load_study(study()), "tiny", "relora", 0)
    peak = training_memory(ModelConfig(**run["model"]), 1, run["method"], "fp32")["peak"]
    # batch 4 over 2 GPUs, one sequence per pass: 2 passes per update
    assert [relora[header.index(c)] for c in ("micro_batch_size", "grad_accum")] == ["1", "2"]
    assert float(relora[header.index("gpu_memory_gib")]) == pytest.approx(peak / GIB, rel=1e-3)


@pytest.mark.parametrize("steps, text", [
    ([0, 50, 100, 150, 2100], "0..150/50, 2100"),
    ([0, 20, 40, 41, 42, 44, 80, 81, 200], "0..40/20, 41, 42, 44, 80, 81, 200"),
    ([0, 200], "0, 200"),
    ([], ""),
])
def test_compact_steps_lists_every_step_once(steps, text):
    from relora.describe import compact_steps

    assert compact_steps(steps) == text
    expanded = []
    for part in filter(None, text.split(", ")):
        if ".." in part:
            first, rest = part.split("..")
            last, stride = rest.split("/")
            expanded += range(int(first), int(last) + 1, int(stride))
        else:
            expanded.append(int(part))
    assert expanded == steps


def test_describe_prints_each_runs_evaluation_and_analysis_steps(capsys, repo):
    from relora.describe import compact_steps

    assert main(["describe", "--config", str(repo / "workflow/studies/paper.yaml")]) == 0
    out = capsys.readouterr().out
    s = load_study(repo / "workflow/studies/paper.yaml")
    for condition in ("full", "relora"):
        run = resolve_run(s, "small", condition, 0)
        block = out[out.index(f"small {condition}\n"):]
        assert block.splitlines()[1] == f"  evaluated at: {compact_steps(run['steps']['evaluation'])}"
        assert block.splitlines()[2] == f"  analysed at:  {compact_steps(run['steps']['analysis'])}"
    assert "  evaluated at: 0..2000/50, 2100..20000/100" in out  # the paper's ReLoRA cadence
