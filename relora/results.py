"""Results: every run directory of a study -> one portable DuckDB file, with statistics.

`aggregate` reads `runs/size=<s>/condition=<c>/seed=<n>/` (docs/design.md, Files: `run.json` and the
Parquet files `train_metrics`, `dynamics`, `perplexity`, `blimp`; any may be missing for a run) and
writes `study.duckdb` atomically (a temporary file in the same folder, then a rename), so a reader
never sees a half-written database.

Tables (materialised, so the file is portable) and views (docs/design.md, Tables), plus the
statistics:

- `runs`          one row per run: size, condition, seed, method, params_total,
                  params_trainable, run_seed, device, last_step, n_merges, merge_steps (INTEGER[]),
                  the resolved config flattened with `_` (model_d_model, training_lr,
                  training_schedule_name, method_rank, method_merge_scale, ...; lists as JSON
                  text except the step lists), versions (JSON text), run_json (the whole file),
                  run_dir and files (which of the run's files were present).
- `train_metrics`, `dynamics`, `perplexity`, `blimp`: the run files' rows with size, condition
                  and seed taken from the run directory's hive path (it wins over any such
                  column inside a file); the contract's columns are cast to fixed types, extra
                  columns are kept. `dynamics` targets (relora.dynamics): `weight` (effective),
                  `base` (the stored W alone; a copy of `weight` for plain linears),
                  `gradient`, `update`, `adapter` (scale * B A, with `condition_number_top_r` =
                  sigma_1 / sigma_r over its top r singular values, NaN below rank r),
                  `adapter_A` (metrics `max_abs_over_init_bound` = max |A| * sqrt(in_features)
                  and `entries_over_3x_bound` = entries with |A| > 3 / sqrt(in_features), per
                  adapter) and `activation` (`cka_to_final`, module `block`).
- `blimp_reference(uid, phenomenon, model, model_label, accuracy)`: published per-paradigm
                  accuracies (Warstadt et al. 2020: 5-gram, LSTM, Transformer-XL, GPT-2, human
                  agreement) as `evaluation.blimp.reference` says: `published`, the package's
                  table relora/data/blimp_reference.csv; a folder of the authors' files; null,
                  none (empty). Join it by `uid` (the published summary files two paradigms
                  under another phenomenon).
- `blimp_baselines(uid, phenomenon, field, baseline, accuracy, pairs, correct, source)`: the
                  accuracy per paradigm of a context-free baseline on the study's own BLiMP pairs;
                  baseline 'unigram' (relora/data/unigram.py: each sentence scored by its tokens'
                  add-one-smoothed unigram log-probabilities from the training counts, a tie
                  counted wrong), from the data stage's blimp_unigram.parquet (`--blimp-baselines`);
                  empty when none is given. A paradigm counts as frequency-balanced when its
                  unigram accuracy lies within `evaluation.blimp.balanced_range` ([0.35, 0.65]).
- `study`         one row: study, reference_condition, confidence, final_loss_window, config
                  (JSON text of the study config), blimp_reference, aggregated_at, versions,
                  blimp_baselines (the file read) and blimp_balanced_low / _high.
- view `final`    (size, condition, seed, step, metric, value, n, better, family): every run's
                  last step of each table, one row per run and metric. Metric names:
                  `train_loss` (loss at the last step), `train_loss_smoothed` (mean over the last
                  `analysis.final_loss_window` steps); `bpb`, `ppl` (pooled over domains: token-
                  and byte-weighted), `ppl_doc_mean` (mean of the domains' document means) and
                  `bpb/<domain>`, `ppl/<domain>`, `ppl_doc_mean/<domain>`; `blimp` (mean of the
                  paradigms), `blimp_balanced` (mean of the frequency-balanced paradigms only;
                  absent without baselines) and `blimp/<phenomenon>`; `<metric>/<target>` and
                  `<metric>/<target>/<module>` for every dynamics metric except CKA (mean over
                  layers). `n`: pairs (BLiMP), tokens (perplexity), steps (smoothed loss) or
                  layers (dynamics). `better`: 'lower', 'higher' or NULL (no direction).
- `metric_summary(size, condition, metric, n_seeds, mean, std, ci_low, ci_high, ...)`: mean
                  and the t-interval (`analysis.confidence`, default 95%) over seeds; NaN
                  std and interval with one seed.
- `gap_stats` and view `gap(size, condition, metric, reference, mean_diff, ci_low, ci_high,
                  p_value, n_seeds, ...)`: each condition minus the reference condition
                  (`analysis.reference_condition`), paired by seed: mean difference, its
                  t-interval and the paired t-test p (NaN when n_seeds < 2), `test`
                  'paired_t'. BLiMP metrics (`blimp`, `blimp_balanced`, `blimp/<phenomenon>`)
                  instead take their interval and p from the paired t-test over paradigms
                  (`test` 'paired_t_paradigms', `n_paradigms`; seed-averaged accuracies), the
                  headline BLiMP test; the over-seeds p is then `seed_p_value`, with
                  `wilcoxon_p_value` (over paradigms) and `paper_ztest_p_anticonservative` (the
                  paper's pooled two-proportion z-test, anti-conservative: it treats correlated
                  pairs as independent trials). Positive `mean_diff` means the condition's value
                  is higher; `better` says whether that is good.
- `blimp_tests(size, condition, reference, seed, step, metric, test, statistic, p_value, n,
                  condition_accuracy, reference_accuracy, diff, ci_low, ci_high, role)`: per
                  seed, and with seed NULL pooled over seeds, for `blimp`, `blimp_balanced` and
                  each `blimp/<phenomenon>`: `paired_t_paradigms` (role 'headline'; n =
                  paradigms, ci = t-interval of the mean per-paradigm difference),
                  `wilcoxon_signed_rank` over paradigms (role 'check') and
                  `paper_two_proportion_z_anticonservative` (role 'paper (anti-conservative)';
                  n = pairs, summed over paradigms and seeds). See `_blimp_tests`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path

from .data.unigram import BALANCED_RANGE

RUN_FILES = ("train_metrics", "dynamics", "perplexity", "blimp")
KEY_TYPES = {"size": "VARCHAR", "condition": "VARCHAR", "seed": "INTEGER"}
# docs/design.md, Tables: the contract's columns (beyond the run keys) and their stored types
CONTRACT = {
    "train_metrics": {"step": "BIGINT", "tokens": "BIGINT", "loss": "DOUBLE", "lr": "DOUBLE",
                      "grad_norm": "DOUBLE", "tokens_per_s": "DOUBLE", "merged": "BOOLEAN"},
    "dynamics": {"step": "BIGINT", "layer": "INTEGER", "module": "VARCHAR", "target": "VARCHAR",
                 "metric": "VARCHAR", "value": "DOUBLE"},
    "perplexity": {"step": "BIGINT", "domain": "VARCHAR", "tokens": "BIGINT", "bytes": "BIGINT",
                   "nll": "DOUBLE", "ppl": "DOUBLE", "bpb": "DOUBLE", "ppl_doc_mean": "DOUBLE"},
    "blimp": {"step": "BIGINT", "uid": "VARCHAR", "phenomenon": "VARCHAR", "field": "VARCHAR",
              "pairs": "BIGINT", "accuracy": "DOUBLE", "source": "VARCHAR"},
}
SORT = {"train_metrics": "step", "dynamics": "step, target, metric, module, layer",
        "perplexity": "step, domain", "blimp": "step, uid"}
_RUN_DIR = re.compile(r"^size=(?P<size>[^/]+)/condition=(?P<condition>[^/]+)/seed=(?P<seed>\d+)$")

# published BLiMP reference columns (Warstadt et al. 2020) and their labels in figures
REFERENCE_MODELS = {"ngram": "5-gram", "lstm": "LSTM", "txl": "Transformer-XL", "gpt2": "GPT-2"}
HUMAN = ("human", "Human agreement")

SUMMARY_COLUMNS = {"size": "VARCHAR", "condition": "VARCHAR", "metric": "VARCHAR",
                   "family": "VARCHAR", "better": "VARCHAR", "step": "BIGINT",
                   "n_seeds": "INTEGER", "mean": "DOUBLE", "std": "DOUBLE", "ci_low": "DOUBLE",
                   "ci_high": "DOUBLE", "min": "DOUBLE", "max": "DOUBLE"}
GAP_COLUMNS = {"size": "VARCHAR", "condition": "VARCHAR", "metric": "VARCHAR",
               "reference": "VARCHAR", "mean_diff": "DOUBLE", "ci_low": "DOUBLE",
               "ci_high": "DOUBLE", "p_value": "DOUBLE", "n_seeds": "INTEGER",
               "family": "VARCHAR", "better": "VARCHAR", "condition_mean": "DOUBLE",
               "reference_mean": "DOUBLE", "rel_diff": "DOUBLE", "std_diff": "DOUBLE",
               "t_statistic": "DOUBLE", "test": "VARCHAR", "n_paradigms": "INTEGER",
               "seed_p_value": "DOUBLE", "wilcoxon_p_value": "DOUBLE",
               "paper_ztest_p_anticonservative": "DOUBLE", "seeds": "INTEGER[]"}
BLIMP_TEST_COLUMNS = {"size": "VARCHAR", "condition": "VARCHAR", "reference": "VARCHAR",
                      "seed": "INTEGER", "step": "BIGINT", "metric": "VARCHAR", "test": "VARCHAR",
                      "statistic": "DOUBLE", "p_value": "DOUBLE", "n": "BIGINT",
                      "condition_accuracy": "DOUBLE", "reference_accuracy": "DOUBLE",
                      "diff": "DOUBLE", "ci_low": "DOUBLE", "ci_high": "DOUBLE", "role": "VARCHAR"}
BASELINE_COLUMNS = {"uid": "VARCHAR", "phenomenon": "VARCHAR", "field": "VARCHAR",
                    "baseline": "VARCHAR", "accuracy": "DOUBLE", "pairs": "BIGINT",
                    "correct": "BIGINT", "source": "VARCHAR"}
# blimp_tests.test values: the headline test (paradigms as the units), a rank-based check of it,
# and the paper's test, which treats every pair of every paradigm as an independent trial
PARADIGM_T, WILCOXON, PAPER_Z = ("paired_t_paradigms", "wilcoxon_signed_rank",
                                 "paper_two_proportion_z_anticonservative")
TEST_ROLES = {PARADIGM_T: "headline", WILCOXON: "check", PAPER_Z: "paper (anti-conservative)"}


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


def _sql_str(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    """A column name from a data file as a quoted SQL identifier (an inner `"` doubled), so a
    name is only ever a name, never more SQL."""
    return '"' + str(name).replace('"', '""') + '"'


def _load_table(con, name: str, run_dirs: list[Path]) -> int:
    """Materialise one contract table from the run directories' Parquet files."""
    import pyarrow.parquet as pq

    contract = {**KEY_TYPES, **CONTRACT[name]}
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
        missing = [c for c in CONTRACT[name] if c not in columns]
        if missing:
            raise ResultsError(f"{path}: missing column(s) {', '.join(missing)} "
                               f"(docs/design.md, Tables: {name}({', '.join(contract)}))")
        select = [f"{_sql_str(size)}::VARCHAR AS size", f"{_sql_str(condition)}::VARCHAR AS condition",
                  f"{seed}::INTEGER AS seed"]
        select += [f"CAST({_sql_ident(c)} AS {t}) AS {_sql_ident(c)}" for c, t in CONTRACT[name].items()]
        select += [_sql_ident(c) for c in columns if c not in contract]
        part = f"_{name}_{i}"
        try:
            con.execute(f"CREATE TEMP TABLE {part} AS SELECT {', '.join(select)} "
                        f"FROM read_parquet({_sql_str(path)})")
        except Exception as e:  # noqa: BLE001 - duckdb conversion errors
            raise ResultsError(f"{path}: cannot read as {name} ({e})") from None
        parts.append(part)
    if parts:
        union = " UNION ALL BY NAME ".join(f"SELECT * FROM {p}" for p in parts)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM ({union}) "
                    f"ORDER BY size, condition, seed, {SORT[name]}")
        for p in parts:
            con.execute(f"DROP TABLE {p}")
    else:
        con.execute(f"CREATE TABLE {name} ({', '.join(f'{c} {t}' for c, t in contract.items())})")
    return len(parts)


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}_{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def _run_row(run_dir: Path, study: dict | None) -> dict:
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
        _flatten(section, config.get(section, {}), row)
    _flatten("method", {k: v for k, v in method.items() if k != "name"}, row)
    for key, value in steps.items():
        row[f"steps_{key}"] = value
    row["versions"] = json.dumps(config.get("versions")) if "versions" in config else None
    row["run_json"] = json.dumps(config) if path.exists() else None
    row["run_dir"] = str(run_dir)
    row["files"] = [f for f in ("run.json", *(f"{n}.parquet" for n in RUN_FILES))
                    if (run_dir / f).exists()]
    return row


def _load_runs(con, run_dirs: list[Path], study: dict | None) -> None:
    import pyarrow as pa

    rows = [_run_row(d, study) for d in run_dirs]
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
                "method::VARCHAR AS method) FROM runs_arrow ORDER BY size, condition, seed")


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

    con.execute("CREATE TABLE blimp_reference (uid VARCHAR, phenomenon VARCHAR, model VARCHAR, "
                "model_label VARCHAR, accuracy DOUBLE)")
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
    _insert(con, "blimp_baselines", BASELINE_COLUMNS, rows)


