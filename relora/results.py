"""Results: every run directory of a study -> one portable DuckDB file, with statistics.

`aggregate` reads `runs/size=<s>/condition=<c>/seed=<n>/` (docs/design.md, Files: `run.json` and the
Parquet files `train_metrics`, `dynamics`, `perplexity`, `blimp`; any may be missing for a run) and
writes `study.duckdb` atomically (a temporary file in the same folder, then a rename), so a reader
never sees a half-written database.

Every table and view, and every column, is declared in relora.tables with a comment that
`aggregate` writes into the database (`SELECT table_name, column_name, comment FROM
duckdb_columns()`). Tables are materialised, so the file is portable:

- `runs`: one row per run, the resolved run config flattened with `_` (model_d_model,
  training_lr, training_schedule_name, method_rank, ...; lists as JSON text except the step
  lists).
- `train_metrics`, `dynamics`, `perplexity`, `blimp`: the run files' rows with size, condition
  and seed taken from the run directory's hive path (it wins over any such column inside a
  file); the declared columns are cast to their types, extra columns are kept.
- `blimp_reference`: the published per-paradigm accuracies, as `evaluation.blimp.reference`
  says (`published`: the package's table relora/data/blimp_reference.csv; a folder of the
  authors' files; null: none). Join it by `uid` (the published summary files two paradigms
  under another phenomenon).
- `blimp_baselines`: the data stage's blimp_unigram.parquet (`--blimp-baselines`); a paradigm is
  frequency-balanced when its unigram accuracy lies within `evaluation.blimp.balanced_range`.
- `study`: one row, the settings and versions the database was built with.
- view `final`: every run's last step of each table, one row per run and metric: `train_loss`,
  `train_loss_smoothed` (mean over the last `analysis.final_loss_window` steps);
  `train_loss_smoothed_equal_flops` and `bits_per_byte_equal_flops`, the same at the run's
  `runs.equal_flops_step` (where it had spent its size's smallest training budget; bits per
  byte interpolated linearly between the evaluated steps around it);
  `bits_per_byte`, `perplexity` (pooled over domains: byte- and token-weighted),
  `perplexity_doc_mean` (by `evaluation.perplexity.doc_mean`: per_domain, the mean of the
  domains' document means; pooled, the mean over all documents of all domains) and each
  `/<domain>`; `blimp`
  (mean of the paradigms), `blimp_balanced` (the frequency-balanced paradigms only; absent
  without baselines) and `blimp/<phenomenon>`; `<metric>/<target>` and
  `<metric>/<target>/<module>` for every dynamics metric except CKA (mean over layers).
- `metric_summary`, `gap_stats`, view `gap`, `blimp_tests`: relora.statistics.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

from . import statistics
from .data.unigram import BALANCED_RANGE
from .io import atomic_path
from .tables import (BLIMP_BASELINES, BLIMP_REFERENCE, CKA_TO_FINAL, DATABASE, RUN_FILES, RUNS, STUDY,
                     comment_on, create_table, insert_rows, runs_column_comment, sql_ident, sql_str)

_RUN_DIR = re.compile(r"^size=(?P<size>[^/]+)/condition=(?P<condition>[^/]+)/seed=(?P<seed>\d+)$")

# published BLiMP reference columns (Warstadt et al. 2020) and their labels in figures
REFERENCE_MODELS = {"ngram": "5-gram", "lstm": "LSTM", "txl": "Transformer-XL", "gpt2": "GPT-2"}
HUMAN = ("human", "Human agreement")


class ResultsError(ValueError):
    """Bad run files or a bad results folder; the message names the path and the problem."""


# ---------------------------------------------------------------------------------------------
# finding runs


def run_key(run_dir: Path) -> tuple[str, str, int]:
    """(size, condition, seed) from a run directory's hive path `size=/condition=/seed=`."""
    tail = "/".join(Path(run_dir).resolve().parts[-3:])
    match = _RUN_DIR.match(tail)
    if not match:
        raise ResultsError(f"{run_dir}: not a run directory (expected .../size=<s>/condition=<c>/seed=<n>)")
    return match["size"], match["condition"], int(match["seed"])


