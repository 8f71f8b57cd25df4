"""The findings (relora/findings.py): their queries on a synthetic study with known values."""

import re

import duckdb
import numpy as np
import pytest

import synthetic_runs as syn
from relora import findings
from relora.cli import main
from relora.results import aggregate


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("results") / "synthetic"
    study = syn.write_synthetic_study(root)
    study["analysis"]["ablation_reference"] = "relora"
    return aggregate(root, study, root / "study.duckdb")


@pytest.fixture(scope="module")
def results(db_path):
    with duckdb.connect(str(db_path), read_only=True) as con:
        return {f.key: (f, columns, [dict(zip(columns, r)) for r in rows])
                for f, columns, rows in findings.findings(con)}


def holm(p_values):
    """Holm (1979) from its definition: the i-th smallest p times (m - i + 1), made monotone."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def test_holm_reference_on_a_hand_case():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
    assert holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])


def test_secondary_p_holm_is_holm_over_the_family(results):
    _, _, rows = results["secondary"]
    assert len(rows) > 5
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p_value"] for r in rows]))
    assert all(r["p_holm"] >= r["p_value"] for r in rows)
    # spectra and BLiMP against full; the adapters' A against the ablation reference
    assert {(r["metric"].endswith("adapter_A"), r["reference"]) for r in rows} == {
        (False, "full"), (True, "relora")}
    metrics = {r["metric"] for r in rows}
    assert {"proportional_effective_rank/base/w_2", "proportional_effective_rank/weight/w_2", "blimp"} <= metrics


def test_primary_rows_are_the_gap_rows_and_sentences_follow_the_intervals(db_path, results):
    finding, columns, rows = results["primary"]
    with duckdb.connect(str(db_path), read_only=True) as con:
        gap = {(r[0], r[1], r[2]): r[3:] for r in con.execute(
            "SELECT metric, size, condition, mean_diff, ci_low, ci_high, p_value FROM gap "
            "WHERE reference = 'full' AND metric IN ('bits_per_byte', 'train_loss_smoothed')").fetchall()}
    assert {(r["metric"], r["size"], r["condition"]) for r in rows} == set(gap)
    for r in rows:
        assert (r["gap"], r["ci_low"], r["ci_high"], r["p_value"]) == pytest.approx(
            gap[(r["metric"], r["size"], r["condition"])])
    sentences = findings.primary_sentences(columns, [tuple(r.values()) for r in rows], "full")
    for r, sentence in zip(rows, sentences):
        if r["ci_low"] > 0:
            assert "is higher than full's" in sentence
        elif r["ci_high"] < 0:
            assert "is lower than full's" in sentence
        else:
            assert "not distinguishable" in sentence
    # the synthetic study has both outcomes; the interval is named at the study's level
    assert any("higher" in s for s in sentences) and any("not distinguishable" in s for s in sentences)
    assert all("95% CI" in s for s in sentences)
    assert "90% CI" in findings.primary_sentences(columns, [tuple(rows[0].values())], "full", 0.9)[0]


def test_equal_flops_finding_reads_the_reference_earlier(results):
    _, _, rows = results["equal_flops"]
    assert {r["metric"] for r in rows} == {"bits_per_byte_equal_flops", "train_loss_smoothed_equal_flops"}
    assert all(0 < r["reference_step"] < syn.STEPS for r in rows)
    steps = {r["size"]: r["reference_step"] for r in rows}
    assert steps["small"] < steps["tiny"]  # adapters save a larger share of the wider model's FLOPs


def test_paper_comparison_carries_the_published_gaps(results):
    _, _, rows = results["paper"]
    published = {(size, metric): relora - full for size, metric, full, relora in findings.PAPER}
    assert {(r["size"], r["metric"]) for r in rows} == set(published)
    for r in rows:
        assert r["paper_gap"] == pytest.approx(published[(r["size"], r["metric"])])
        assert r["same_sign"] == (np.sign(r["our_gap"]) == np.sign(r["paper_gap"]))


def test_ablations_compare_with_the_ablation_reference(results):
    _, _, rows = results["ablations"]
    r = next(r for r in rows if r["metric"] == "train_loss_smoothed" and r["size"] == "small")
    c = [syn.final_train_loss("small", "relora-paper", s) for s in syn.SEEDS]
    base = [syn.final_train_loss("small", "relora", s) for s in syn.SEEDS]
    full = [syn.final_train_loss("small", "full", s) for s in syn.SEEDS]
    assert r["minus_ablation_reference"] == pytest.approx(np.mean(c) - np.mean(base))
    assert r["gap_to_reference"] == pytest.approx(np.mean(c) - np.mean(full))
    assert r["share_closed"] == pytest.approx(-(np.mean(c) - np.mean(base)) / (np.mean(base) - np.mean(full)))


def test_stability_counts_gradient_norms_over_one(results):
    _, _, rows = results["stability"]
    r = next(r for r in rows if r["size"] == "tiny" and r["condition"] == "full")
    norms = [1.0 + 1.0 / k for k in range(1, syn.STEPS + 1)]  # the synthetic runs' grad_norm
    assert r["runs"] == len(syn.SEEDS) and r["max_grad_norm"] == pytest.approx(max(norms))
    assert r["share_over_1"] == pytest.approx(sum(n > 1 for n in norms) / len(norms))
    assert r["adapter_a_over_bound"] is None  # full-rank has no adapters


def test_blimp_baselines_include_untrained_and_unigram_rows(results):
    _, _, rows = results["blimp_baselines"]
    models = {r["model"] for r in rows}
    assert {"trained", "untrained (step 0)"} <= models
    untrained = next(r for r in rows if r["model"] == "untrained (step 0)")
    assert untrained["all_paradigms"] == pytest.approx(0.5)  # the synthetic models start at chance


def test_cli_prints_each_finding_with_a_query_that_reproduces_its_table(db_path, capsys):
    assert main(["findings", str(db_path)]) == 0
    text = capsys.readouterr().out
    queries = re.findall(r"```sql\n(.*?)\n```", text, flags=re.S)
    assert len(queries) == len(findings.FINDINGS)
    for finding in findings.FINDINGS:
        assert f"### {finding.title}" in text
    # each printed query, run as a user would, gives the rows of its table
    tables = re.split(r"```sql\n.*?\n```", text, flags=re.S)[1:]
    for query, table in zip(queries, tables):
        assert main(["sql", str(db_path), query, "--csv"]) == 0
        csv_rows = capsys.readouterr().out.strip().splitlines()[1:]
        table_rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| metric |")
                      and not line.startswith("| size |") and not line.startswith("| model |")]
        assert len(csv_rows) == len(table_rows)


def test_report_has_the_findings_section(db_path, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", "--db", str(db_path), "--out", str(out)]) == 0
    page = out.read_text()
    assert '<h2 id="findings">Findings</h2>' in page
    for finding in findings.FINDINGS:
        assert finding.title in page
    assert "p_holm" in page and "Holm" in page


def test_findings_of_a_database_from_elsewhere_name_it(tmp_path, capsys):
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE study (x INTEGER)")
    assert main(["findings", str(path)]) == 3
    assert str(path) in capsys.readouterr().err