# ---------------------------------------------------------------------------------------------
# the `final` view


def final_view_sql(loss_window: int, balanced_range: tuple[float, float] = BALANCED_RANGE) -> str:
    """SQL of the `final` view: every run's last step of each table, one row per run and metric."""
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
            WHERE metric <> 'cka_to_final' GROUP BY ALL),
dy AS (SELECT d.* FROM dynamics d JOIN dy_last USING (size, condition, seed, step)
       WHERE d.metric <> 'cka_to_final' AND d.module <> 'block'),
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
  SELECT size, condition, seed, step, 'bpb', sum(nll) / (ln(2) * sum("bytes")), sum(tokens),
         'lower', 'perplexity' FROM pp GROUP BY size, condition, seed, step
  UNION ALL
  SELECT size, condition, seed, step, 'ppl', exp(sum(nll) / sum(tokens)), sum(tokens),
         'lower', 'perplexity' FROM pp GROUP BY size, condition, seed, step
  UNION ALL
  SELECT size, condition, seed, step, 'ppl_doc_mean', avg(ppl_doc_mean), sum(tokens),
         'lower', 'perplexity' FROM pp GROUP BY size, condition, seed, step
  UNION ALL
  SELECT size, condition, seed, step, 'bpb/' || domain, bpb, tokens, 'lower', 'perplexity' FROM pp
  UNION ALL
  SELECT size, condition, seed, step, 'ppl/' || domain, ppl, tokens, 'lower', 'perplexity' FROM pp
  UNION ALL
  SELECT size, condition, seed, step, 'ppl_doc_mean/' || domain, ppl_doc_mean, tokens, 'lower',
         'perplexity' FROM pp
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
# statistics


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, std, ci_low, ci_high) of a sample: the Student t-interval of the mean; NaN std
    and interval for fewer than two values."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    with np.errstate(invalid="ignore"):  # inf values (condition numbers) give NaN spreads
        std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def paired_t(condition_values, reference_values) -> tuple[float, float]:
    """(t statistic, two-sided p) of the paired t-test; NaN for fewer than two pairs."""
    from scipy import stats

    if len(condition_values) < 2:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant differences: scipy returns NaN and warns
        result = stats.ttest_rel(condition_values, reference_values)
    return float(result.statistic), float(result.pvalue)


