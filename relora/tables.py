"""The tables: every Parquet file a stage writes and every table and view of the study database,
with its columns, their types and what each one holds; the metric names; the one Parquet writer.

Stages write long-format tables (one row per measurement). `write_table` is how every stage
writes one: the rows must carry exactly the table's columns (an unknown or missing column is an
error, so a stage cannot drift from this contract), typed as declared here, written under a
temporary name and renamed (relora.io.atomic_path). `relora aggregate` reads the same
declarations to cast the run files and writes the comments into the database (`COMMENT ON`),
so that `SELECT * FROM duckdb_columns()` explains every column.

Types are DuckDB's; a Parquet file stores the matching Arrow type (`arrow_type`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# metric names: spelled out, as a reader would type them

EFFECTIVE_RANK = "effective_rank"
PROPORTIONAL_EFFECTIVE_RANK = "proportional_effective_rank"
# the spectrum metrics of every dynamics target (docs/design.md, Metrics)
SPECTRUM_METRICS = (EFFECTIVE_RANK, PROPORTIONAL_EFFECTIVE_RANK, "condition_number", "numerical_rank",
                    "frobenius_norm", "spectral_norm")
TOP_R_CONDITION_NUMBER = "condition_number_top_r"  # adapters only
# adapters only: sigma_max / sigma_min of B A as stored, no tolerance (the paper's; rounding noise)
RAW_CONDITION_NUMBER = "condition_number_raw"
ADAPTER_A_METRICS = ("max_abs_over_init_bound", "entries_over_3x_bound")  # target adapter_A
# target adapter_A, against the previous analysed step: was A re-drawn in between? (a possible
# fifth quirk: resets undone by optimizer master copies)
ADAPTER_A_RESTART_METRICS = ("adapter_A_cosine_to_previous", "adapter_A_rms_over_init", "adapter_A_restarted")
CKA_TO_FINAL = "cka_to_final"  # target activation, module block (or w_2, head_<h>)

# names of earlier versions -> the names above; a database built before is not migrated
RENAMED_METRICS = {
    "erank": EFFECTIVE_RANK,
    "per": PROPORTIONAL_EFFECTIVE_RANK,
    "ppl": "perplexity",
    "bpb": "bits_per_byte",
    "ppl_doc_mean": "perplexity_doc_mean",
}


# ---------------------------------------------------------------------------------------------
# declarations


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # DuckDB type
    comment: str
    required: bool = True  # a run file without it is refused; optional ones read as NULL


@dataclass(frozen=True)
class Table:
    name: str
    comment: str
    columns: tuple[Column, ...]
    order: str = ""  # sort order in the study database (after size, condition, seed)
    kind: str = "TABLE"  # or VIEW

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def types(self) -> dict[str, str]:
        return {c.name: c.type for c in self.columns}

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no column {name!r}")


def _table(name: str, comment: str, *columns: tuple, order: str = "", kind: str = "TABLE") -> Table:
    return Table(name, comment, tuple(c if isinstance(c, Column) else Column(*c) for c in columns), order, kind)


RUN_KEYS = (
    Column("size", "VARCHAR", "model size: a key of the study's `sizes` (tiny, small, ...)"),
    Column("condition", "VARCHAR", "training condition: a key of the study's `conditions` (full, relora, ...)"),
    Column("seed", "INTEGER", "replicate seed of the run (size, condition, seed identify a run)"),
)
STEP = Column("step", "BIGINT", "optimizer updates done when the row was measured (0: the initial model)")

# --- run files: written by the stages into the run directory ---------------------------------

TRAIN_METRICS = _table(
    "train_metrics", "one row per optimizer update of a run (relora train; train_metrics.parquet)",
    *RUN_KEYS, STEP,
    ("tokens", "BIGINT", "training tokens seen after this update (step x batch_size x seq_len)"),
    ("loss", "DOUBLE", "mean next-token cross-entropy (nats) of this update's batch"),
    ("lr", "DOUBLE", "learning rate this update ran with"),
    ("grad_norm", "DOUBLE", "global L2 norm of the gradients of the trained parameters, before clipping"),
    ("tokens_per_s", "DOUBLE", "training throughput of this update (tokens per second of wall time)"),
    ("merged", "BOOLEAN", "whether ReLoRA merged and re-initialised its adapters after this update"),
    order="step")

PERPLEXITY = _table(
    "perplexity", "held-out perplexity and bits per byte per (step, evaluation domain) "
    "(relora evaluate; perplexity.parquet)",
    *RUN_KEYS, STEP,
    ("domain", "VARCHAR", "evaluation domain: the name of data/eval/<domain>.parquet"),
    ("docs", "BIGINT", "documents with at least one predicted token"),
    ("tokens", "BIGINT", "predicted tokens (every token of a document but its first)"),
    ("bytes", "BIGINT", "UTF-8 bytes of the predicted tokens"),
    ("nll", "DOUBLE", "sum of the negative log-likelihoods of the predicted tokens, nats"),
    ("perplexity", "DOUBLE", "token-weighted perplexity: exp(nll / tokens)"),
    ("bits_per_byte", "DOUBLE", "bits per byte: nll / (ln 2 * bytes); compares models with different tokenizers"),
    ("perplexity_doc_mean", "DOUBLE", "mean over this domain's documents of per-document perplexity "
                                      "(the paper's convention); averaged over domains in view final as "
                                      "evaluation.perplexity.doc_mean says (study.perplexity_doc_mean)"),
    Column("seconds", "DOUBLE", "wall time spent scoring this domain at this step", required=False),
    # optional so that run files written before the option existed (all `sliding`) still aggregate
    Column("long_documents", "VARCHAR", "how documents longer than the context were scored: sliding "
                                        "(every token, sliding windows) or truncate (the first seq_len "
                                        "tokens only; tokens, bytes and nll count those); NULL: a file "
                                        "written before the option, sliding", required=False),
    order="step, domain")

BLIMP = _table(
    "blimp", "BLiMP accuracy per (step, paradigm) (relora evaluate; blimp.parquet)",
    *RUN_KEYS, STEP,
    ("uid", "VARCHAR", "paradigm id (BLiMP's UID; generated paradigms start with gen_)"),
    ("phenomenon", "VARCHAR", "the paradigm's phenomenon (BLiMP's linguistics_term)"),
    ("field", "VARCHAR", "the paradigm's field: syntax, morphology, semantics, syntax_semantics, ..."),
    ("pairs", "BIGINT", "minimal pairs scored"),
    ("correct", "BIGINT", "pairs whose grammatical sentence got the higher log-probability (a tie is wrong)"),
    ("accuracy", "DOUBLE", "correct / pairs"),
    ("source", "VARCHAR", "where the pairs came from: generated, blimp (the published pairs), ..."),
    # optional so that run files written before the option existed (all `scored`) still aggregate
    Column("first_token", "VARCHAR", "scored: a sentence's first token counted, predicted from EOS; "
                                     "unscored: the first token context only, its own probability not counted "
                                     "(the paper's convention); NULL: a file "
                                     "written before the option, scored", required=False),
    order="step, uid")

DYNAMICS = _table(
    "dynamics", "rank metrics of weights, gradients, updates and adapters, and CKA, per "
    "(step, layer, module, target, metric) (relora dynamics; dynamics.parquet)",
    *RUN_KEYS, STEP,
    ("layer", "INTEGER", "decoder block, 0 = nearest the embedding"),
    ("module", "VARCHAR", "linear module (q_proj, k_proj, v_proj, o_proj, w_0, w_1, w_2); for target ov "
                          "head_<h> (one head's OV circuit) or all_heads (the layer's); for CKA block, w_2 "
                          "or head_<h>"),
    ("target", "VARCHAR", "matrix analysed: weight (effective, W + scale B A), base (stored W), gradient, "
                          "update (W_t - W_0), adapter (scale B A), adapter_A (factor A), ov (OV circuit of "
                          "the stored W_V, W_O), activation (CKA)"),
    ("metric", "VARCHAR", "effective_rank, proportional_effective_rank, condition_number, numerical_rank, "
                          "frobenius_norm, spectral_norm, condition_number_top_r, condition_number_raw, "
                          "max_abs_over_init_bound, entries_over_3x_bound, adapter_A_cosine_to_previous, "
                          "adapter_A_rms_over_init, adapter_A_restarted or cka_to_final (docs/design.md, Metrics)"),
    ("value", "DOUBLE", "the metric's value (NaN where undefined, e.g. the effective rank of a zero matrix)"),
    order="step, target, metric, module, layer")

RUN_FILES = {t.name: t for t in (TRAIN_METRICS, DYNAMICS, PERPLEXITY, BLIMP)}

# --- data files: written by the data stage ----------------------------------------------------

EVAL_DOCUMENTS = _table(
    "eval_documents", "held-out documents of one evaluation domain (data/eval/<domain>.parquet)",
    ("doc_id", "VARCHAR", "document id, unique within the domain"),
    ("source", "VARCHAR", "the set the document came from"),
    ("tokens", "INTEGER[]", "token ids of the document"),
    ("n_bytes", "BIGINT", "UTF-8 bytes of every token but the first (the predicted ones)"))

BLIMP_BASELINES = _table(
    "blimp_baselines", "accuracy per BLiMP paradigm of context-free baselines on the study's own "
    "pairs (data/blimp_unigram.parquet)",
    ("uid", "VARCHAR", "paradigm id"),
    ("phenomenon", "VARCHAR", "the paradigm's phenomenon"),
    ("field", "VARCHAR", "the paradigm's field"),
    ("baseline", "VARCHAR", "unigram: each sentence scored by its tokens' add-one-smoothed unigram "
                            "log-probabilities from the training counts"),
    ("accuracy", "DOUBLE", "correct / pairs; a paradigm is frequency-balanced when this lies within "
                           "evaluation.blimp.balanced_range"),
    ("pairs", "BIGINT", "minimal pairs scored"),
    ("correct", "BIGINT", "pairs the baseline gets right (a tie is wrong)"),
    ("source", "VARCHAR", "where the pairs came from"),
    order="uid")

# --- the study database: the tables relora aggregate builds -----------------------------------

BLIMP_REFERENCE = _table(
    "blimp_reference", "published per-paradigm BLiMP accuracies (Warstadt et al. 2020), as "
    "evaluation.blimp.reference says; join by uid",
    ("uid", "VARCHAR", "paradigm id"),
    ("phenomenon", "VARCHAR", "phenomenon as the published summary files it (NULL for human agreement)"),
    ("model", "VARCHAR", "ngram, lstm, txl, gpt2 or human"),
    ("model_label", "VARCHAR", "the model's name in figures (5-gram, LSTM, Transformer-XL, GPT-2, Human agreement)"),
    ("accuracy", "DOUBLE", "published accuracy (human: agreement with the grammatical sentence)"))

STUDY = _table(
    "study", "one row: the study and how this database was built",
    ("study", "VARCHAR", "study name"),
    ("reference_condition", "VARCHAR", "the condition every other is compared with (analysis.reference_condition)"),
    ("confidence", "DOUBLE", "confidence level of every interval (analysis.confidence)"),
    ("final_loss_window", "INTEGER", "steps averaged by train_loss_smoothed (analysis.final_loss_window)"),
    ("config", "VARCHAR", "the resolved study config, JSON"),
    ("blimp_reference", "VARCHAR", "what blimp_reference was read from (published, a folder, or NULL)"),
    ("aggregated_at", "TIMESTAMPTZ", "when this database was built"),
    ("n_runs", "INTEGER", "run directories aggregated"),
    ("relora_version", "VARCHAR", "version of relora that built the database"),
    ("duckdb_version", "VARCHAR", "version of DuckDB that built the database"),
    ("scipy_version", "VARCHAR", "version of SciPy that computed the statistics"),
    ("blimp_baselines", "VARCHAR", "the baseline file read into blimp_baselines (NULL: none)"),
    ("blimp_balanced_low", "DOUBLE", "lower end of the frequency-balanced range"),
    ("blimp_balanced_high", "DOUBLE", "upper end of the frequency-balanced range"),
    ("perplexity_doc_mean", "VARCHAR", "how view final's perplexity_doc_mean averages over domains "
                                       "(evaluation.perplexity.doc_mean): per_domain = mean of the domains' "
                                       "document means; pooled = mean over all documents of all domains"),
    ("ablation_reference", "VARCHAR", "the second condition the others are compared with "
                                      "(analysis.ablation_reference; NULL: none)"))

_FAMILY = ("family", "VARCHAR", "train, perplexity, blimp or dynamics: the table the metric comes from")
_BETTER = ("better", "VARCHAR", "lower or higher: which direction is an improvement (NULL: no direction)")
_METRIC = ("metric", "VARCHAR", "metric name as in view final")

FINAL = _table(
    "final", "every run's last measured step, one row per run and metric: train_loss, "
    "train_loss_smoothed, bits_per_byte, perplexity, perplexity_doc_mean (and /<domain>), blimp, "
    "blimp_balanced, blimp/<phenomenon>, <dynamics metric>/<target>[/<module>]; "
    "train_loss_smoothed_equal_flops and bits_per_byte_equal_flops read at runs.equal_flops_step "
    "(equal training FLOPs within a size; bits per byte interpolated between evaluations); perplexity_doc_mean "
    "over all domains is the mean of the domains' means or, pooled, the mean over all documents "
    "(study.perplexity_doc_mean)",
    *RUN_KEYS, STEP,
    ("metric", "VARCHAR", "metric name; /<domain>, /<phenomenon>, /<target>/<module> narrow it"),
    ("value", "DOUBLE", "the metric at that step (dynamics: mean over layers)"),
    ("n", "BIGINT", "what the value rests on: pairs (blimp), tokens (perplexity), steps (smoothed "
                    "loss), layers (dynamics)"),
    _BETTER, _FAMILY, kind="VIEW")

METRIC_SUMMARY = _table(
    "metric_summary", "each metric of view final over the seeds of a (size, condition): mean and t-interval",
    RUN_KEYS[0], RUN_KEYS[1], _METRIC, _FAMILY, _BETTER,
    ("step", "BIGINT", "the latest step among the seeds"),
    ("n_seeds", "INTEGER", "seeds with the metric"),
    ("mean", "DOUBLE", "mean over seeds"),
    ("std", "DOUBLE", "standard deviation over seeds (NaN with one seed)"),
    ("ci_low", "DOUBLE", "lower end of the Student t-interval of the mean (study.confidence)"),
    ("ci_high", "DOUBLE", "upper end of the Student t-interval of the mean"),
    ("min", "DOUBLE", "smallest value over seeds"),
    ("max", "DOUBLE", "largest value over seeds"))

_GAP_COLUMNS = (
    RUN_KEYS[0], RUN_KEYS[1], _METRIC,
    ("reference", "VARCHAR", "the reference condition subtracted"),
    ("mean_diff", "DOUBLE", "mean over seeds of condition minus reference (positive: the condition's value is higher)"),
    ("ci_low", "DOUBLE", "lower end of the interval of mean_diff (BLiMP: over paradigms)"),
    ("ci_high", "DOUBLE", "upper end of the interval of mean_diff (BLiMP: over paradigms)"),
    ("p_value", "DOUBLE", "two-sided p of the headline test (column test)"),
    ("n_seeds", "INTEGER", "seeds both conditions have"),
    _FAMILY, _BETTER,
    ("condition_mean", "DOUBLE", "mean over the paired seeds of the condition's value"),
    ("reference_mean", "DOUBLE", "mean over the paired seeds of the reference's value"),
    ("rel_diff", "DOUBLE", "mean_diff / reference_mean"),
    ("std_diff", "DOUBLE", "standard deviation over seeds of the differences"),
    ("t_statistic", "DOUBLE", "t statistic of the headline test"),
    ("test", "VARCHAR", "the headline test: paired_t (over seeds) or paired_t_paradigms (BLiMP)"),
    ("n_paradigms", "INTEGER", "paradigms of the BLiMP headline test (NULL otherwise)"),
    ("seed_p_value", "DOUBLE", "BLiMP: p of the paired t-test over seeds, kept beside the headline"),
    ("wilcoxon_p_value", "DOUBLE", "BLiMP: p of the Wilcoxon signed-rank test over paradigms"),
    ("paper_ztest_p_anticonservative", "DOUBLE", "BLiMP: p of the paper's pooled two-proportion z-test; "
                                                 "anti-conservative (treats correlated pairs as independent)"),
    ("seeds", "INTEGER[]", "the paired seeds"),
)
GAP_STATS = _table("gap_stats", "each condition minus the reference condition, paired by seed, per metric "
                   "of view final (read it through view gap)", *_GAP_COLUMNS)
GAP = _table("gap", "each condition minus the reference condition (study.reference_condition), "
             "paired by seed: mean difference, interval and p per metric", *_GAP_COLUMNS, kind="VIEW")

BLIMP_TESTS = _table(
    "blimp_tests", "BLiMP tests of each condition against the reference on every run's last "
    "evaluated step, per seed and pooled over seeds (seed NULL)",
    RUN_KEYS[0], RUN_KEYS[1],
    ("reference", "VARCHAR", "the reference condition"),
    ("seed", "INTEGER", "the seed, or NULL: pooled over the seeds both conditions have"),
    ("step", "BIGINT", "the latest step used"),
    ("metric", "VARCHAR", "blimp, blimp_balanced or blimp/<phenomenon>: the paradigms compared"),
    ("test", "VARCHAR", "paired_t_paradigms, wilcoxon_signed_rank or paper_two_proportion_z_anticonservative"),
    ("statistic", "DOUBLE", "the test statistic (t, W or z)"),
    ("p_value", "DOUBLE", "two-sided p"),
    ("n", "BIGINT", "paradigms (paired tests) or pairs (the paper's z-test)"),
    ("condition_accuracy", "DOUBLE", "the condition's accuracy (mean of paradigms; z-test: pooled)"),
    ("reference_accuracy", "DOUBLE", "the reference's accuracy, the same way"),
    ("diff", "DOUBLE", "condition_accuracy - reference_accuracy"),
    ("ci_low", "DOUBLE", "lower end of the t-interval of the mean per-paradigm difference (paired_t_paradigms)"),
    ("ci_high", "DOUBLE", "upper end of that interval"),
    ("role", "VARCHAR", "headline, check, or paper (anti-conservative)"))

# the `runs` table: fixed columns first; the flattened run config follows (`runs_column_comment`)
RUNS = _table(
    "runs", "one row per run: identity, parameter counts, steps and the resolved run config flattened",
    *RUN_KEYS,
    ("method", "VARCHAR", "full or relora"),
    ("params_total", "BIGINT", "parameters of the model"),
    ("params_trainable", "BIGINT", "parameters the optimizer updates (ReLoRA: adapters, norms, embeddings)"),
    ("study", "VARCHAR", "study name from run.json"),
    ("run_seed", "BIGINT", "the seed the run derived its random streams from"),
    ("device", "VARCHAR", "the device the run trained on"),
    ("last_step", "BIGINT", "the run's last optimizer step (training.steps)"),
    ("n_merges", "BIGINT", "ReLoRA merges in the run"),
    ("flops_per_token", "DOUBLE", "training FLOPs per token of the run's method (ReLoRA: its bound; "
     "relora.model_config, docs/design.md Model FLOPs)"),
    ("full_flops_per_token", "DOUBLE", "training FLOPs per token of the same model trained full-rank"),
    ("tokens_per_step", "BIGINT", "tokens of one update (batch_size x seq_len)"),
    ("train_flops", "DOUBLE", "training FLOPs of the whole run (warm-start updates at the full-rank cost)"),
    ("equal_flops_step", "DOUBLE", "the (fractional) step at which this run had spent the smallest "
     "train_flops among its size's runs: where the *_equal_flops metrics of `final` read it"),
    ("merge_steps", "BIGINT[]", "steps after which ReLoRA merged"),
    ("versions", "VARCHAR", "package versions the run recorded, JSON"),
    ("run_json", "VARCHAR", "the whole run.json, JSON"),
    ("run_dir", "VARCHAR", "the run directory read"),
    ("files", "VARCHAR[]", "which of the run's files were present"))

DATABASE = {t.name: t for t in (RUNS, TRAIN_METRICS, DYNAMICS, PERPLEXITY, BLIMP, BLIMP_REFERENCE,
                                BLIMP_BASELINES, STUDY, FINAL, METRIC_SUMMARY, GAP_STATS, GAP, BLIMP_TESTS)}
EXTRA_COLUMN = "not in the table contract: kept as the run files had it"


def runs_column_comment(name: str, config_key: str | None = None) -> str:
    """The comment of a `runs` column: a fixed column's, or the run config key it flattens."""
    try:
        return RUNS.column(name).comment
    except KeyError:
        pass
    if config_key:
        return f"run config {config_key} (run.json; its meaning: workflow/schemas/config.schema.yaml)"
    if name.startswith("steps_"):
        return f"steps of the run's {name.removeprefix('steps_')} schedule (resolved by relora.config)"
    return EXTRA_COLUMN


