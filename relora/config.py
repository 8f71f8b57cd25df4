"""The one resolver: study config -> validated study -> per-run configs and step lists.

The Snakefile and the `relora` command both call this module, so the DAG Snakemake plans and
the steps a job executes can never disagree. A study is validated against the JSON Schema in
`workflow/schemas/config.schema.yaml` (jsonschema is imported lazily: the torch core runs where
it is not installed), its `default:` values are filled in, and checks the schema cannot express
(divisibility, ranks against matrix shapes, periods against the run length) run after it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

# torch-free: the Snakefile, `relora --help` and the data and results stages resolve studies
# without importing torch
from .model_config import ModelConfig, adapter_scale, pad_vocab

# the schema's one source is workflow/schemas/config.schema.yaml; a wheel, which has no workflow
# folder, carries a copy inside the package (setup.py makes it at build time)
_SOURCE_SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
_PACKAGED_SCHEMA = Path(__file__).resolve().parent / "config.schema.yaml"
SCHEMA_PATH = _SOURCE_SCHEMA if _SOURCE_SCHEMA.is_file() else _PACKAGED_SCHEMA
# evaluation.blimp.reference: the package's table of published BLiMP accuracies
PUBLISHED_BLIMP_REFERENCE = "published"


class ConfigError(ValueError):
    """A study config that cannot run; the message names the file and the key."""


@lru_cache(maxsize=1)
def load_schema() -> dict:
    import yaml

    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _resolve_ref(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def fill_defaults(instance, schema: dict, root: dict | None = None):
    """Fill the schema's `default:` values into a (validated) instance, recursively."""
    root = root if root is not None else schema
    schema = _resolve_ref(schema, root)
    if not isinstance(instance, dict):
        return instance
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:  # a default beside a $ref wins
            instance[key] = copy.deepcopy(sub["default"])
        sub = _resolve_ref(sub, root)
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            instance[key] = fill_defaults(instance[key], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in instance:
            if key not in schema.get("properties", {}):
                instance[key] = fill_defaults(instance[key], extra, root)
    return instance


def _key_path(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate_schema(study: dict, source: str = "config", schema: dict | None = None) -> None:
    """Raise ConfigError naming the file and key of the first schema violation."""
    try:
        import jsonschema
    except ImportError:  # the GPU machines run the core without jsonschema
        return
    schema = schema or load_schema()
    validator = _strict_validator(jsonschema)(schema)
    errors = sorted(validator.iter_errors(study), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: {_key_path(e.absolute_path)}: {_message(e)}" for e in errors[:10]]
        raise ConfigError("invalid study config\n  " + "\n  ".join(lines))


def _strict_validator(jsonschema):
    """Draft 2020-12 with stricter numbers: JSON Schema counts 8.0 as an integer, which then
    crashes `range()` or a tensor shape, and NaN or Inf as a number, which passes every bound
    (`nan > 0` is false, so is `nan <= 0`). Here an integer is written as one (8, not 8.0 or
    1e1) and a number is finite."""
    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine_many({
        "integer": lambda _, v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda _, v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    })
    return jsonschema.validators.extend(base, type_checker=checker)


def _message(error) -> str:
    value = error.instance
    if error.validator == "anyOf" and error.context:
        # "is not valid under any of the given schemas" names no cause: give the branch's
        # (e.g. analysis.cka: a mapping whose `rows` is not one of its values)
        inner = [e for e in error.context if e.relative_path or e.validator != "type"]
        if inner:
            where = _key_path(inner[0].relative_path)
            return inner[0].message + ("" if where == "<top level>" else f" (at {where})")
        kinds = [e.validator_value for e in error.context]
        return f"{value!r} is not one of the accepted types ({', '.join(map(str, kinds))})"
    if error.validator == "type" and isinstance(value, float):
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        if value.is_integer():
            return f"{value} is not an integer: write {int(value)}"
    return error.message


def yaml_load(text_or_file):
    """yaml.safe_load, but reading numbers as YAML 1.2 does: PyYAML (YAML 1.1) reads `1e3` and
    `3e4`, with no sign in the exponent or no dot, as strings, so `--set training.lr=1e3` would
    fail the schema with a puzzling "'1e3' is not of type 'number'"."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return yaml.load(text_or_file, Loader=Loader)


def typed_command_line_values(value):
    """Values of Snakemake's `--config key=value` with every string leaf read as YAML.

    Snakemake reads a top-level scalar as int, float or bool but a list or mapping with YAML's
    BaseLoader, so `--config 'seeds=[0,1]'` arrives as ['0', '1'] and `training={steps: 10}` as
    {'steps': '10'}. Here each string leaf is read as a YAML scalar (the YAML 1.2 numbers of
    yaml_load), as it would be read from a study file; text that is not a scalar stays a string."""
    if isinstance(value, dict):
        return {key: typed_command_line_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed_command_line_values(item) for item in value]
    if isinstance(value, str):
        try:
            parsed = yaml_load(value)
        except Exception:  # not valid YAML on its own (e.g. a stray colon): the text itself
            return value
        return value if isinstance(parsed, (dict, list)) else parsed
    return value


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of base with override's keys replaced, recursing into nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_overrides(study: dict, assignments: list[str], source: str = "--set") -> dict:
    """Apply `dotted.key=value` assignments (values parsed as YAML) to a copy of a study."""
    study = copy.deepcopy(study)
    for assignment in assignments or []:
        if "=" not in assignment:
            raise ConfigError(f"{source}: '{assignment}' is not of the form key=value")
        key, raw = assignment.split("=", 1)
        parts = key.strip().split(".")
        node = study
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: '{key}' descends into a non-mapping at '{part}'")
        node[parts[-1]] = yaml_load(raw)
    return study


def load_study(config, overrides: list[str] | None = None, source: str | None = None) -> dict:
    """Load (path or dict), apply --set overrides, validate, fill defaults, check semantics."""
    if isinstance(config, (str, Path)):
        import yaml

        source = source or str(config)
        try:
            with open(config) as f:
                study = yaml_load(f)
        except FileNotFoundError:
            raise ConfigError(f"{config}: study config not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{config}: not valid YAML: {e}") from None
    else:
        study, source = copy.deepcopy(config), source or "config"
    if not isinstance(study, dict):
        raise ConfigError(f"{source}: a study config must be a mapping, got {type(study).__name__}")
    study = apply_overrides(study, overrides or [])
    validate_schema(study, source)
    for key in ("reference_condition", "ablation_reference"):
        reference = (study.get("analysis") or {}).get(key)  # before the default
        if reference is not None and reference not in study["conditions"]:
            raise ConfigError(f"{source}: analysis.{key}: '{reference}' is not a condition of the "
                              f"study (conditions: {', '.join(study['conditions'])})")
    study = fill_defaults(study, load_schema())
    # a condition's training overrides are validated merged onto the study's training
    for name, condition in study["conditions"].items():
        merged = deep_merge(study["training"], condition.get("training", {}))
        validate_schema(merged, f"{source}: conditions.{name}.training",
                        {**load_schema(), **load_schema()["$defs"]["training"]})
    check_semantics(study, source)
    study["evaluation"]["blimp"]["reference"] = blimp_reference(study["evaluation"]["blimp"])
    return study


def blimp_reference(blimp: dict) -> str | None:
    """`evaluation.blimp.reference` with `auto` (the default) decided: the published accuracies
    for BLiMP's own paradigms (any source but `generated`), none for generated pairs (their
    `gen_` UIDs join no published figure)."""
    reference = blimp.get("reference", "auto")
    if reference == "auto":
        return None if blimp.get("source", "generated") == "generated" else PUBLISHED_BLIMP_REFERENCE
    return reference


def model_config(study: dict, size: str) -> ModelConfig:
    spec = study["sizes"][size]
    return ModelConfig(
        vocab_size=pad_vocab(study["data"]["tokenizer"]["vocab_size"]),
        d_model=spec["d_model"],
        n_layers=spec["n_layers"],
        n_heads=spec["n_heads"],
        n_kv_heads=spec["n_kv_heads"],
        ffn_hidden=spec["ffn_hidden"] or 4 * spec["d_model"],
        max_seq_len=study["data"]["seq_len"],
        rope_theta=spec["rope_theta"],
        norm_eps=spec["norm_eps"],
    )


def check_semantics(study: dict, source: str) -> None:
    """Checks the schema cannot express; each error names the key."""
    blimp = (study.get("evaluation") or {}).get("blimp") or {}
    blimp_source = blimp.get("source", "generated")
    if blimp.get("revision") is not None and not (blimp_source == "nyu-mll/blimp" or blimp_source.startswith("hf:")):
        raise ConfigError(f"{source}: evaluation.blimp.revision: '{blimp['revision']}' is for a hub source "
                          f"(nyu-mll/blimp or hf:<dataset id>); the source is '{blimp_source}'")
    for name in study["sizes"]:
        try:
            model_config(study, name)
        except ValueError as e:
            raise ConfigError(f"{source}: sizes.{name}: {e}") from None
    _check_cadence((study.get("evaluation") or {}).get("every"), f"{source}: evaluation.every")
    for name, spec in study["conditions"].items():
        _check_cadence(((spec.get("evaluation") or {}).get("every")),
                       f"{source}: conditions.{name}.evaluation.every")
        key = f"{source}: conditions.{name}"
        for field, known in (("sizes", list(study["sizes"])), ("seeds", study["seeds"])):
            unknown = [v for v in spec.get(field) or [] if v not in known]
            if unknown:
                raise ConfigError(f"{key}.{field}: {', '.join(map(str, unknown))} not in the study's "
                                  f"{field} ({', '.join(map(str, known))})")
        size, condition_seed = condition_sizes(study, name)[0], condition_seeds(study, name)[0]
        run = resolve_run(study, size, name, condition_seed)
        training, method = run["training"], run["method"]
        devices = training_devices(study)
        try:
            micro, _ = micro_batch_and_accumulation(training, devices)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
        check_gpu_memory(study, run, micro, key)
        schedule = training["schedule"]
        if schedule["name"] != "constant" and schedule["warmup"] > schedule["horizon"]:
            raise ConfigError(f"{key}: training.schedule.warmup {schedule['warmup']} is longer than the "
                              f"schedule's horizon {schedule['horizon']} (null: training.steps)")
        if method["name"] != "relora":
            continue
        steps, period = training["steps"], method["reset_every"]
        if method["warm_start_steps"] >= steps:
            raise ConfigError(f"{key}.warm_start_steps: {method['warm_start_steps']} leaves no "
                              f"ReLoRA steps in a run of training.steps {steps}")
        if period is not None and period >= steps:
            raise ConfigError(f"{key}.reset_every: {period} is not shorter than the run "
                              f"(training.steps {steps}); use null for plain LoRA")
        schedule = training["schedule"]
        if schedule["name"] == "jagged_cosine":
            if period is None:
                raise ConfigError(f"{key}.training.schedule: jagged_cosine needs a reset period; "
                                  "reset_every is null")
            if schedule["warmup"] > period:
                raise ConfigError(f"{key}: schedule warmup {schedule['warmup']} is longer than the "
                                  f"reset period reset_every {period}")
            if method["restart_warmup"] > period:
                raise ConfigError(f"{key}.restart_warmup: {method['restart_warmup']} is longer than "
                                  f"the reset period {period}")
        for size in condition_sizes(study, name):
            shapes = model_config(study, size).linear_shapes
            for target in method["targets"]:
                if method["rank"] > min(shapes[target]):
                    raise ConfigError(f"{key}.rank: {method['rank']} exceeds the smaller dimension "
                                      f"{min(shapes[target])} of {target} in size '{size}'")


def training_devices(study: dict) -> int:
    """Data-parallel processes of a train job: workflow.gpus.train (one process per GPU), or one."""
    return ((study.get("workflow") or {}).get("gpus") or {}).get("train") or 1


def micro_batch_and_accumulation(training: dict, devices: int = 1) -> tuple[int, int]:
    """(sequences per forward/backward pass on each device, passes per update): batch_size =
    micro_batch_size x grad_accum x devices. Either may be given (both: they must agree); the
    other follows, and with neither one pass per device takes its whole share of the batch."""
    batch, micro, accum = training["batch_size"], training.get("micro_batch_size"), training.get("grad_accum")
    where = f"training.batch_size {batch}"
    if micro is None:
        accum = accum or 1
        if batch % (accum * devices):
            raise ConfigError(f"{where} is not divisible by grad_accum {accum}"
                              + (f" x workflow.gpus.train {devices} (one process per GPU)" if devices > 1 else ""))
        return batch // (accum * devices), accum
    if batch % (micro * devices):
        divisors = [m for m in range(1, batch // devices + 1) if (batch // devices) % m == 0] \
            if batch % devices == 0 else []
        raise ConfigError(f"{where} is not divisible by micro_batch_size {micro} x {devices} devices"
                          + (f"; micro-batches that divide it: {divisors}" if divisors else ""))
    derived = batch // (micro * devices)
    if accum is not None and accum != derived:
        raise ConfigError(f"training.grad_accum {accum} disagrees with micro_batch_size {micro}: batch_size "
                          f"{batch} / ({micro} x {devices} devices) = {derived}; give one of the two")
    return micro, derived


def check_gpu_memory(study: dict, run: dict, micro: int, key: str) -> None:
    """A run that trains on GPUs must fit in workflow.gpu_mem_gb at its micro-batch, by the
    estimate of relora.memory; the error names the run and a micro-batch that fits."""
    from .memory import GIB, USABLE_FRACTION, largest_fitting_micro_batch, training_memory

    workflow = study.get("workflow") or {}
    gpu_mem_gb = workflow.get("gpu_mem_gb")
    gpus = (workflow.get("gpus") or {}).get("train")
    if gpu_mem_gb is None or run["training"]["device"] == "cpu" or gpus == 0:
        return
    training = run["training"]
    limit = USABLE_FRACTION * gpu_mem_gb * GIB
    checkpointing = training["activation_checkpointing"]
    for size in study["sizes"]:
        config = model_config(study, size)
        estimate = training_memory(config, micro, run["method"], training["precision"], checkpointing)["peak"]
        if estimate <= limit:
            continue
        per_device = training["batch_size"] // training_devices(study)
        fits = largest_fitting_micro_batch(config, per_device, run["method"], training["precision"],
                                           checkpointing, limit)
        advice = (f"micro_batch_size {fits} fits" if fits else "no micro-batch fits")
        if not checkpointing:
            with_checkpointing = largest_fitting_micro_batch(config, per_device, run["method"],
                                                             training["precision"], True, limit)
            if with_checkpointing and (fits is None or with_checkpointing > fits):
                advice += (f"; with training.activation_checkpointing: true, micro_batch_size "
                           f"{with_checkpointing} fits")
        raise ConfigError(
            f"{key}: size '{size}' needs an estimated {estimate / GIB:.1f} GiB of GPU memory at "
            f"micro_batch_size {micro}, more than {USABLE_FRACTION:.0%} of workflow.gpu_mem_gb {gpu_mem_gb} "
            f"(relora/memory.py); {advice}")


def _steps_every(every: int | None, last: int) -> set[int]:
    steps = {0, last}
    if every:
        steps.update(range(every, last, every))
    return steps


def cadence_steps(every, last: int) -> set[int]:
    """Steps of an evaluation cadence within a run of `last` updates: step 0, the last, and
    - every N (an integer): the multiples of N;
    - a schedule [[u_1, e_1], [u_2, e_2], ...] (u increasing): each k with u_{i-1} < k <= u_i
      (u_0 = 0) that is a multiple of e_i; no step after the last u.
    E.g. [[2000, 50], [20100, 100]] gives 50, 100, ..., 2000, 2100, 2200, ..., 20100."""
    if not isinstance(every, list):
        return _steps_every(every, last)
    steps, start = {0, last}, 0
    for until, period in every:
        first = (start // period + 1) * period  # the first multiple of period after start
        steps.update(range(first, min(until, last - 1) + 1, period))
        start = until
    return steps


def evaluation_cadence(study: dict, condition: str):
    """The evaluation cadence of a condition's runs: its own `evaluation.every` when it has one,
    else the study's."""
    own = study["conditions"][condition].get("evaluation") or {}
    if "every" in own:
        return own["every"]
    return (study.get("evaluation") or {}).get("every")


def _check_cadence(every, key: str) -> None:
    if isinstance(every, list):
        until = [u for u, _ in every]
        if any(b <= a for a, b in zip(until, until[1:])):
            raise ConfigError(f"{key}: the until_steps {until} of the schedule must increase")


def merge_steps(training: dict, method: dict) -> list[int]:
    """Updates k after which the adapters are merged: k > max(W, S) and k mod R == 1."""
    period = method.get("reset_every")
    if method["name"] != "relora" or not period:
        return []
    first = max(training["schedule"]["warmup"], method["warm_start_steps"])
    return [k for k in range(1, training["steps"] + 1) if k > first and k % period == 1]


def steps_around_merges(offsets: list, merges: list[int], restart_warmup: int, last: int) -> set[int]:
    """Steps m + o for every merge step m and offset o (an integer, or `restart_warmup` for
    + w), kept within [0, last]."""
    steps = set()
    for offset in offsets:
        delta = restart_warmup if offset == "restart_warmup" else offset
        steps.update(m + delta for m in merges if 0 <= m + delta <= last)
    return steps


def _analysis_around_merges(study: dict, training: dict, method: dict) -> set[int]:
    """`analysis.around_merges` for one run: a merging run is analysed around its own merges;
    a run that never merges (full-rank, plain LoRA) is its paired control, analysed at the
    union of those steps over the study's merging conditions (every size trains the same
    steps, so the union is the same at every size)."""
    offsets = (study.get("analysis") or {}).get("around_merges") or []
    if not offsets:
        return set()
    last = training["steps"]
    merges = merge_steps(training, method)
    if merges:
        return steps_around_merges(offsets, merges, method["restart_warmup"], last)
    steps = set()
    for name in study["conditions"]:
        other_training, other_method = _training_and_method(study, name)
        other_merges = merge_steps(other_training, other_method)
        if other_merges:
            steps |= steps_around_merges(offsets, other_merges, other_method["restart_warmup"], last)
    return steps


def _training_and_method(study: dict, condition: str) -> tuple[dict, dict]:
    """A condition's training section (its overrides applied) and method."""
    spec = copy.deepcopy(study["conditions"][condition])
    # which runs a condition has, what it is called and when it is evaluated change no update;
    # the cadence is read by evaluation_cadence
    for not_trajectory in ("sizes", "seeds", "description", "evaluation"):
        spec.pop(not_trajectory, None)
    training = deep_merge(study["training"], spec.pop("training", {}))
    training["schedule"] = fill_defaults(training.get("schedule", {}), load_schema()["$defs"]["schedule"])
    if training["schedule"]["horizon"] is None:
        training["schedule"]["horizon"] = training["steps"]
    method = {"name": spec.pop("method")}
    if method["name"] == "relora":
        method.update(spec)
        method["scale"] = adapter_scale(method["alpha"], method["rank"])
        if training["schedule"]["name"] == "jagged_cosine":
            training["schedule"]["reset_every"] = method["reset_every"]
            training["schedule"]["restart_warmup"] = method["restart_warmup"]
    return training, method


def resolve_run(study: dict, size: str, condition: str, seed: int) -> dict:
    """Everything one run needs, JSON-serialisable: model, training (condition overrides
    applied), method, and the checkpoint / evaluation / analysis / merge steps."""
    if size not in study["sizes"]:
        raise ConfigError(f"size '{size}' is not in the study (sizes: {', '.join(study['sizes'])})")
    if condition not in study["conditions"]:
        raise ConfigError(f"condition '{condition}' is not in the study "
                          f"(conditions: {', '.join(study['conditions'])})")
    if seed not in study["seeds"]:
        raise ConfigError(f"seed {seed} is not in the study (seeds: {study['seeds']})")
    if size not in condition_sizes(study, condition):
        raise ConfigError(f"condition '{condition}' does not run at size '{size}' "
                          f"(conditions.{condition}.sizes: {condition_sizes(study, condition)})")
    if seed not in condition_seeds(study, condition):
        raise ConfigError(f"condition '{condition}' does not run with seed {seed} "
                          f"(conditions.{condition}.seeds: {condition_seeds(study, condition)})")
    training, method = _training_and_method(study, condition)
    last = training["steps"]
    evaluation = cadence_steps(evaluation_cadence(study, condition), last)
    analysis = _steps_every(study.get("analysis", {}).get("every"), last)
    analysis |= _analysis_around_merges(study, training, method)
    checkpoint = _steps_every(training["checkpoint_every"], last) | evaluation | analysis
    return {
        "study": study["study"],
        "size": size,
        "condition": condition,
        "seed": seed,
        "run_seed": training["seed_base"] + seed,
        "model": model_config(study, size).to_dict(),
        "data": {"seq_len": study["data"]["seq_len"],
                 "vocab_size": study["data"]["tokenizer"]["vocab_size"]},
        "training": training,
        "method": method,
        "steps": {
            "checkpoint": sorted(checkpoint),
            "evaluation": sorted(evaluation),
            "analysis": sorted(analysis),
            "merge": merge_steps(training, method),
        },
    }


# training keys that say how often state is saved, checkpoints kept or lines logged, where the
# arithmetic runs (the device, the kernels) and how much of it a pass holds in memory (the
# micro-batch, activation checkpointing): none changes an update beyond rounding, so a run that
# ran out of GPU memory resumes under a smaller micro-batch (its dropout masks are then drawn in
# other groups, as after a device change). grad_accum, which says the same when given instead,
# stays in the hash only so that the runs configured before micro_batch_size existed keep theirs
NOT_TRAJECTORY = ("save_state_every", "checkpoint_every", "log_every", "device", "kernels",
                  "micro_batch_size", "activation_checkpointing")


def run_config_hash(run: dict) -> str:
    """Hash of what sets a run's training trajectory: model, data, method, the training keys
    that change the updates, and the merge steps. A saved state resumes only under the same
    hash (state.pt, checkpoints and run.json carry it). Saving state more often after a
    preemption, or evaluating at other steps, keeps the progress (a checkpoint missing at a newly
    configured step at or before the saved step still sends the run back to step 0); a device
    change resumes too, and run.json then records both devices."""
    relevant = copy.deepcopy(run)
    for key in NOT_TRAJECTORY:
        relevant["training"].pop(key, None)
    relevant["steps"] = {"merge": run["steps"]["merge"]}  # not the checkpoint/evaluation/analysis steps
    blob = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cka_settings(analysis: dict) -> dict:
    """`analysis.cka` as {enabled, features, rows}: true or false takes the schema's default
    features and rows, a mapping fills the keys it leaves out from them."""
    value = analysis.get("cka", True)
    branch = next(b for b in load_schema()["properties"]["analysis"]["properties"]["cka"]["anyOf"]
                  if b.get("type") == "object")
    defaults = {key: spec["default"] for key, spec in branch["properties"].items()}
    if isinstance(value, bool):
        return {"enabled": value, **defaults}
    return {"enabled": True, **defaults, **value}


def condition_sizes(study: dict, condition: str) -> list[str]:
    """The sizes a condition runs at: its `sizes`, or every size of the study."""
    return list(study["conditions"][condition].get("sizes") or study["sizes"])


def condition_seeds(study: dict, condition: str) -> list[int]:
    """The seeds a condition runs with: its `seeds`, or every seed of the study."""
    return list(study["conditions"][condition].get("seeds") or study["seeds"])


def runs(study: dict) -> list[tuple[str, str, int]]:
    """Every (size, condition, seed) of a study, in the order of its sizes, conditions and seeds."""
    return [(s, c, n) for s in study["sizes"] for c in study["conditions"] for n in study["seeds"]
            if s in condition_sizes(study, c) and n in condition_seeds(study, c)]
