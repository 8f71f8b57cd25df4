"""Statistics of a study database: summaries over seeds, gaps to the reference condition, and
the BLiMP tests (`add_statistics` writes the tables `metric_summary`, `gap_stats`, `blimp_tests`
and the view `gap`; relora.tables declares their columns).

Seeds are the replicates of a run: a metric's interval over seeds is the Student t-interval of
its mean, and a condition is compared with the reference condition by the paired t-test over the
seeds both have. BLiMP is tested over paradigms instead (`blimp_test_rows`).
"""

from __future__ import annotations

import math
import warnings

from .data.unigram import BALANCED_RANGE
from .tables import BLIMP_TESTS, GAP, GAP_STATS, METRIC_SUMMARY, insert_rows, sql_str

# blimp_tests.test values: the headline test (paradigms as the units), a rank-based check of it,
# and the paper's test, which treats every pair of every paradigm as an independent trial
PARADIGM_T, WILCOXON, PAPER_Z = ("paired_t_paradigms", "wilcoxon_signed_rank",
                                 "paper_two_proportion_z_anticonservative")
TEST_ROLES = {PARADIGM_T: "headline", WILCOXON: "check", PAPER_Z: "paper (anti-conservative)"}



def paired_with_reference(groups: dict, reference: str):
    """For each (size, condition, what) group of {seed: value} other than the reference's: the
    group, the reference's group of the same size and `what`, and the seeds both have, sorted.
    Every comparison with the reference pairs runs by seed (a seed fixes the data order)."""
    for key, by_seed in groups.items():
        size, condition, what = key
        ref = groups.get((size, reference, what))
        if condition == reference or not ref:
            continue
        seeds = sorted(set(by_seed) & set(ref))
        if seeds:
            yield key, by_seed, ref, seeds

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


def add_statistics(con, reference: str, confidence: float,
                   balanced_range: tuple[float, float] = BALANCED_RANGE,
                   ablation_reference: str | None = None) -> None:
    """From view `final`: `metric_summary` (each metric over the seeds of a size and condition:
    mean and t-interval at `confidence`), `gap_stats` and view `gap` (each condition minus
    `reference`, paired by seed; BLiMP metrics take their interval and p from the test over
    paradigms, the over-seeds p kept as `seed_p_value`) and `blimp_tests` (`blimp_test_rows`).
    With `ablation_reference`, every condition but `reference` is also compared with it, in rows
    whose `reference` column names it."""
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
    insert_rows(con, METRIC_SUMMARY, summary)

    references = [reference] + ([ablation_reference] if ablation_reference not in (None, reference) else [])
    blimp_tests = [row for ref_condition in references
                   for row in blimp_test_rows(con, ref_condition, confidence, balanced_range)
                   if not (ref_condition != reference and row["condition"] == reference)]
    pooled = {(r["size"], r["condition"], r["reference"], r["metric"], r["test"]): r
              for r in blimp_tests if r["seed"] is None}
    gap = []
    compared = [(ref_condition, item) for ref_condition in references
                for item in paired_with_reference(groups, ref_condition)
                if ref_condition == reference or item[0][1] != reference]
    for against, ((size, condition, metric), by_seed, ref, seeds) in compared:
        cond_values = [by_seed[s][0] for s in seeds]
        ref_values = [ref[s][0] for s in seeds]
        diffs = [a - b for a, b in zip(cond_values, ref_values)]
        mean_diff, std_diff, low, high = t_interval(diffs, confidence)
        t_stat, p_value = paired_t(cond_values, ref_values)
        ref_mean = sum(ref_values) / len(ref_values)
        first = by_seed[seeds[0]]
        row = {
            "size": size, "condition": condition, "metric": metric, "reference": against,
            "mean_diff": mean_diff, "ci_low": low, "ci_high": high, "p_value": p_value,
            "n_seeds": len(seeds), "family": first[2], "better": first[3],
            "condition_mean": sum(cond_values) / len(cond_values), "reference_mean": ref_mean,
            "rel_diff": mean_diff / ref_mean if ref_mean not in (0, 0.0) else math.nan,
            "std_diff": std_diff, "t_statistic": t_stat, "test": "paired_t", "seeds": seeds,
        }
        headline = pooled.get((size, condition, against, metric, PARADIGM_T))
        if headline:  # BLiMP: the test over paradigms is the headline; over seeds kept aside
            row.update(ci_low=headline["ci_low"], ci_high=headline["ci_high"],
                       p_value=headline["p_value"], t_statistic=headline["statistic"],
                       test=PARADIGM_T, n_paradigms=headline["n"], seed_p_value=p_value,
                       wilcoxon_p_value=(pooled.get((size, condition, against, metric, WILCOXON))
                                         or {}).get("p_value"),
                       paper_ztest_p_anticonservative=(pooled.get((size, condition, against, metric, PAPER_Z))
                                                       or {}).get("p_value"))
        gap.append(row)
    insert_rows(con, GAP_STATS, gap)
    insert_rows(con, BLIMP_TESTS, blimp_tests)
    con.execute(f"CREATE VIEW gap AS SELECT {', '.join(GAP.names)} FROM gap_stats "
                f"ORDER BY reference <> {sql_str(reference)}, reference, size, condition, family, metric")


def blimp_test_rows(con, reference: str, confidence: float = 0.95,
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
    for (size, condition, src), by_seed, ref, seeds in paired_with_reference(dict(sorted(runs.items())),
                                                                             reference):
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
