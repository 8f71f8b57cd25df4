"""DuckDB aggregation of run directories: tables, views, statistics, atomic write."""

import math
import shutil

import duckdb
import numpy as np
import pytest
from scipy import stats

import synthetic_runs as syn
from relora import results
from relora.results import aggregate
from relora.tables import DATABASE, RUN_FILES



@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("results") / "synthetic"
    study = syn.write_synthetic_study(root)
    return root, study


@pytest.fixture(scope="module")
def db(study_dir):
    root, study = study_dir
    path = aggregate(root, study, root / "study.duckdb")
    con = duckdb.connect(str(path), read_only=True)
    yield con
    con.close()


def rows(con, sql, *params):
    cursor = con.execute(sql, list(params))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r)) for r in cursor.fetchall()]


def columns(con, table):
    return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]


def test_tables_and_views_follow_the_contract(db):
    tables = {r[0]: r[1] for r in db.execute(
        "SELECT table_name, table_type FROM information_schema.tables").fetchall()}
    for name in ("runs", "train_metrics", "dynamics", "perplexity", "blimp", "blimp_reference",
                 "metric_summary", "gap_stats", "blimp_tests", "study"):
        assert tables[name] == "BASE TABLE", name
    assert tables["final"] == "VIEW" and tables["gap"] == "VIEW"
    for name, table in RUN_FILES.items():
        assert columns(db, name) == table.names, name  # the declared columns, in order
    for name, table in DATABASE.items():
        if name != "runs":  # runs: the declared columns, then the flattened config
            assert columns(db, name) == table.names, name
    assert columns(db, "runs")[:6] == ["size", "condition", "seed", "method", "params_total",
                                       "params_trainable"]
    assert columns(db, "gap")[:9] == ["size", "condition", "metric", "reference", "mean_diff",
                                      "ci_low", "ci_high", "p_value", "n_seeds"]