def find_run_dirs(source) -> list[Path]:
    """Run directories from a study results folder (`results/<study>` or its `runs/`), or an
    explicit list of run directories."""
    if isinstance(source, (list, tuple)):
        dirs = [Path(p) for p in source]
        for d in dirs:
            if not d.is_dir():
                raise ResultsError(f"{d}: run directory not found")
            run_key(d)
    else:
        root = Path(source)
        if not root.is_dir():
            raise ResultsError(f"{root}: results folder not found")
        base = root / "runs" if (root / "runs").is_dir() else root
        dirs = [d for d in base.glob("size=*/condition=*/seed=*") if d.is_dir()]
    dirs = sorted(set(dirs), key=run_key)
    if not dirs:
        raise ResultsError(f"{source}: no run directories (size=<s>/condition=<c>/seed=<n>) found")
    keys = [run_key(d) for d in dirs]
    if len(set(keys)) != len(keys):
        raise ResultsError(f"{source}: the same (size, condition, seed) appears twice")
    return dirs


# ---------------------------------------------------------------------------------------------
# reading run files


def _load_table(con, name: str, run_dirs: list[Path]) -> int:
    """Materialise one run-file table (relora.tables.RUN_FILES) from the run directories."""
    import pyarrow.parquet as pq

    table = RUN_FILES[name]
    declared = [c for c in table.columns if c.name not in ("size", "condition", "seed")]
    parts = []
    for i, run_dir in enumerate(run_dirs):
        path = run_dir / f"{name}.parquet"
        if not path.exists():
            continue
        size, condition, seed = run_key(run_dir)
        try:
            columns = pq.read_schema(path).names
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise ResultsError(f"{path}: not a readable Parquet file ({e})") from None
        missing = [c.name for c in declared if c.required and c.name not in columns]
        if missing:
            raise ResultsError(f"{path}: missing column(s) {', '.join(missing)} "
                               f"(relora.tables: {name}({', '.join(table.names)}))")
        select = [f"{sql_str(size)}::VARCHAR AS size", f"{sql_str(condition)}::VARCHAR AS condition",
                  f"{seed}::INTEGER AS seed"]
        select += [f"CAST({sql_ident(c.name) if c.name in columns else 'NULL'} AS {c.type}) AS {sql_ident(c.name)}"
                   for c in declared]
        select += [sql_ident(c) for c in columns if c not in table.names]
        part = f"_{name}_{i}"
        try:
            con.execute(f"CREATE TEMP TABLE {part} AS SELECT {', '.join(select)} "
                        f"FROM read_parquet({sql_str(path)})")
        except Exception as e:  # noqa: BLE001 - duckdb conversion errors
            raise ResultsError(f"{path}: cannot read as {name} ({e})") from None
        parts.append(part)
    if parts:
        union = " UNION ALL BY NAME ".join(f"SELECT * FROM {p}" for p in parts)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM ({union}) "
                    f"ORDER BY size, condition, seed, {table.order}")
        for p in parts:
            con.execute(f"DROP TABLE {p}")
    else:
        create_table(con, table)
    return len(parts)