def two_proportion_z(correct_a: float, n_a: float, correct_b: float, n_b: float) -> tuple[float, float]:
    """(z, two-sided p) of the pooled two-proportion z-test (the paper's BLiMP test)."""
    from scipy import stats

    if n_a <= 0 or n_b <= 0:
        return math.nan, math.nan
    p_a, p_b = correct_a / n_a, correct_b / n_b
    pooled = (correct_a + correct_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return math.nan, math.nan
    z = (p_a - p_b) / se
    return z, float(2 * stats.norm.sf(abs(z)))


def wilcoxon_signed_rank(condition_values, reference_values) -> tuple[float, float]:
    """(statistic, two-sided p) of the Wilcoxon signed-rank test over paired values (paradigms);
    NaN when every difference is zero or there is nothing to compare."""
    from scipy import stats

    diffs = [a - b for a, b in zip(condition_values, reference_values)]
    if not any(d != 0 for d in diffs):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.wilcoxon(condition_values, reference_values)
    return float(result.statistic), float(result.pvalue)


def _insert(con, table: str, columns: dict, rows: list[dict]) -> None:
    import pyarrow as pa

    con.execute(f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t in columns.items())})")
    if rows:
        arrow = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])  # noqa: F841
        con.execute(f"INSERT INTO {table} SELECT {', '.join(f'CAST({c} AS {t})' for c, t in columns.items())} "
                    "FROM arrow")