def test_every_table_view_and_column_of_the_database_is_explained(db):
    """DESCRIBE / duckdb_columns() explain the database: a non-empty comment on every table, view
    and column, the flattened run config's naming its config key."""
    objects = dict(db.execute("SELECT table_name, comment FROM duckdb_tables() WHERE NOT internal "
                              "UNION ALL SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall())
    assert set(objects) == set(DATABASE) and all(c and c.strip() for c in objects.values()), objects
    assert objects["final"] == DATABASE["final"].comment
    comments = {(t, c): comment for t, c, comment in db.execute(
        "SELECT table_name, column_name, comment FROM duckdb_columns() WHERE NOT internal").fetchall()}
    assert {t for t, _ in comments} == set(DATABASE)
    unexplained = [key for key, comment in comments.items() if not (comment and comment.strip())]
    assert unexplained == []
    assert comments[("perplexity", "bits_per_byte")] == DATABASE["perplexity"].column("bits_per_byte").comment
    assert comments[("gap", "p_value")] == DATABASE["gap"].column("p_value").comment
    assert "model.d_model" in comments[("runs", "model_d_model")]
    assert "training.schedule.name" in comments[("runs", "training_schedule_name")]


def test_row_counts_and_keys_from_the_hive_path(db):
    assert db.execute("SELECT count(*) FROM runs").fetchall()[0][0] == 12
    assert db.execute("SELECT count(*) FROM train_metrics").fetchall()[0][0] == 12 * syn.STEPS
    keys = db.execute("SELECT DISTINCT size, condition, seed FROM perplexity ORDER BY ALL").fetchall()
    assert len(keys) == 12 and ("small", "relora-paper", 1) in keys
    run = rows(db, "SELECT * FROM runs WHERE size='tiny' AND condition='relora' AND seed=1")[0]
    assert run["method"] == "relora" and run["method_rank"] == 8
    assert run["merge_steps"] == [101, 201] and run["n_merges"] == 2
    assert run["training_schedule_name"] == "jagged_cosine" and run["last_step"] == syn.STEPS
    assert run["files"] == ["run.json", "train_metrics.parquet", "dynamics.parquet",
                            "perplexity.parquet", "blimp.parquet"]
    merged = db.execute("SELECT step FROM train_metrics WHERE merged AND size='tiny' "
                        "AND condition='relora' AND seed=0 ORDER BY step").fetchall()
    assert [m[0] for m in merged] == [101, 201]


def test_final_view_values(db):
    final = {(r["size"], r["condition"], r["seed"], r["metric"]): r for r in rows(db, "SELECT * FROM final")}
    r = final[("small", "relora", 1, "train_loss")]
    assert r["step"] == syn.STEPS and r["better"] == "lower"
    assert r["value"] == pytest.approx(syn.final_train_loss("small", "relora", 1))
    window = [syn.train_loss("tiny", "full", 0, k) for k in range(syn.STEPS - 9, syn.STEPS + 1)]
    assert final[("tiny", "full", 0, "train_loss_smoothed")]["value"] == pytest.approx(np.mean(window))
    assert final[("tiny", "full", 0, "bits_per_byte/wiki")]["value"] == pytest.approx(
        syn.bits_per_byte("tiny", "full", 0, syn.STEPS, "wiki"))
    pooled = np.mean([syn.bits_per_byte("tiny", "full", 0, syn.STEPS, d) for d in syn.DOMAINS])  # equal bytes
    assert final[("tiny", "full", 0, "bits_per_byte")]["value"] == pytest.approx(pooled)
    accs = [syn.blimp_accuracy("small", "relora-paper", 0, syn.STEPS, i) for i in range(len(syn.PARADIGMS))]
    assert final[("small", "relora-paper", 0, "blimp")]["value"] == pytest.approx(np.mean(accs))
    assert final[("small", "relora-paper", 0, "blimp")]["n"] == syn.PAIRS * len(syn.PARADIGMS)
    assert final[("small", "relora-paper", 0, "blimp/anaphor_agreement")]["value"] == pytest.approx(np.mean(accs[:2]))
    per = [syn.weight_per("tiny", "relora", 0, syn.STEPS, "w_2", layer) for layer in range(syn.N_LAYERS)]
    assert final[("tiny", "relora", 0, "proportional_effective_rank/weight/w_2")]["value"] == pytest.approx(np.mean(per))
    assert ("tiny", "full", 0, "proportional_effective_rank/adapter") not in final
    assert final[("tiny", "relora", 0, "condition_number/adapter")]["value"] == math.inf


def test_equal_flops_metrics_read_full_rank_where_it_spent_relora_s_budget(db):
    """ReLoRA (no warm start) spends its whole run's FLOPs; full-rank is read at the step where it
    had spent the same: STEPS x ReLoRA's FLOPs per token / full-rank's (docs/design.md, Model
    FLOPs), its smoothed loss over the window ending there, its bits per byte interpolated
    between the evaluations at 200 and 300."""
    from relora.model_config import ModelConfig, model_flops_per_token, relora_flops_per_token

    steps = {(r["size"], r["condition"]): r["equal_flops_step"]
             for r in rows(db, "SELECT size, condition, equal_flops_step FROM runs WHERE seed = 0")}
    final = {(r["size"], r["condition"], r["seed"], r["metric"]): r["value"]
             for r in rows(db, "SELECT * FROM final")}
    for size, d in syn.SIZES.items():
        config = ModelConfig(vocab_size=8192, d_model=d, n_layers=syn.N_LAYERS, n_heads=12, n_kv_heads=4,
                             ffn_hidden=4 * d, max_seq_len=128)
        ratio = (relora_flops_per_token(config, 128, 8, syn.MODULES) / model_flops_per_token(config, 128))
        assert 0.5 < ratio < 1
        at = syn.STEPS * ratio
        assert steps[(size, "relora")] == pytest.approx(syn.STEPS)
        assert steps[(size, "full")] == pytest.approx(at)
        for condition in ("relora", "relora-paper"):  # at their last step: the usual final metrics
            for metric in ("train_loss_smoothed", "bits_per_byte"):
                assert final[(size, condition, 1, f"{metric}_equal_flops")] == pytest.approx(
                    final[(size, condition, 1, metric)])
        window = [syn.train_loss(size, "full", 1, k) for k in range(math.floor(at) - 9, math.floor(at) + 1)]
        assert final[(size, "full", 1, "train_loss_smoothed_equal_flops")] == pytest.approx(np.mean(window))
        lo, hi = (np.mean([syn.bits_per_byte(size, "full", 1, k, dom) for dom in syn.DOMAINS]) for k in (200, 300))
        assert final[(size, "full", 1, "bits_per_byte_equal_flops")] == pytest.approx(
            lo + (hi - lo) * (at - 200) / 100)
    assert {r["metric"] for r in rows(db, "SELECT metric FROM gap WHERE metric LIKE '%equal_flops'")} == {
        "train_loss_smoothed_equal_flops", "bits_per_byte_equal_flops"}


def test_step_at_flops_charges_warm_start_steps_at_the_full_rank_cost():
    # 10 warm-start steps of 100 tokens at 6 FLOPs/token, then 4 FLOPs/token
    assert results.step_at_flops(10 * 100 * 6 + 5 * 100 * 4, 100, 4, 6, warm_start_steps=10) == 15
    assert results.step_at_flops(3 * 100 * 6, 100, 4, 6, warm_start_steps=10) == 3
    assert results.step_at_flops(300 * 100 * 4, 100, 4, 6) == 300


def test_summary_is_the_t_interval_over_seeds(db):
    r = rows(db, "SELECT * FROM metric_summary WHERE size='small' AND condition='relora' "
                 "AND metric='train_loss'")[0]
    x = [syn.final_train_loss("small", "relora", s) for s in syn.SEEDS]
    low, high = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert r["n_seeds"] == 2 and r["mean"] == pytest.approx(np.mean(x))
    assert r["std"] == pytest.approx(np.std(x, ddof=1))
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(low), pytest.approx(high))


@pytest.mark.parametrize("size", list(syn.SIZES))
@pytest.mark.parametrize("condition", ["relora", "relora-paper"])
def test_gap_is_a_paired_t_test_against_the_reference(db, size, condition):
    g = rows(db, "SELECT * FROM gap WHERE size=? AND condition=? AND metric='train_loss'", size, condition)[0]
    c = [syn.final_train_loss(size, condition, s) for s in syn.SEEDS]
    f = [syn.final_train_loss(size, "full", s) for s in syn.SEEDS]
    d = np.subtract(c, f)
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert g["reference"] == "full" and g["n_seeds"] == 2 and g["seeds"] == [0, 1]
    assert g["mean_diff"] == pytest.approx(d.mean()) and g["mean_diff"] > 0  # ReLoRA is worse
    assert (g["ci_low"], g["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert g["p_value"] == pytest.approx(stats.ttest_rel(c, f).pvalue)
    assert g["better"] == "lower" and g["test"] == "paired_t"
    blimp = rows(db, "SELECT * FROM gap WHERE size=? AND condition=? AND metric='blimp'", size, condition)[0]
    assert blimp["mean_diff"] < 0 and blimp["better"] == "higher"  # ReLoRA is worse on BLiMP too
    # BLiMP's headline test is over paradigms (seed-averaged accuracies); over seeds kept aside
    acc = {c: [np.mean([syn.blimp_accuracy(size, c, s, syn.STEPS, i) for s in syn.SEEDS])
               for i in range(len(syn.PARADIGMS))] for c in (condition, "full")}
    assert blimp["test"] == "paired_t_paradigms" and blimp["n_paradigms"] == len(syn.PARADIGMS)
    assert blimp["p_value"] == pytest.approx(stats.ttest_rel(acc[condition], acc["full"]).pvalue)
    c = [np.mean([syn.blimp_accuracy(size, condition, s, syn.STEPS, i) for i in range(len(syn.PARADIGMS))])
         for s in syn.SEEDS]
    f = [np.mean([syn.blimp_accuracy(size, "full", s, syn.STEPS, i) for i in range(len(syn.PARADIGMS))])
         for s in syn.SEEDS]
    assert blimp["seed_p_value"] == pytest.approx(stats.ttest_rel(c, f).pvalue)
    assert 0 < blimp["paper_ztest_p_anticonservative"] < 1 and 0 < blimp["wilcoxon_p_value"] < 1


def test_gap_widens_with_size_and_excludes_the_reference(db):
    gap = {(r["size"], r["condition"]): r["mean_diff"] for r in rows(
        db, "SELECT * FROM gap WHERE metric='train_loss'")}
    assert ("tiny", "full") not in gap
    assert gap[("small", "relora-paper")] > gap[("tiny", "relora-paper")]


def test_blimp_tests_match_scipy(db):
    size, condition, seed = "tiny", "relora-paper", 1
    acc_c = [syn.blimp_accuracy(size, condition, seed, syn.STEPS, i) for i in range(len(syn.PARADIGMS))]
    acc_f = [syn.blimp_accuracy(size, "full", seed, syn.STEPS, i) for i in range(len(syn.PARADIGMS))]
    n = syn.PAIRS * len(acc_c)
    x_c, x_f = sum(a * syn.PAIRS for a in acc_c), sum(a * syn.PAIRS for a in acc_f)
    pooled = (x_c + x_f) / (2 * n)
    z = (x_c / n - x_f / n) / math.sqrt(pooled * (1 - pooled) * 2 / n)
    t = {r["test"]: r for r in rows(db, "SELECT * FROM blimp_tests WHERE size=? AND condition=? "
                                        "AND seed=? AND metric='blimp'", size, condition, seed)}
    paper = t["paper_two_proportion_z_anticonservative"]
    assert paper["statistic"] == pytest.approx(z) and paper["role"] == "paper (anti-conservative)"
    assert paper["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)))
    assert paper["n"] == n
    w = stats.wilcoxon(acc_c, acc_f)
    assert t["wilcoxon_signed_rank"]["statistic"] == pytest.approx(w.statistic)
    assert t["wilcoxon_signed_rank"]["p_value"] == pytest.approx(w.pvalue)
    assert t["wilcoxon_signed_rank"]["n"] == len(syn.PARADIGMS)
    paired = stats.ttest_rel(acc_c, acc_f)
    headline = t["paired_t_paradigms"]
    assert headline["role"] == "headline" and headline["n"] == len(syn.PARADIGMS)
    assert (headline["statistic"], headline["p_value"]) == (pytest.approx(paired.statistic),
                                                          pytest.approx(paired.pvalue))
    # pooled over seeds: counts summed, seed NULL; per phenomenon too (no baselines: no balanced)
    pooled_rows = rows(db, "SELECT * FROM blimp_tests WHERE size=? AND condition=? AND seed IS NULL "
                           "AND test='paper_two_proportion_z_anticonservative'", size, condition)
    assert {r["metric"] for r in pooled_rows} == {"blimp", *(f"blimp/{p}" for p in
                                                              {p[1] for p in syn.PARADIGMS})}
    assert next(r for r in pooled_rows if r["metric"] == "blimp")["n"] == n * len(syn.SEEDS)


def test_one_seed_gives_nan_p_and_point_gaps(tmp_path):
    study = syn.write_synthetic_study(tmp_path, seeds=(0,))
    con = duckdb.connect(str(aggregate(tmp_path, study, tmp_path / "s.duckdb")), read_only=True)
    g = rows(con, "SELECT * FROM gap WHERE size='tiny' AND condition='relora' AND metric='train_loss'")[0]
    assert g["n_seeds"] == 1 and math.isnan(g["p_value"]) and math.isnan(g["ci_low"])
    assert g["mean_diff"] == pytest.approx(syn.final_train_loss("tiny", "relora", 0)
                                           - syn.final_train_loss("tiny", "full", 0))
    blimp = rows(con, "SELECT * FROM gap WHERE size='tiny' AND condition='relora' AND metric='blimp'")[0]
    # one seed: no test over seeds, but the paradigms still give the headline BLiMP test
    assert math.isnan(blimp["seed_p_value"]) and 0 < blimp["p_value"] < 1
    assert blimp["ci_low"] < blimp["mean_diff"] < blimp["ci_high"]
    s = rows(con, "SELECT * FROM metric_summary WHERE metric='bits_per_byte' LIMIT 1")[0]
    assert s["n_seeds"] == 1 and math.isnan(s["std"])


def test_missing_files_and_explicit_run_dirs(tmp_path):
    missing = {("tiny", "relora", 0): ["blimp", "perplexity", "dynamics"],
               ("tiny", "full", 0): ["run.json"]}
    study = syn.write_synthetic_study(tmp_path, sizes=("tiny",), conditions=("full", "relora"),
                                      seeds=(0,), missing=missing)
    run_dirs = sorted((tmp_path / "runs").glob("size=*/condition=*/seed=*"))
    con = duckdb.connect(str(aggregate(run_dirs, study, tmp_path / "s.duckdb")), read_only=True)
    assert con.execute("SELECT count(*) FROM blimp WHERE condition='relora'").fetchall()[0][0] == 0
    run = rows(con, "SELECT * FROM runs WHERE condition='full'")[0]
    assert run["method"] == "full" and run["params_total"] is None and run["run_json"] is None
    metrics = {r["metric"] for r in rows(con, "SELECT metric FROM gap")}
    assert "train_loss" in metrics and "blimp" not in metrics and "bits_per_byte" not in metrics


def test_a_run_set_without_some_table_still_has_it(tmp_path):
    missing = {("tiny", "full", 0): ["blimp"]}
    syn.write_synthetic_study(tmp_path, sizes=("tiny",), conditions=("full",), seeds=(0,), missing=missing)
    con = duckdb.connect(str(aggregate(tmp_path, None, tmp_path / "s.duckdb")), read_only=True)
    assert columns(con, "blimp") == RUN_FILES["blimp"].names
    assert con.execute("SELECT count(*) FROM gap").fetchall()[0][0] == 0
    assert rows(con, "SELECT * FROM study")[0]["reference_condition"] == "full"


def test_reference_condition_from_the_study(tmp_path):
    study = syn.write_synthetic_study(tmp_path, sizes=("tiny",), seeds=(0,))
    study["analysis"]["reference_condition"] = "relora"
    con = duckdb.connect(str(aggregate(tmp_path, study, tmp_path / "s.duckdb")), read_only=True)
    conditions = {r["condition"] for r in rows(con, "SELECT * FROM gap WHERE reference='relora'")}
    assert conditions == {"full", "relora-paper"}
    full = rows(con, "SELECT * FROM gap WHERE condition='full' AND metric='train_loss'")[0]
    assert full["mean_diff"] < 0


def test_ablation_reference_adds_paired_comparisons_with_it(tmp_path):
    study = syn.write_synthetic_study(tmp_path)
    study["analysis"]["ablation_reference"] = "relora"
    con = duckdb.connect(str(aggregate(tmp_path, study, tmp_path / "s.duckdb")), read_only=True)
    pairs = {(r["reference"], r["condition"]) for r in rows(con, "SELECT DISTINCT reference, condition FROM gap")}
    # full is the reference of everything; relora of every other condition but full
    assert pairs == {("full", "relora"), ("full", "relora-paper"), ("relora", "relora-paper")}
    g = rows(con, "SELECT * FROM gap WHERE reference='relora' AND size='small' AND metric='train_loss'")[0]
    d = np.subtract([syn.final_train_loss("small", "relora-paper", s) for s in syn.SEEDS],
                    [syn.final_train_loss("small", "relora", s) for s in syn.SEEDS])
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert g["mean_diff"] == pytest.approx(d.mean()) and g["mean_diff"] > 0
    assert (g["ci_low"], g["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    # BLiMP against relora takes its headline test from the paradigms against relora, not full
    blimp = rows(con, "SELECT * FROM gap WHERE reference='relora' AND size='tiny' AND metric='blimp'")[0]
    acc = {c: [np.mean([syn.blimp_accuracy("tiny", c, s, syn.STEPS, i) for s in syn.SEEDS])
               for i in range(len(syn.PARADIGMS))] for c in ("relora-paper", "relora")}
    assert blimp["p_value"] == pytest.approx(stats.ttest_rel(acc["relora-paper"], acc["relora"]).pvalue)
    tests = {(r[0], r[1]) for r in con.execute("SELECT DISTINCT reference, condition FROM blimp_tests").fetchall()}
    assert tests == pairs
    # the main reference's rows come first; the study row records the setting
    assert con.execute("SELECT reference FROM gap LIMIT 1").fetchall()[0][0] == "full"
    assert con.execute("SELECT ablation_reference FROM study").fetchall()[0][0] == "relora"


def test_blimp_reference_is_loaded_from_the_configured_folder(tmp_path, blimp_dir):
    study = syn.write_synthetic_study(tmp_path, sizes=("tiny",), conditions=("full",), seeds=(0,))
    study.setdefault("evaluation", {})["blimp"] = {"reference": str(blimp_dir / "reference")}
    con = duckdb.connect(str(aggregate(tmp_path, study, tmp_path / "s.duckdb")), read_only=True)
    models = {r[0] for r in con.execute("SELECT DISTINCT model FROM blimp_reference").fetchall()}
    assert models == {"ngram", "lstm", "txl", "gpt2", "human"}
    joined = con.execute("SELECT count(DISTINCT b.uid) FROM blimp b JOIN blimp_reference r "
                         "USING (uid) WHERE r.model = 'gpt2'").fetchall()[0][0]
    assert joined == len(syn.PARADIGMS)
    with pytest.raises(results.ResultsError, match="reference"):
        aggregate(tmp_path, study, tmp_path / "t.duckdb", blimp_reference=tmp_path / "nowhere")


def test_published_blimp_reference_table():
    rows = results.published_blimp_reference()
    uids = {}
    for r in rows:
        uids.setdefault(r["model"], set()).add(r["uid"])
        assert 0 <= r["accuracy"] <= 1, r
        assert r["model_label"] == {**results.REFERENCE_MODELS, "human": "Human agreement"}[r["model"]]
    assert set(uids) == {"ngram", "lstm", "txl", "gpt2", "human"}
    released = uids["gpt2"]
    assert len(released) == 67 and all(uids[m] == released for m in results.REFERENCE_MODELS)
    # humans rated BLiMP's 67 paradigms and two more that were not released
    assert released < uids["human"] and len(uids["human"]) == 69
    assert len(rows) == 4 * 67 + 69
    phenomena = {r["phenomenon"] for r in rows if r["model"] != "human"}
    assert len(phenomena) == 12 and None not in phenomena  # as the published summary groups them
    # a published figure, as printed in the BLiMP paper's per-paradigm table
    assert next(r["accuracy"] for r in rows if r["uid"] == "anaphor_gender_agreement"
                and r["model"] == "gpt2") == 0.994


def test_published_blimp_reference_equals_the_authors_files(blimp_dir):
    def key(rows):
        return sorted(tuple(sorted(r.items(), key=lambda item: item[0])) for r in rows)

    assert key(results.published_blimp_reference()) == key(results.load_blimp_reference(blimp_dir / "reference"))


def test_blimp_reference_defaults_to_published_for_blimp_sources(tmp_path, repo):
    from relora.config import blimp_reference, load_study

    assert load_study(repo / "config.yaml")["evaluation"]["blimp"]["reference"] is None  # generated
    for name in ("paper", "ablations"):
        study = load_study(repo / "workflow" / "studies" / f"{name}.yaml")
        assert study["evaluation"]["blimp"]["reference"] == "published", name
    assert blimp_reference({"source": "some/folder"}) == "published"
    assert blimp_reference({"source": "some/folder", "reference": None}) is None
    assert blimp_reference({"source": "generated", "reference": "ref/folder"}) == "ref/folder"

    study = syn.write_synthetic_study(tmp_path, sizes=("tiny",), conditions=("full",), seeds=(0,))
    study.setdefault("evaluation", {})["blimp"] = {"source": "nyu-mll/blimp"}  # reference: auto
    con = duckdb.connect(str(aggregate(tmp_path, study, tmp_path / "s.duckdb")), read_only=True)
    n = con.execute("SELECT count(*) FROM blimp_reference").fetchall()[0][0]
    assert n == len(results.published_blimp_reference())
    joined = con.execute("SELECT count(DISTINCT b.uid) FROM blimp b JOIN blimp_reference r "
                         "USING (uid) WHERE r.model = 'gpt2'").fetchall()[0][0]
    assert joined == len(syn.PARADIGMS)
    assert con.execute("SELECT blimp_reference FROM study").fetchall() == [("published",)]


def test_atomic_write_leaves_no_partial_file(tmp_path):
    study = syn.write_synthetic_study(tmp_path / "r", sizes=("tiny",), conditions=("full", "relora"), seeds=(0,))
    out = tmp_path / "r" / "study.duckdb"
    aggregate(tmp_path / "r", study, out)
    before = out.read_bytes()
    bad = tmp_path / "r" / "runs" / "size=tiny" / "condition=relora" / "seed=0" / "perplexity.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(results.ResultsError, match="perplexity.parquet"):
        aggregate(tmp_path / "r", study, out)
    assert out.read_bytes() == before  # the old database is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["runs", "study.duckdb"]
    out.unlink()
    with pytest.raises(results.ResultsError):
        aggregate(tmp_path / "r", study, out)
    assert not out.exists()


def test_contract_violations_name_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    syn.write_synthetic_study(tmp_path, sizes=("tiny",), conditions=("full",), seeds=(0,))
    path = tmp_path / "runs" / "size=tiny" / "condition=full" / "seed=0" / "train_metrics.parquet"
    pq.write_table(pa.table({"step": [1], "loss": [2.0]}), path)
    with pytest.raises(results.ResultsError, match=r"train_metrics.parquet: missing column\(s\) tokens"):
        aggregate(tmp_path, None, tmp_path / "s.duckdb")
    with pytest.raises(results.ResultsError, match="no run directories"):
        aggregate(tmp_path / "runs" / "size=tiny", None, tmp_path / "s.duckdb")


def test_run_json_must_agree_with_its_directory(tmp_path):
    syn.write_synthetic_study(tmp_path, sizes=("tiny",), conditions=("full",), seeds=(0,))
    src = tmp_path / "runs" / "size=tiny" / "condition=full" / "seed=0"
    shutil.copytree(src, tmp_path / "runs" / "size=tiny" / "condition=full" / "seed=3")
    with pytest.raises(results.ResultsError, match="seed is 0"):
        aggregate(tmp_path, None, tmp_path / "s.duckdb")


# --- BLiMP statistics on a hand-computed case ------------------------------------------------

def _blimp_run(root, condition, accuracies, pairs=100, seed=0):
    """A run directory holding only blimp.parquet: three paradigms at the last step."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = root / "runs" / "size=tiny" / f"condition={condition}" / f"seed={seed}"
    run.mkdir(parents=True)
    uids = ["p0", "p1", "p2"]
    pq.write_table(pa.table({"step": [0] * 3 + [100] * 3, "uid": uids * 2,
                             "phenomenon": ["a", "a", "b"] * 2, "field": ["syntax"] * 6,
                             "pairs": [pairs] * 6, "correct": [round(a * pairs) for a in [0.5] * 3 + list(accuracies)],
                             "accuracy": [0.5] * 3 + list(accuracies),
                             "source": ["generated"] * 6}), run / "blimp.parquet")


def test_blimp_statistics_on_a_hand_computed_case(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _blimp_run(tmp_path, "full", [0.5, 0.5, 0.5])
    _blimp_run(tmp_path, "relora", [0.6, 0.7, 0.8])
    baselines = tmp_path / "blimp_unigram.parquet"
    pq.write_table(pa.table({"uid": ["p0", "p1", "p2"], "phenomenon": ["a", "a", "b"],
                             "baseline": ["unigram"] * 3, "accuracy": [0.5, 0.9, 0.35],
                             "pairs": [100] * 3}), baselines)
    con = duckdb.connect(str(aggregate(tmp_path, None, tmp_path / "s.duckdb", blimp_baselines=baselines)),
                         read_only=True)
    t = {(r["metric"], r["test"]): r for r in rows(con, "SELECT * FROM blimp_tests WHERE seed IS NULL")}
    # per-paradigm differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3;
    # with 2 degrees of freedom the two-sided p is 1 - |t| / sqrt(t^2 + 2) = 1 - sqrt(12 / 14)
    # and the 97.5% quantile is sqrt 2 * 0.95 / sqrt(1 - 0.95^2)
    headline = t[("blimp", "paired_t_paradigms")]
    assert headline["statistic"] == pytest.approx(2 * math.sqrt(3))
    assert headline["p_value"] == pytest.approx(1 - math.sqrt(12 / 14))
    half = math.sqrt(2) * 0.95 / math.sqrt(1 - 0.95 ** 2) * 0.1 / math.sqrt(3)
    assert (headline["ci_low"], headline["ci_high"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert headline["n"] == 3 and headline["diff"] == pytest.approx(0.2)
    # Wilcoxon: three positive differences, W = 0; exact two-sided p = 2 / 2^3
    assert t[("blimp", "wilcoxon_signed_rank")]["statistic"] == 0
    assert t[("blimp", "wilcoxon_signed_rank")]["p_value"] == pytest.approx(0.25)
    # the paper's z-test: 210 / 300 vs 150 / 300 correct, pooled 0.6, se = sqrt(.6 .4 2 / 300) = 0.04
    paper = t[("blimp", "paper_two_proportion_z_anticonservative")]
    assert paper["statistic"] == pytest.approx(5.0) and paper["n"] == 300
    assert paper["p_value"] == pytest.approx(math.erfc(5 / math.sqrt(2)))
    assert paper["p_value"] < 1e-6 < headline["p_value"]  # the anti-conservative one
    # balanced paradigms: the unigram baseline within [0.35, 0.65] (inclusive): p0 and p2
    assert t[("blimp_balanced", "paired_t_paradigms")]["n"] == 2
    final = {(r["condition"], r["metric"]): r for r in rows(con, "SELECT * FROM final")}
    assert final[("relora", "blimp")]["value"] == pytest.approx(0.7)
    assert final[("relora", "blimp_balanced")]["value"] == pytest.approx(0.7)
    assert final[("full", "blimp_balanced")]["n"] == 200
    assert final[("relora", "blimp/a")]["value"] == pytest.approx(0.65)
    gap = {r["metric"]: r for r in rows(con, "SELECT * FROM gap")}
    assert gap["blimp"]["p_value"] == pytest.approx(headline["p_value"])
    assert gap["blimp"]["test"] == "paired_t_paradigms" and gap["blimp"]["n_paradigms"] == 3
    assert gap["blimp"]["paper_ztest_p_anticonservative"] == pytest.approx(paper["p_value"])
    assert gap["blimp"]["wilcoxon_p_value"] == pytest.approx(0.25)
    assert gap["blimp_balanced"]["mean_diff"] == pytest.approx(0.2)
    # one paradigm in phenomenon b: no test over paradigms
    assert math.isnan(gap["blimp/b"]["p_value"])
    base = rows(con, "SELECT * FROM blimp_baselines ORDER BY uid")
    assert [r["accuracy"] for r in base] == [0.5, 0.9, 0.35] and base[0]["baseline"] == "unigram"
    study = rows(con, "SELECT * FROM study")[0]
    assert (study["blimp_balanced_low"], study["blimp_balanced_high"]) == (0.35, 0.65)
    # a narrower configured range keeps only p0
    narrow = {"evaluation": {"blimp": {"balanced_range": [0.4, 0.6]}}}
    con2 = duckdb.connect(str(aggregate(tmp_path, narrow, tmp_path / "n.duckdb", blimp_baselines=baselines)),
                          read_only=True)
    n = con2.execute("SELECT value FROM final WHERE condition='relora' AND metric='blimp_balanced'").fetchall()
    assert n == [(pytest.approx(0.6),)]
    with pytest.raises(results.ResultsError, match="balanced_range"):
        aggregate(tmp_path, {"evaluation": {"blimp": {"balanced_range": [0.7, 0.3]}}}, tmp_path / "x.duckdb")
    pq.write_table(pa.table({"uid": ["p0", "p0"], "baseline": ["unigram"] * 2, "accuracy": [0.5, 0.5],
                             "pairs": [1, 1]}), tmp_path / "dup.parquet")
    with pytest.raises(results.ResultsError, match="appears twice"):
        aggregate(tmp_path, None, tmp_path / "y.duckdb", blimp_baselines=tmp_path / "dup.parquet")


def test_relora_sql_queries_the_database_read_only(db, study_dir, capsys):
    """`relora sql` answers with the install's DuckDB (no CLI needed) and cannot change the file."""
    from relora.cli import main

    path = study_dir[0] / "study.duckdb"
    expected = rows(db, "SELECT count(*) AS n FROM gap WHERE metric = 'bits_per_byte'")[0]["n"]
    assert main(["sql", str(path), "SELECT count(*) AS n FROM gap WHERE metric = 'bits_per_byte'", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", str(expected)]
    assert main(["sql", str(path), "DROP VIEW gap"]) == 3
    assert "read-only" in capsys.readouterr().err
    assert rows(db, "SELECT count(*) AS n FROM gap")[0]["n"] > 0


@pytest.mark.parametrize("doc_mean", ["per_domain", "pooled"])
def test_perplexity_doc_mean_over_domains_per_domain_or_pooled(tmp_path, doc_mean):
    from relora.tables import PERPLEXITY, write_table

    study = syn.write_synthetic_study(tmp_path, sizes=("tiny",), conditions=("full",), seeds=(0,))
    study.setdefault("evaluation", {})["perplexity"] = {"doc_mean": doc_mean}
    run_dir = tmp_path / "runs" / "size=tiny" / "condition=full" / "seed=0"
    keys = {"size": "tiny", "condition": "full", "seed": 0, "step": syn.STEPS, "nll": 1.0, "bytes": 10,
            "perplexity": 2.0, "bits_per_byte": 0.1, "long_documents": "truncate"}
    # one document of perplexity 10 in wiki, three averaging 30 in code
    write_table(PERPLEXITY, [{**keys, "domain": "wiki", "docs": 1, "tokens": 5, "perplexity_doc_mean": 10.0},
                             {**keys, "domain": "code", "docs": 3, "tokens": 15, "perplexity_doc_mean": 30.0}],
                run_dir / "perplexity.parquet")
    con = duckdb.connect(str(aggregate(tmp_path, study, tmp_path / "s.duckdb")), read_only=True)
    final = {r["metric"]: r["value"] for r in rows(con, "SELECT * FROM final WHERE family = 'perplexity'")}
    # per_domain: (10 + 30) / 2; pooled: (1 x 10 + 3 x 30) / 4, the mean over the four documents
    assert final["perplexity_doc_mean"] == pytest.approx(20.0 if doc_mean == "per_domain" else 25.0)
    assert final["perplexity_doc_mean/wiki"] == 10.0 and final["perplexity_doc_mean/code"] == 30.0
    assert rows(con, "SELECT perplexity_doc_mean FROM study")[0]["perplexity_doc_mean"] == doc_mean
    assert {r["long_documents"] for r in rows(con, "SELECT long_documents FROM perplexity")} == {"truncate"}