# ---------------------------------------------------------------------------------------------
# Parquet


def arrow_type(duckdb_type: str):
    """The Arrow type a Parquet file stores for a DuckDB type of this module."""
    import pyarrow as pa

    if duckdb_type.endswith("[]"):
        return pa.list_(arrow_type(duckdb_type[:-2]))
    return {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64(),
            "BOOLEAN": pa.bool_(), "TIMESTAMPTZ": pa.timestamp("us", tz="UTC")}[duckdb_type]


def write_table(table: Table, rows: list[dict], path: str | os.PathLike) -> Path:
    """Rows (dicts with exactly the table's columns; optional ones may be absent) as Parquet,
    typed as declared, under a temporary name then renamed. A column outside the table, or a
    required one missing, is a ValueError naming both: the contract changes here or nowhere."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .io import atomic_path

    names = set(table.names)
    required = {c.name for c in table.columns if c.required}
    for n, row in enumerate(rows):
        unknown, missing = set(row) - names, required - set(row)
        if unknown or missing:
            raise ValueError(f"{path}: row {n} does not fit table {table.name}: "
                             + "; ".join(s for s in (f"unknown {sorted(unknown)}" if unknown else "",
                                                     f"missing {sorted(missing)}" if missing else "") if s))
    schema = pa.schema([(c.name, arrow_type(c.type)) for c in table.columns])
    data = pa.Table.from_pylist([{c: row.get(c) for c in table.names} for row in rows], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(data, tmp)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# DuckDB comments


def sql_str(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def sql_ident(name: str) -> str:
    """A name as a quoted SQL identifier (an inner `"` doubled), so a name is only ever a name."""
    return '"' + str(name).replace('"', '""') + '"'


def comment_on(con, table: Table, comments: dict[str, str] | None = None) -> None:
    """Write the table's (or view's) comment and one per column into the database; columns the
    declaration lacks take `comments[name]`, else EXTRA_COLUMN."""
    con.execute(f"COMMENT ON {table.kind} {sql_ident(table.name)} IS {sql_str(table.comment)}")
    declared = {c.name: c.comment for c in table.columns}
    present = [r[0] for r in con.execute(f"DESCRIBE {sql_ident(table.name)}").fetchall()]
    for name in present:
        text = declared.get(name) or (comments or {}).get(name) or EXTRA_COLUMN
        con.execute(f"COMMENT ON COLUMN {sql_ident(table.name)}.{sql_ident(name)} IS {sql_str(text)}")


def create_table(con, table: Table) -> None:
    """An empty database table with the declared columns and types."""
    con.execute(f"CREATE TABLE {sql_ident(table.name)} "
                f"({', '.join(f'{sql_ident(c.name)} {c.type}' for c in table.columns)})")


def insert_rows(con, table: Table, rows: list[dict]) -> None:
    """Create `table` in the database and fill it from rows (dicts; absent columns are NULL)."""
    import pyarrow as pa

    create_table(con, table)
    if rows:
        arrow = pa.Table.from_pylist([{c: row.get(c) for c in table.names} for row in rows])  # noqa: F841
        casts = ", ".join(f"CAST({sql_ident(c.name)} AS {c.type})" for c in table.columns)
        con.execute(f"INSERT INTO {sql_ident(table.name)} SELECT {casts} FROM arrow")