def _statistics(con, reference: str, confidence: float,
                balanced_range: tuple[float, float] = BALANCED_RANGE) -> None:
    final = con.execute("SELECT size, condition, seed, step, metric, value, family, better "
                        "FROM final").fetchall()
    groups: dict[tuple, dict[int, tuple]] = {}
    for size, condition, seed, step, metric, value, family, better in final:
        groups.setdefault((size, condition, metric), {})[seed] = (value, step, family, better)

    summary = []
    for (size, condition, metric), by_seed in groups.items():
        values = [v[0] for v in by_seed.values()]
        mean, std, low, high = t_interval(values, confidence)
        first = next(iter(by_seed.values()))
        summary.append({"size": size, "condition": condition, "metric": metric, "family": first[2],
                        "better": first[3], "step": max(v[1] for v in by_seed.values()),
                        "n_seeds": len(values), "mean": mean, "std": std, "ci_low": low,
                        "ci_high": high, "min": min(values), "max": max(values)})
    _insert(con, "metric_summary", SUMMARY_COLUMNS, summary)

    blimp_tests = _blimp_tests(con, reference, confidence, balanced_range)
    pooled = {(r["size"], r["condition"], r["metric"], r["test"]): r
              for r in blimp_tests if r["seed"] is None}
    gap = []
    for (size, condition, metric), by_seed in groups.items():
        ref = groups.get((size, reference, metric))
        if condition == reference or not ref:
            continue
        seeds = sorted(set(by_seed) & set(ref))
        if not seeds:
            continue
        cond_values = [by_seed[s][0] for s in seeds]
        ref_values = [ref[s][0] for s in seeds]
        diffs = [a - b for a, b in zip(cond_values, ref_values)]
        mean_diff, std_diff, low, high = t_interval(diffs, confidence)
        t_stat, p_value = paired_t(cond_values, ref_values)
        ref_mean = sum(ref_values) / len(ref_values)
        first = by_seed[seeds[0]]
        row = {
            "size": size, "condition": condition, "metric": metric, "reference": reference,
            "mean_diff": mean_diff, "ci_low": low, "ci_high": high, "p_value": p_value,
            "n_seeds": len(seeds), "family": first[2], "better": first[3],
            "condition_mean": sum(cond_values) / len(cond_values), "reference_mean": ref_mean,
            "rel_diff": mean_diff / ref_mean if ref_mean not in (0, 0.0) else math.nan,
            "std_diff": std_diff, "t_statistic": t_stat, "test": "paired_t", "seeds": seeds,
        }
        headline = pooled.get((size, condition, metric, PARADIGM_T))
        if headline:  # BLiMP: the test over paradigms is the headline; over seeds kept aside
            row.update(ci_low=headline["ci_low"], ci_high=headline["ci_high"],
                       p_value=headline["p_value"], t_statistic=headline["statistic"],
                       test=PARADIGM_T, n_paradigms=headline["n"], seed_p_value=p_value,
                       wilcoxon_p_value=(pooled.get((size, condition, metric, WILCOXON)) or {}).get("p_value"),
                       paper_ztest_p_anticonservative=(pooled.get((size, condition, metric, PAPER_Z))
                                                       or {}).get("p_value"))
        gap.append(row)
    _insert(con, "gap_stats", GAP_COLUMNS, gap)
    _insert(con, "blimp_tests", BLIMP_TEST_COLUMNS, blimp_tests)
    con.execute(f"CREATE VIEW gap AS SELECT {', '.join(GAP_COLUMNS)} FROM gap_stats "
                "ORDER BY size, condition, family, metric")


