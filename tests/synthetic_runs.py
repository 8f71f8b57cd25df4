"""A synthetic study in the run-directory contract (docs/design.md, Files and Tables), with
known values.

`write_synthetic_study(root)` writes `root/runs/size=<s>/condition=<c>/seed=<n>/` for every
(size, condition, seed) with `run.json`, `train_metrics.parquet`, `dynamics.parquet`,
`perplexity.parquet` and `blimp.parquet`, and returns the study config (a dict in the format of
config.yaml). Every value is a closed-form function of (size, condition, seed, step, ...) so that
tests can compute the expected statistics by hand; the `final_*` functions below give the values
at the last step. Any stage that reads run directories (aggregation, figures, the report, the
Snakemake rules) may reuse it.

Known structure, at the last step:
- training loss = BASE_LOSS[size] + CONDITION_OFFSET[condition] * SIZE_GAP_SCALE[size] + seed noise,
  so the gap of every ReLoRA condition against `full` is positive and widens with size;
- bits per byte per domain = loss-like value / ln 2 plus a domain offset;
- BLiMP paradigm accuracy = paradigm base - a condition penalty (+ seed noise), on real BLiMP UIDs
  (so published references join by UID), with `animate_subject_passive` filed under the data's
  phenomenon `s-selection` as in the real BLiMP files;
- PER of the weights is lower and the condition number higher for ReLoRA conditions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from relora.model_config import LINEAR_MODULES

SIZES = {"tiny": 48, "small": 96}                      # d_model
CONDITIONS = {"full": "full", "relora": "relora", "relora-paper": "relora"}
SEEDS = (0, 1)
STEPS = 300
EVERY = 100                                            # evaluation and analysis
RESET_EVERY = 100
WARMUP = 100
N_LAYERS = 2
MODULES = LINEAR_MODULES
DOMAINS = {"wiki": 0.0, "code": -0.4}
# (uid, phenomenon as in the BLiMP data files, field, base accuracy)
PARADIGMS = (
    ("anaphor_gender_agreement", "anaphor_agreement", "morphology", 0.80),
    ("anaphor_number_agreement", "anaphor_agreement", "morphology", 0.84),
    ("animate_subject_passive", "s-selection", "syntax", 0.62),
    ("causative", "argument_structure", "syntax", 0.66),
    ("passive_1", "argument_structure", "syntax", 0.70),
    ("npi_present_1", "npi_licensing", "semantics", 0.52),
)
PAIRS = 1000

BASE_LOSS = {"tiny": 5.0, "small": 4.0}
CONDITION_OFFSET = {"full": 0.0, "relora": 0.05, "relora-paper": 0.20}
SIZE_GAP_SCALE = {"tiny": 1.0, "small": 2.0}
BLIMP_PENALTY = {"full": 0.0, "relora": 0.01, "relora-paper": 0.04}


def seed_noise(size: str, condition: str, seed: int, scale: float = 0.01) -> float:
    """A deterministic, condition-dependent perturbation (so paired differences vary by seed)."""
    i = list(SIZES).index(size) + 1
    j = list(CONDITIONS).index(condition) + 1
    return scale * math.sin(1.7 * i + 2.3 * j + 3.1 * seed + 0.5 * seed * j)


def merge_steps(condition: str, steps: int = STEPS) -> list[int]:
    if CONDITIONS[condition] != "relora":
        return []
    return [k for k in range(1, steps + 1) if k > WARMUP and k % RESET_EVERY == 1]


def train_loss(size: str, condition: str, seed: int, step: int, steps: int = STEPS) -> float:
    final = (BASE_LOSS[size] + CONDITION_OFFSET[condition] * SIZE_GAP_SCALE[size]
             + seed_noise(size, condition, seed))
    return final + 4.0 * math.exp(-6.0 * step / steps) - 4.0 * math.exp(-6.0)


def learning_rate(condition: str, step: int, lr: float = 3e-3) -> float:
    if CONDITIONS[condition] == "full":
        return lr * min(1.0, step / 30) * max(0.0, 1 - step / 3000)
    k = step - 1                                       # update k uses f(k - 1)
    if k < WARMUP:
        return lr * k / WARMUP
    base = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - WARMUP) / (STEPS - WARMUP)))
    return lr * base * min(1.0, (k % RESET_EVERY) / 10)


def final_train_loss(size: str, condition: str, seed: int) -> float:
    return train_loss(size, condition, seed, STEPS)


def bits_per_byte(size: str, condition: str, seed: int, step: int, domain: str) -> float:
    return (train_loss(size, condition, seed, step) + DOMAINS[domain]) / math.log(2) / 4


def blimp_accuracy(size: str, condition: str, seed: int, step: int, uid_index: int) -> float:
    base = PARADIGMS[uid_index][3]
    progress = step / STEPS
    acc = 0.5 + (base - 0.5) * progress - BLIMP_PENALTY[condition] * progress
    acc += seed_noise(size, condition, seed + uid_index, 0.005) * progress
    return round(acc * PAIRS) / PAIRS                  # a proportion of whole pairs


def weight_per(size: str, condition: str, seed: int, step: int, module: str, layer: int) -> float:
    drop = 0.0 if condition == "full" else 0.03 + 0.02 * (condition == "relora-paper")
    return 0.97 - drop * step / STEPS - 0.002 * layer - 0.001 * MODULES.index(module) + 0.001 * seed


def weight_condition_number(size, condition, seed, step, module, layer) -> float:
    rise = 0.0 if condition == "full" else 3.0 + 2.0 * (condition == "relora-paper")
    return 2.0 + (1.0 + rise) * step / STEPS + 0.1 * layer + 0.05 * MODULES.index(module) + 0.02 * seed


def run_config(study: dict, size: str, condition: str, seed: int) -> dict:
    """run.json as the trainer writes it (the resolver's output plus counts, versions, device)."""
    d = SIZES[size]
    spec = study["conditions"][condition]
    method = {"name": spec["method"]}
    training = json.loads(json.dumps(study["training"]))
    if spec["method"] == "relora":
        method.update({k: v for k, v in spec.items() if k not in ("method", "training", "description")})
        method["scale"] = method["alpha"] / method["rank"]
        method["targets"] = list(MODULES)
        training["schedule"] = {"name": "jagged_cosine", "warmup": WARMUP, "horizon": STEPS,
                                "min_ratio": 0.1, "reset_every": RESET_EVERY, "restart_warmup": 10}
    params_total = 8192 * d * 2 + N_LAYERS * 12 * d * d
    adapters = N_LAYERS * 7 * 8 * (d + 4 * d) if spec["method"] == "relora" else 0
    steps = sorted({0, STEPS, *range(EVERY, STEPS, EVERY)})
    return {
        "study": study["study"], "size": size, "condition": condition, "seed": seed,
        "run_seed": 42 + seed,
        "model": {"vocab_size": 8192, "d_model": d, "n_layers": N_LAYERS, "n_heads": 12,
                  "n_kv_heads": 4, "ffn_hidden": 4 * d, "max_seq_len": 128},
        "data": {"seq_len": 128, "vocab_size": 8192},
        "training": training,
        "method": method,
        "steps": {"checkpoint": steps, "evaluation": steps, "analysis": steps,
                  "merge": merge_steps(condition)},
        "params_total": params_total + adapters,
        "params_trainable": (8192 * d * 2 + adapters) if adapters else params_total,
        "versions": {"python": "3.11", "torch": "2.11.0", "relora": "0.1.0"},
        "device": "cpu",
    }


def synthetic_study(name: str = "synthetic") -> dict:
    relora = {"method": "relora", "rank": 8, "alpha": 16, "dropout": 0.1, "reset_every": RESET_EVERY,
              "restart_warmup": 10, "optimizer_reset": {"mode": "random", "ratio": 0.999},
              "training": {"schedule": {"name": "jagged_cosine", "warmup": WARMUP, "min_ratio": 0.1}}}
    return {
        "study": name,
        "data": {"seq_len": 128, "probe_batch": 8, "tokenizer": {"vocab_size": 8192}},
        "sizes": {s: {"d_model": d, "n_layers": N_LAYERS, "n_heads": 12, "n_kv_heads": 4}
                  for s, d in SIZES.items()},
        "training": {"steps": STEPS, "batch_size": 16, "lr": 3e-3,
                     "schedule": {"name": "linear", "warmup": 30, "horizon": 3000},
                     "checkpoint_every": EVERY, "seed_base": 42},
        "conditions": {"full": {"method": "full"},
                       "relora": {**relora, "lora_init": "standard", "merge_scale": "correct"},
                       "relora-paper": {**relora, "lora_init": "paper", "merge_scale": "paper"}},
        "seeds": list(SEEDS),
        "evaluation": {"every": EVERY},
        "analysis": {"every": EVERY, "reference_condition": "full"},
    }


def _write(table: dict, path: Path) -> None:
    pq.write_table(pa.table(table), path)


def write_run(run_dir: Path, run: dict, files=("run.json", "train_metrics", "dynamics",
                                                "perplexity", "blimp"), with_keys: bool = False) -> None:
    """One run directory. `with_keys` also writes size/condition/seed columns into the Parquet
    files (the contract allows either; the hive path is authoritative)."""
    size, condition, seed = run["size"], run["condition"], run["seed"]
    run_dir.mkdir(parents=True, exist_ok=True)
    eval_steps = run["steps"]["evaluation"]

    def keyed(columns: dict) -> dict:
        n = len(next(iter(columns.values())))
        if with_keys:
            columns = {"size": [size] * n, "condition": [condition] * n, "seed": [seed] * n, **columns}
        return columns

    if "run.json" in files:
        (run_dir / "run.json").write_text(json.dumps(run, indent=2))
    if "train_metrics" in files:
        steps = list(range(1, STEPS + 1))
        merges = set(run["steps"]["merge"])
        _write(keyed({
            "step": steps,
            "tokens": [k * 16 * 128 for k in steps],
            "loss": [train_loss(size, condition, seed, k) for k in steps],
            "lr": [learning_rate(condition, k) for k in steps],
            "grad_norm": [1.0 + 1.0 / k for k in steps],
            "tokens_per_s": [20000.0 + 10 * (k % 7) for k in steps],
            "merged": [k in merges for k in steps],
        }), run_dir / "train_metrics.parquet")
    if "dynamics" in files:
        rows = {c: [] for c in ("step", "layer", "module", "target", "metric", "value")}

        def add(step, layer, module, target, metric, value):
            for c, v in zip(rows, (step, layer, module, target, metric, value)):
                rows[c].append(v)

        relora = run["method"]["name"] == "relora"
        targets = ["weight", "base", "gradient", "update"] + (["adapter"] if relora else [])
        for step in run["steps"]["analysis"]:
            for layer in range(N_LAYERS):
                for module in MODULES:
                    k = SIZES[size]
                    for target in targets:
                        if target in ("weight", "base"):  # the frozen base lags the effective weight
                            lag = 0.01 if target == "base" and relora else 0.0
                            per = weight_per(size, condition, seed, step, module, layer) - lag
                            cond = weight_condition_number(size, condition, seed, step, module, layer)
                        elif target in ("update", "adapter") and step == 0:
                            per, cond = math.nan, math.nan        # an all-zero matrix
                        elif target == "adapter":
                            per, cond = 8 / k * 0.9, math.inf     # rank r < k
                        else:
                            per, cond = 0.5 + 0.3 * step / STEPS, 50.0 + step
                        rank = 0 if math.isnan(per) else (8 if target == "adapter" else k)
                        for metric, value in (("proportional_effective_rank", per), ("effective_rank", per * k),
                                              ("condition_number", cond), ("numerical_rank", rank),
                                              ("frobenius_norm", 1.0 + step / STEPS),
                                              ("spectral_norm", 0.5 + step / STEPS)):
                            add(step, layer, module, target, metric, value)
                    if relora:  # quirk 4 in relora-paper: A entries far outside their init bound
                        ratio = 0.9 if step <= WARMUP or condition == "relora" else 50.0 + step / 2
                        add(step, layer, module, "adapter_A", "max_abs_over_init_bound", ratio)
                        add(step, layer, module, "adapter_A", "entries_over_3x_bound", float(ratio > 3) * (1 + layer))
                add(step, layer, "block", "activation", "cka_to_final",
                    1.0 if step == STEPS else 0.3 + 0.6 * step / STEPS + 0.05 * layer)
        _write(keyed(rows), run_dir / "dynamics.parquet")
    if "perplexity" in files:
        cols = {c: [] for c in ("step", "domain", "docs", "tokens", "bytes", "nll", "perplexity", "bits_per_byte",
                                "perplexity_doc_mean")}
        for step in eval_steps:
            for domain in DOMAINS:
                tokens, nbytes = 10000, 40000
                b = bits_per_byte(size, condition, seed, step, domain)
                nll = b * math.log(2) * nbytes
                for c, v in zip(cols, (step, domain, 50, tokens, nbytes, nll, math.exp(nll / tokens), b,
                                       1.1 * math.exp(nll / tokens))):
                    cols[c].append(v)
        _write(keyed(cols), run_dir / "perplexity.parquet")
    if "blimp" in files:
        cols = {c: [] for c in ("step", "uid", "phenomenon", "field", "pairs", "correct", "accuracy", "source")}
        for step in eval_steps:
            for i, (uid, phenomenon, field, _) in enumerate(PARADIGMS):
                accuracy = blimp_accuracy(size, condition, seed, step, i)
                for c, v in zip(cols, (step, uid, phenomenon, field, PAIRS, round(accuracy * PAIRS), accuracy,
                                       "blimp")):
                    cols[c].append(v)
        _write(keyed(cols), run_dir / "blimp.parquet")


def write_synthetic_study(root, sizes=tuple(SIZES), conditions=tuple(CONDITIONS), seeds=SEEDS,
                          missing: dict | None = None, name: str = "synthetic") -> dict:
    """Write results/<study>/runs/... under `root`; return the study config.

    `missing` maps (size, condition, seed) to the files to leave out of that run, e.g.
    `{("tiny", "relora", 1): ["blimp", "perplexity"]}`.
    """
    root = Path(root)
    study = synthetic_study(name)
    study["sizes"] = {s: study["sizes"][s] for s in sizes}
    study["conditions"] = {c: study["conditions"][c] for c in conditions}
    study["seeds"] = list(seeds)
    all_files = ("run.json", "train_metrics", "dynamics", "perplexity", "blimp")
    for size in sizes:
        for condition in conditions:
            for seed in seeds:
                skip = set((missing or {}).get((size, condition, seed), ()))
                run_dir = root / "runs" / f"size={size}" / f"condition={condition}" / f"seed={seed}"
                write_run(run_dir, run_config(study, size, condition, seed),
                          files=[f for f in all_files if f not in skip],
                          with_keys=(size, condition, seed) == (sizes[0], conditions[0], seeds[0]))
    return study