def _flatten(prefix: str, value, out: dict, keys: dict, dotted: str = "") -> None:
    """value's leaves into out under `a_b_c` names; keys records each name's `a.b.c` config key."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}_{k}" if prefix else k, v, out, keys, f"{dotted}.{k}" if dotted else k)
    else:
        out[prefix] = value
        keys[prefix] = dotted


def _run_row(run_dir: Path, study: dict | None, keys: dict) -> dict:
    size, condition, seed = run_key(run_dir)
    row = {"size": size, "condition": condition, "seed": seed, "method": None,
           "params_total": None, "params_trainable": None}
    path = run_dir / "run.json"
    config = {}
    if path.exists():
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}: not valid JSON ({e})") from None
        for key, expected in (("size", size), ("condition", condition), ("seed", seed)):
            if key in config and config[key] != expected:
                raise ResultsError(f"{path}: {key} is {config[key]!r} but the run directory says {expected!r}")
    elif study and condition in study.get("conditions", {}):
        config = {"method": {"name": study["conditions"][condition].get("method")}}
    method = config.get("method", {})
    row["method"] = method.get("name")
    row["params_total"] = config.get("params_total")
    row["params_trainable"] = config.get("params_trainable")
    for key in ("study", "run_seed", "device"):
        row[key] = config.get(key)
    training = config.get("training", {})
    steps = config.get("steps", {})
    row["last_step"] = training.get("steps")
    row["n_merges"] = len(steps.get("merge", [])) if steps else None
    row["merge_steps"] = steps.get("merge") if steps else None
    for section in ("model", "data", "training"):
        _flatten(section, config.get(section, {}), row, keys, section)
    _flatten("method", {k: v for k, v in method.items() if k != "name"}, row, keys, "method")
    for key, value in steps.items():
        row[f"steps_{key}"] = value
    row.update(_run_flops(config))
    row["versions"] = json.dumps(config.get("versions")) if "versions" in config else None
    row["run_json"] = json.dumps(config) if path.exists() else None
    row["run_dir"] = str(run_dir)
    row["files"] = [f for f in ("run.json", *(f"{n}.parquet" for n in RUN_FILES))
                    if (run_dir / f).exists()]
    return row


def _run_flops(config: dict) -> dict:
    """The run's training FLOPs (relora.model_config.training_flops) as `runs` columns; NULL
    when run.json lacks what they follow from (no run.json, or one written before `targets`)."""
    from .model_config import training_flops

    try:
        flops = training_flops(config)
    except (KeyError, TypeError, ValueError):
        return dict.fromkeys(("flops_per_token", "full_flops_per_token", "tokens_per_step", "train_flops"))
    return {"flops_per_token": float(flops["flops_per_token"]),
            "full_flops_per_token": float(flops["full_flops_per_token"]),
            "tokens_per_step": flops["tokens_per_step"], "train_flops": float(flops["total"])}


def step_at_flops(budget: float, tokens_per_step: int, flops_per_token: float,
                  full_flops_per_token: float, warm_start_steps: int = 0) -> float:
    """The (fractional) number of updates after which a run has spent `budget` training FLOPs:
    its first `warm_start_steps` updates cost the full-rank model's FLOPs per token, the rest its
    own."""
    warm = warm_start_steps * tokens_per_step * full_flops_per_token
    if budget <= warm:
        return budget / (tokens_per_step * full_flops_per_token)
    return warm_start_steps + (budget - warm) / (tokens_per_step * flops_per_token)


def _add_equal_flops_steps(rows: list[dict]) -> None:
    """`equal_flops_step` of every run: the step at which it had spent the smallest training
    budget among the runs of its size, so that runs of one size can be compared at equal
    training FLOPs (a ReLoRA run at its last step, full-rank at an earlier one)."""
    budgets: dict[str, float] = {}
    for row in rows:
        if row["train_flops"] is not None:
            budgets[row["size"]] = min(budgets.get(row["size"], math.inf), row["train_flops"])
    for row in rows:
        row["equal_flops_step"] = None if row["train_flops"] is None else step_at_flops(
            budgets[row["size"]], row["tokens_per_step"], row["flops_per_token"],
            row["full_flops_per_token"], row.get("method_warm_start_steps") or 0)


def _load_runs(con, run_dirs: list[Path], study: dict | None) -> None:
    import pyarrow as pa

    config_keys: dict[str, str] = {}
    rows = [_run_row(d, study, config_keys) for d in run_dirs]
    _add_equal_flops_steps(rows)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    columns = {}
    for key in keys:
        values = [row.get(key) for row in rows]
        lists_ok = key in ("merge_steps", "files") or key.startswith("steps_")
        if any(isinstance(v, (list, dict)) for v in values) and not lists_ok:
            values = [None if v is None else json.dumps(v) for v in values]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[key] = pa.array([None if v is None else json.dumps(v) for v in values])
    runs_arrow = pa.table(columns)  # noqa: F841 - read by name in the SQL below
    con.execute("CREATE TABLE runs AS SELECT * REPLACE (seed::INTEGER AS seed, "
                "params_total::BIGINT AS params_total, params_trainable::BIGINT AS params_trainable, "
                "method::VARCHAR AS method, flops_per_token::DOUBLE AS flops_per_token, "
                "full_flops_per_token::DOUBLE AS full_flops_per_token, tokens_per_step::BIGINT AS tokens_per_step, "
                "train_flops::DOUBLE AS train_flops, equal_flops_step::DOUBLE AS equal_flops_step) "
                "FROM runs_arrow ORDER BY size, condition, seed")
    comment_on(con, RUNS, {name: runs_column_comment(name, config_keys.get(name)) for name in keys})


# the published accuracies re-typed into the package (scripts/blimp_reference_table.py wrote it)
PUBLISHED_REFERENCE_TABLE = "blimp_reference.csv"


def published_blimp_reference() -> list[dict]:
    """The published per-paradigm BLiMP accuracies of Warstadt et al. 2020 (5-gram, LSTM,
    Transformer-XL, GPT-2, human agreement) from the package's table
    relora/data/blimp_reference.csv, as rows of `blimp_reference`: the rows
    `load_blimp_reference` reads from the authors' files."""
    import csv
    from importlib.resources import files

    text = (files("relora.data") / PUBLISHED_REFERENCE_TABLE).read_text()
    rows = []
    table = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    for record in table:
        for model, label in (*REFERENCE_MODELS.items(), HUMAN):
            if record[model]:  # empty: no published figure (two paradigms were validated, not released)
                # as the authors' files have it: the human file names no phenomenon
                phenomenon = None if model == HUMAN[0] else record["phenomenon"]
                rows.append({"uid": record["uid"], "phenomenon": phenomenon, "model": model,
                             "model_label": label, "accuracy": float(record[model])})
    return rows