def _blimp_tests(con, reference: str, confidence: float = 0.95,
                 balanced_range: tuple[float, float] = BALANCED_RANGE) -> list[dict]:
    """Tests of each condition vs the reference on the BLiMP paradigms of every run's last
    evaluated step, for `blimp` (every paradigm), `blimp_balanced` (the paradigms whose unigram
    baseline accuracy lies in `balanced_range`) and each `blimp/<phenomenon>`; per seed, and
    pooled over seeds (seed NULL):

    - `paired_t_paradigms` (the headline): the paired t-test over paradigms of the per-paradigm
      accuracy differences (seed-averaged when pooled), with the t-interval of the mean
      difference (`ci_low`, `ci_high`). Paradigms are the units: the question is whether a
      condition is better at grammatical phenomena, of which the paradigms are a sample; the
      pairs within a paradigm share a template and are not independent trials.
    - `wilcoxon_signed_rank`: the same comparison without assuming normal differences.
    - `paper_two_proportion_z_anticonservative`: the paper's test, a pooled two-proportion
      z-test on all correct pairs as if every pair were an independent trial. Its p-values are
      far too small: the pairs of a paradigm are correlated and the same pairs are scored under
      both conditions, which the test ignores; kept only to compare with the paper.
    """
    rows = con.execute("""
        WITH last AS (SELECT size, condition, seed, max(step) AS step FROM blimp GROUP BY ALL),
        multi AS (SELECT count(DISTINCT source) > 1 AS multi FROM blimp)
        SELECT size, condition, seed, step,
               CASE WHEN multi THEN '[' || source || ']' ELSE '' END AS src,
               uid, phenomenon, pairs, accuracy
        FROM blimp JOIN last USING (size, condition, seed, step), multi""").fetchall()
    low, high = balanced_range
    balanced = {uid for uid, accuracy in con.execute(
        "SELECT uid, accuracy FROM blimp_baselines WHERE baseline = 'unigram'").fetchall()
        if low <= accuracy <= high}
    has_baselines = bool(con.execute("SELECT count(*) FROM blimp_baselines WHERE baseline = 'unigram'")
                         .fetchall()[0][0])
    # runs[(size, condition, src)][seed] = (step, {uid: (phenomenon, pairs, accuracy)})
    runs: dict[tuple, dict[int, tuple]] = {}
    for size, condition, seed, step, src, uid, phenomenon, pairs, accuracy in rows:
        entry = runs.setdefault((size, condition, src), {}).setdefault(seed, (step, {}))
        entry[1][uid] = (phenomenon, pairs, accuracy)

    out = []
    for (size, condition, src), by_seed in sorted(runs.items()):
        ref = runs.get((size, reference, src))
        if condition == reference or not ref:
            continue
        seeds = sorted(set(by_seed) & set(ref))
        if not seeds:
            continue
        common = {s: set(by_seed[s][1]) & set(ref[s][1]) for s in seeds}
        phenomena = sorted({by_seed[s][1][u][0] for s in seeds for u in common[s]} - {None})
        scopes = [(f"blimp{src}", lambda uid, paradigm: True)]
        if has_baselines:
            scopes.append((f"blimp_balanced{src}", lambda uid, paradigm: uid in balanced))
        scopes += [(f"blimp{src}/{ph}", lambda uid, paradigm, ph=ph: paradigm[0] == ph) for ph in phenomena]
        base = {"size": size, "condition": condition, "reference": reference}
        for seed in [*seeds, None]:
            use = seeds if seed is None else [seed]
            step = max(by_seed[s][0] for s in use)
            for metric, keep in scopes:
                # paradigms every used seed has, in both conditions
                uids = sorted(u for u in set.intersection(*(common[s] for s in use))
                              if keep(u, by_seed[use[0]][1][u]))
                if not uids:
                    continue
                row = {**base, "seed": seed, "step": step, "metric": metric}
                cond_acc = [sum(by_seed[s][1][u][2] for s in use) / len(use) for u in uids]
                ref_acc = [sum(ref[s][1][u][2] for s in use) / len(use) for u in uids]
                accuracies = {"n": len(uids), "condition_accuracy": sum(cond_acc) / len(uids),
                              "reference_accuracy": sum(ref_acc) / len(uids)}
                accuracies["diff"] = accuracies["condition_accuracy"] - accuracies["reference_accuracy"]
                mean_diff, _, ci_low, ci_high = t_interval([a - b for a, b in zip(cond_acc, ref_acc)],
                                                           confidence)
                t, p = paired_t(cond_acc, ref_acc)
                out.append({**row, **accuracies, "test": PARADIGM_T, "statistic": t, "p_value": p,
                            "ci_low": ci_low, "ci_high": ci_high, "role": TEST_ROLES[PARADIGM_T]})
                w, p = wilcoxon_signed_rank(cond_acc, ref_acc) if len(uids) >= 2 else (math.nan, math.nan)
                out.append({**row, **accuracies, "test": WILCOXON, "statistic": w, "p_value": p,
                            "role": TEST_ROLES[WILCOXON]})
                # the paper's test: correct pairs summed over paradigms (and seeds)
                c_correct = sum(by_seed[s][1][u][1] * by_seed[s][1][u][2] for s in use for u in uids)
                c_n = sum(by_seed[s][1][u][1] for s in use for u in uids)
                r_correct = sum(ref[s][1][u][1] * ref[s][1][u][2] for s in use for u in uids)
                r_n = sum(ref[s][1][u][1] for s in use for u in uids)
                if c_n and r_n:
                    z, p = two_proportion_z(c_correct, c_n, r_correct, r_n)
                    out.append({**row, "test": PAPER_Z, "statistic": z, "p_value": p,
                                "n": int(round(c_n)), "condition_accuracy": c_correct / c_n,
                                "reference_accuracy": r_correct / r_n,
                                "diff": c_correct / c_n - r_correct / r_n, "role": TEST_ROLES[PAPER_Z]})
    return out


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
        "confidence": float(analysis.get("confidence", 0.95)),
        "final_loss_window": int(analysis.get("final_loss_window", 10)),
        "blimp_reference": blimp_reference(blimp) if isinstance(blimp, dict) else None,
        "blimp_balanced_range": _balanced_range(blimp.get("balanced_range") if isinstance(blimp, dict)
                                                else None),
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
    tmp = out_db.with_name(f".{out_db.name}.{os.getpid()}.tmp")
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
        con.execute(final_view_sql(settings["final_loss_window"], settings["blimp_balanced_range"]))
        _statistics(con, settings["reference_condition"], settings["confidence"],
                    settings["blimp_balanced_range"])
        _write_study_row(con, study, settings, len(run_dirs))
        con.execute("CHECKPOINT")
        con.close()
        os.replace(tmp, out_db)
    except BaseException:
        con.close()
        for leftover in (tmp, wal):
            leftover.unlink(missing_ok=True)
        raise
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
    """Remove `.<name>.<pid>.tmp[.wal]` left by aggregations that were killed (their pid no
    longer runs); those of a live aggregation are left to it."""
    from .io import pid_alive

    pattern = re.compile(rf"^\.{re.escape(out_db.name)}\.(\d+)\.tmp(\.wal)?$")
    for path in out_db.parent.glob(f".{out_db.name}.*.tmp*"):
        match = pattern.match(path.name)
        if match and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def _write_study_row(con, study: dict | None, settings: dict, n_runs: int) -> None:
    import duckdb
    import scipy

    from . import __version__ as relora_version

    con.execute("CREATE TABLE study (study VARCHAR, reference_condition VARCHAR, confidence DOUBLE, "
                "final_loss_window INTEGER, config VARCHAR, blimp_reference VARCHAR, "
                "aggregated_at TIMESTAMPTZ, n_runs INTEGER, relora_version VARCHAR, "
                "duckdb_version VARCHAR, scipy_version VARCHAR, blimp_baselines VARCHAR, "
                "blimp_balanced_low DOUBLE, blimp_balanced_high DOUBLE)")
    name = settings["study"] or (con.execute("SELECT any_value(study) FROM runs").fetchall()[0][0]
                                 if "study" in _columns(con, "runs") else None)
    con.execute("INSERT INTO study VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
        name, settings["reference_condition"], settings["confidence"],
        settings["final_loss_window"], json.dumps(study) if study else None,
        settings["blimp_reference"], datetime.now(timezone.utc), n_runs, relora_version,
        duckdb.__version__, scipy.__version__, settings.get("blimp_baselines"),
        *settings["blimp_balanced_range"]])


def _columns(con, table: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