def load_blimp_reference(folder) -> list[dict]:
    """Published per-paradigm BLiMP accuracies from a folder in the format the BLiMP authors
    released them in: models_summary.jsonl (one object per paradigm with UID, linguistics_term and
    the accuracies `ngram`, `lstm`, `txl`, `gpt2`; rows with UID 'overall' are summaries) and
    human_validation_summary.csv (Condition = UID, total_mean = human agreement)."""
    import csv

    folder = Path(folder)
    models, human = folder / "models_summary.jsonl", folder / "human_validation_summary.csv"
    if not folder.is_dir() or not (models.exists() or human.exists()):
        raise ResultsError(f"{folder}: evaluation.blimp.reference must be `published`, null or a "
                           "folder with models_summary.jsonl and/or human_validation_summary.csv")
    rows = []
    if models.exists():
        for n, line in enumerate(models.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if record["UID"] == "overall":  # summary rows: recomputed over the joined UIDs
                    continue
                for model, label in REFERENCE_MODELS.items():
                    if record.get(model) is not None:
                        rows.append({"uid": record["UID"], "phenomenon": record.get("linguistics_term"),
                                     "model": model, "model_label": label,
                                     "accuracy": float(record[model])})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ResultsError(f"{models}:{n}: bad reference row ({e})") from None
    if human.exists():
        with open(human, newline="") as f:
            for n, record in enumerate(csv.DictReader(f), 2):
                try:
                    rows.append({"uid": record["Condition"], "phenomenon": None, "model": HUMAN[0],
                                 "model_label": HUMAN[1], "accuracy": float(record["total_mean"])})
                except (KeyError, TypeError, ValueError) as e:
                    raise ResultsError(f"{human}:{n}: bad reference row ({e})") from None
    return rows


def _load_reference(con, reference) -> None:
    """`reference`: 'published' (the package's table), a folder of the authors' files, or None."""
    import pyarrow as pa

    from .config import PUBLISHED_BLIMP_REFERENCE

    create_table(con, BLIMP_REFERENCE)
    if reference:
        rows = (published_blimp_reference() if reference == PUBLISHED_BLIMP_REFERENCE
                else load_blimp_reference(reference))
        if rows:
            reference_arrow = pa.Table.from_pylist(rows)  # noqa: F841
            con.execute("INSERT INTO blimp_reference SELECT uid, phenomenon, model, model_label, "
                        "accuracy FROM reference_arrow ORDER BY model, uid")


def load_blimp_baselines(path) -> list[dict]:
    """Per-paradigm accuracies of context-free baselines (the data stage's
    blimp_unigram.parquet: uid, phenomenon, field, baseline, pairs, correct, accuracy, source)."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise ResultsError(f"{path}: BLiMP baseline table not found (the data stage's "
                           "blimp_unigram.parquet, written by `relora blimp --tokenizer`)") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ResultsError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [c for c in ("uid", "baseline", "accuracy", "pairs") if c not in table.column_names]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}")
    rows = table.to_pylist()
    seen = set()
    for n, row in enumerate(rows):
        key = (row["uid"], row["baseline"])
        if key in seen:
            raise ResultsError(f"{path}: row {n}: paradigm '{row['uid']}' appears twice for "
                               f"baseline '{row['baseline']}'")
        seen.add(key)
        accuracy = row["accuracy"]
        if accuracy is None or not 0 <= accuracy <= 1:
            raise ResultsError(f"{path}: row {n}: accuracy {accuracy!r} of '{row['uid']}' is not in [0, 1]")
    return rows


def _load_baselines(con, path) -> None:
    rows = load_blimp_baselines(path) if path else []
    insert_rows(con, BLIMP_BASELINES, rows)


# ---------------------------------------------------------------------------------------------
# the `final` view


DOC_MEANS = ("per_domain", "pooled")


def final_view_sql(loss_window: int, balanced_range: tuple[float, float] = BALANCED_RANGE,
                   doc_mean: str = "per_domain") -> str:
    """SQL of the `final` view: every run's last step of each table, one row per run and metric.
    `doc_mean`: how `perplexity_doc_mean` averages the domains' document means, each domain once
    (per_domain) or weighted by its documents, i.e. the mean over all documents (pooled)."""
    if doc_mean not in DOC_MEANS:
        raise ResultsError(f"evaluation.perplexity.doc_mean: '{doc_mean}' is not one of {', '.join(DOC_MEANS)}")
    doc_mean_sql = ("avg(perplexity_doc_mean)" if doc_mean == "per_domain" else
                    # a domain's mean times its documents is the sum of its documents' perplexities
                    "sum(docs * perplexity_doc_mean) FILTER (WHERE docs > 0) / sum(docs)")
    return f"""
CREATE VIEW final AS
WITH
tm_last AS (SELECT size, condition, seed, max(step) AS step FROM train_metrics GROUP BY ALL),
pp_last AS (SELECT size, condition, seed, max(step) AS step FROM perplexity GROUP BY ALL),
pp AS (SELECT p.* FROM perplexity p JOIN pp_last USING (size, condition, seed, step)),
bl_last AS (SELECT size, condition, seed, max(step) AS step FROM blimp GROUP BY ALL),
bl AS (SELECT b.*, CASE WHEN (SELECT count(DISTINCT source) FROM blimp) > 1
                        THEN '[' || b.source || ']' ELSE '' END AS src
       FROM blimp b JOIN bl_last USING (size, condition, seed, step)),
bb AS (SELECT bl.* FROM bl JOIN blimp_baselines u ON u.uid = bl.uid AND u.baseline = 'unigram'
       WHERE u.accuracy BETWEEN {float(balanced_range[0])!r} AND {float(balanced_range[1])!r}),
dy_last AS (SELECT size, condition, seed, max(step) AS step FROM dynamics
            WHERE metric <> '{CKA_TO_FINAL}' GROUP BY ALL),
dy AS (SELECT d.* FROM dynamics d JOIN dy_last USING (size, condition, seed, step)
       WHERE d.metric <> '{CKA_TO_FINAL}' AND d.module <> 'block'),
-- equal training FLOPs: each run where it had spent its size's smallest budget (runs.equal_flops_step)
eq AS (SELECT size, condition, seed, equal_flops_step AS eq_step FROM runs WHERE equal_flops_step IS NOT NULL),
bpb_steps AS (SELECT size, condition, seed, step, sum(nll) / (ln(2) * sum("bytes")) AS bpb
              FROM perplexity GROUP BY ALL),
-- the evaluated steps around it; bits per byte in between is interpolated linearly in the step
eq_bpb AS (
  SELECT e.size, e.condition, e.seed, e.eq_step,
         arg_max(p.step, p.step) FILTER (WHERE p.step <= e.eq_step) AS lo_step,
         arg_max(p.bpb, p.step) FILTER (WHERE p.step <= e.eq_step) AS lo_bpb,
         arg_min(p.step, p.step) FILTER (WHERE p.step >= e.eq_step) AS hi_step,
         arg_min(p.bpb, p.step) FILTER (WHERE p.step >= e.eq_step) AS hi_bpb
  FROM eq e JOIN bpb_steps p USING (size, condition, seed) GROUP BY ALL),
rows AS (
  SELECT size, condition, seed, step, 'train_loss' AS metric, loss AS value, 1::BIGINT AS n,
         'lower' AS better, 'train' AS family
  FROM train_metrics JOIN tm_last USING (size, condition, seed, step)
  UNION ALL
  SELECT t.size, t.condition, t.seed, max(t.step), 'train_loss_smoothed', avg(t.loss), count(*),
         'lower', 'train'
  FROM train_metrics t JOIN tm_last l USING (size, condition, seed)
  WHERE t.step > l.step - {int(loss_window)} GROUP BY t.size, t.condition, t.seed
  UNION ALL
  SELECT t.size, t.condition, t.seed, max(t.step), 'train_loss_smoothed_equal_flops', avg(t.loss),
         count(*), 'lower', 'train'
  FROM train_metrics t JOIN eq e USING (size, condition, seed)
  WHERE t.step > e.eq_step - {int(loss_window)} AND t.step <= e.eq_step GROUP BY t.size, t.condition, t.seed
  UNION ALL
  SELECT size, condition, seed, floor(eq_step)::BIGINT, 'bits_per_byte_equal_flops',
         CASE WHEN hi_step = lo_step THEN lo_bpb
              ELSE lo_bpb + (hi_bpb - lo_bpb) * (eq_step - lo_step) / (hi_step - lo_step) END,
         CASE WHEN hi_step = lo_step THEN 1 ELSE 2 END, 'lower', 'perplexity'
  FROM eq_bpb WHERE lo_step IS NOT NULL AND hi_step IS NOT NULL
  UNION ALL
  SELECT size, condition, seed, step, 'bits_per_byte', sum(nll) / (ln(2) * sum("bytes")), sum(tokens),
         'lower', 'perplexity' FROM pp GROUP BY size, condition, seed, step
  UNION ALL
  SELECT size, condition, seed, step, 'perplexity', exp(sum(nll) / sum(tokens)), sum(tokens),
         'lower', 'perplexity' FROM pp GROUP BY size, condition, seed, step
  UNION ALL
  SELECT size, condition, seed, step, 'perplexity_doc_mean', {doc_mean_sql}, sum(tokens),
         'lower', 'perplexity' FROM pp GROUP BY size, condition, seed, step
  UNION ALL
  SELECT size, condition, seed, step, 'bits_per_byte/' || domain, bits_per_byte, tokens, 'lower',
         'perplexity' FROM pp
  UNION ALL
  SELECT size, condition, seed, step, 'perplexity/' || domain, perplexity, tokens, 'lower',
         'perplexity' FROM pp
  UNION ALL
  SELECT size, condition, seed, step, 'perplexity_doc_mean/' || domain, perplexity_doc_mean, tokens,
         'lower', 'perplexity' FROM pp
  UNION ALL
  SELECT size, condition, seed, step, 'blimp' || src, avg(accuracy), sum(pairs), 'higher', 'blimp'
  FROM bl GROUP BY size, condition, seed, step, src
  UNION ALL
  SELECT size, condition, seed, step, 'blimp_balanced' || src, avg(accuracy), sum(pairs), 'higher',
         'blimp'
  FROM bb GROUP BY size, condition, seed, step, src
  UNION ALL
  SELECT size, condition, seed, step, 'blimp' || src || '/' || phenomenon, avg(accuracy),
         sum(pairs), 'higher', 'blimp'
  FROM bl GROUP BY size, condition, seed, step, src, phenomenon
  UNION ALL
  SELECT size, condition, seed, step, metric || '/' || target, avg(value), count(*), NULL,
         'dynamics' FROM dy GROUP BY size, condition, seed, step, metric, target
  UNION ALL
  SELECT size, condition, seed, step, metric || '/' || target || '/' || module, avg(value),
         count(*), NULL, 'dynamics' FROM dy GROUP BY size, condition, seed, step, metric, target, module
)
SELECT size, condition, seed, step, metric, value, n::BIGINT AS n, better, family FROM rows
ORDER BY size, condition, seed, family, metric
"""


# ---------------------------------------------------------------------------------------------
# the entry point


def study_settings(study: dict | None) -> dict:
    """The settings aggregation reads from a study config (defaults when absent)."""
    from .config import blimp_reference

    study = study or {}
    analysis = study.get("analysis") or {}
    blimp = (study.get("evaluation") or {}).get("blimp") or {}
    return {
        "study": study.get("study"),
        "reference_condition": analysis.get("reference_condition") or "full",
        "ablation_reference": analysis.get("ablation_reference"),
        "confidence": float(analysis.get("confidence", 0.95)),
        "final_loss_window": int(analysis.get("final_loss_window", 10)),
        "blimp_reference": blimp_reference(blimp) if isinstance(blimp, dict) else None,
        "blimp_balanced_range": _balanced_range(blimp.get("balanced_range") if isinstance(blimp, dict)
                                                else None),
        "perplexity_doc_mean": ((study.get("evaluation") or {}).get("perplexity") or {}).get("doc_mean",
                                                                                             "per_domain"),
    }


def _balanced_range(value) -> tuple[float, float]:
    if value is None:
        return BALANCED_RANGE
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ResultsError(f"evaluation.blimp.balanced_range: expected [low, high], got {value!r}") from None
    if not 0 <= low <= high <= 1:
        raise ResultsError(f"evaluation.blimp.balanced_range: {value!r} must satisfy 0 <= low <= high <= 1")
    return low, high


def aggregate(source, study: dict | str | Path | None, out_db, blimp_reference=None,
              blimp_baselines=None) -> Path:
    """Build `out_db` (study.duckdb) from a results folder or a list of run directories.

    `study` is the study config (a dict, or a path loaded with relora.config.load_study), used
    for `analysis.reference_condition`, `analysis.confidence`, `analysis.final_loss_window`,
    `evaluation.blimp.reference` (overridden by `blimp_reference`) and
    `evaluation.blimp.balanced_range`. `blimp_baselines` is the data stage's
    blimp_unigram.parquet (table `blimp_baselines`; without it, no `blimp_balanced`). Returns
    the path.
    """
    import duckdb

    if isinstance(study, (str, Path)):
        from .config import load_study

        study = load_study(study)
    settings = study_settings(study)
    if blimp_reference is not None:
        settings["blimp_reference"] = str(blimp_reference) or None
    run_dirs = find_run_dirs(source)

    out_db = Path(out_db)
    if out_db.exists() and not is_study_db(out_db):
        raise ResultsError(f"{out_db}: exists and is not a study database written by `relora aggregate`; "
                           "refusing to replace it: move it away or choose another --out")
    out_db.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temporaries(out_db)
    with atomic_path(out_db) as tmp:
        wal = tmp.with_name(tmp.name + ".wal")
        for leftover in (tmp, wal):
            leftover.unlink(missing_ok=True)
        con = duckdb.connect(str(tmp))
        try:
            _load_runs(con, run_dirs, study)
            for name in RUN_FILES:
                _load_table(con, name, run_dirs)
            _load_reference(con, settings["blimp_reference"])
            _load_baselines(con, blimp_baselines)
            settings["blimp_baselines"] = str(blimp_baselines) if blimp_baselines else None
            con.execute(final_view_sql(settings["final_loss_window"], settings["blimp_balanced_range"],
                                       settings["perplexity_doc_mean"]))
            statistics.add_statistics(con, settings["reference_condition"], settings["confidence"],
                                      settings["blimp_balanced_range"], settings["ablation_reference"])
            _write_study_row(con, study, settings, len(run_dirs))
            for table in DATABASE.values():
                if table is not RUNS:  # its comments were written with its flattened config
                    comment_on(con, table)
            con.execute("CHECKPOINT")
        except BaseException:
            con.close()
            wal.unlink(missing_ok=True)
            raise
        con.close()
    return out_db


def is_study_db(path: Path) -> bool:
    """Whether `path` is a DuckDB file with the `study` table this module writes (so it may be
    replaced by a new aggregation)."""
    import duckdb

    if not Path(path).is_file():
        return False
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            return "relora_version" in _columns(con, "study")
    except duckdb.Error:
        return False


def sweep_dead_temporaries(out_db: Path) -> None:
    """Remove `.<name>.tmp<pid>[.wal]` (relora.io.atomic_path's temporary name, and DuckDB's
    log beside it) left by aggregations that were killed (their pid no longer runs); those of a
    live aggregation are left to it."""
    from .io import pid_alive

    pattern = re.compile(rf"^\.{re.escape(out_db.name)}\.tmp(\d+)(\.wal)?$")
    for path in out_db.parent.glob(f".{out_db.name}.tmp*"):
        match = pattern.match(path.name)
        if match and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def _write_study_row(con, study: dict | None, settings: dict, n_runs: int) -> None:
    import duckdb
    import scipy

    from . import __version__ as relora_version

    create_table(con, STUDY)
    name = settings["study"] or (con.execute("SELECT any_value(study) FROM runs").fetchall()[0][0]
                                 if "study" in _columns(con, "runs") else None)
    con.execute(f"INSERT INTO study VALUES ({', '.join('?' * len(STUDY.columns))})", [
        name, settings["reference_condition"], settings["confidence"],
        settings["final_loss_window"], json.dumps(study) if study else None,
        settings["blimp_reference"], datetime.now(timezone.utc), n_runs, relora_version,
        duckdb.__version__, scipy.__version__, settings.get("blimp_baselines"),
        *settings["blimp_balanced_range"], settings["perplexity_doc_mean"], settings["ablation_reference"]])


def _columns(con, table: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
