"""What a study found: the queries behind the README's Findings and the report's Findings section.

Every table here is one SQL query against the study database (`relora sql DB "QUERY"` runs each
as printed), so a reader can check any number by running the query shown beside it. The queries
name the reference conditions through the `study` table, so they answer for any study; a
condition a query names (the paper comparison names `relora-paper` and `relora`) that the study
does not have leaves its rows out.

What is declared before looking at results (`DECLARED`, printed with the findings) fixes which
comparisons are tests and how they are corrected.

`findings(con)` runs them; `markdown(...)` and `html(...)` render the result.
"""

from __future__ import annotations

import html as html_lib
import math
from dataclasses import dataclass

from .report import format_value

PRIMARY = ("bits_per_byte", "train_loss_smoothed")
SECONDARY = (
    "proportional_effective_rank/base/w_2", "proportional_effective_rank/weight/w_2",
    "condition_number/base/w_2", "condition_number/weight/w_2",
    "blimp", "blimp_balanced",
    "max_abs_over_init_bound/adapter_A",
)
# The paper's 20k-step results (Investigating ReLoRA, arXiv 2509.12960: final loss, w_2 PER of
# the base weights, BLiMP), full-rank against ReLoRA at its two sizes
PAPER = (("tiny", "loss", 4.885, 4.970), ("small", "loss", 3.784, 4.176),
         ("tiny", "w_2 PER", 0.95, 0.87), ("small", "w_2 PER", 0.95, 0.86),
         ("tiny", "BLiMP", 0.650, 0.624), ("small", "BLiMP", 0.701, 0.631))


DECLARED = (
    "Declared before the results: the primary metrics are held-out bits per byte and the smoothed "
    "final training loss, each condition against the reference condition, paired by seed (t-interval "
    "at the study's confidence level, 95% by default, and paired t-test over seeds). The secondary metrics are tested with Holm's "
    "step-down correction over the whole family of their tests, so that the chance of any false "
    "positive among them stays at 5%. Ablations (conditions run at one size, with one or two "
    "seeds) are compared with the ablation reference and read as estimates, not tests.")


def _in(values) -> str:
    return ", ".join(f"'{v}'" for v in values)


# conditions run at every size: the comparison proper (ablations run at one size)
MAIN = """main AS (SELECT condition FROM runs GROUP BY condition
                  HAVING count(DISTINCT size) = (SELECT count(DISTINCT size) FROM runs)),
sizes AS (SELECT size, min(params_total) AS params FROM runs GROUP BY size)"""


@dataclass(frozen=True)
class Finding:
    key: str
    title: str
    text: str
    sql: str


FINDINGS = (
    Finding(
        "primary", "Primary metrics: the gap to the reference at equal steps",
        "Each condition minus the reference condition at the last step, paired by seed: mean "
        "difference (`gap`), its t-interval over seeds and the paired t-test's p. Positive "
        "is worse for both metrics (lower is better).",
        f"""WITH {MAIN}
SELECT metric, size, condition, n_seeds, reference_mean AS reference, condition_mean AS value,
       mean_diff AS gap, ci_low, ci_high, p_value
FROM gap JOIN sizes USING (size)
WHERE reference = (SELECT reference_condition FROM study)
  AND metric IN ({_in(PRIMARY)}) AND condition IN (SELECT condition FROM main)
ORDER BY metric, params, condition"""),
    Finding(
        "equal_flops", "The same gap at equal training FLOPs",
        "ReLoRA's case is efficiency: a ReLoRA update costs fewer FLOPs (no weight gradient of "
        "the frozen matrices), so at equal compute full-rank has trained fewer steps. Here every "
        "run is read where it had spent its size's smallest training budget (`runs.equal_flops_step`: "
        "ReLoRA at its last step, the reference earlier); the smoothed training loss is averaged "
        "over the window ending there, bits per byte interpolated linearly between the evaluations "
        "around it (the loss curve is convex, so this overstates the reference's loss and favours "
        "ReLoRA). The training loss there compares different batches (every condition reads the "
        "same batch at the same step) and moves with their content; held-out bits per byte is "
        "the measure to read.",
        f"""WITH {MAIN},
read_at AS (SELECT size, avg(equal_flops_step) AS reference_step FROM runs
            WHERE condition = (SELECT reference_condition FROM study) GROUP BY size)
SELECT metric, size, condition, round(reference_step, 1) AS reference_step, n_seeds,
       reference_mean AS reference, condition_mean AS value, mean_diff AS gap, ci_low, ci_high, p_value
FROM gap JOIN sizes USING (size) JOIN read_at USING (size)
WHERE reference = (SELECT reference_condition FROM study)
  AND metric IN ({_in(m + '_equal_flops' for m in PRIMARY)}) AND condition IN (SELECT condition FROM main)
ORDER BY metric, params, condition"""),
    Finding(
        "wall_time", "Training speed on the machine that ran the study",
        "Median tokens per second of each condition's updates (all its seeds), and the ratio to "
        "the reference's: what equal wall time would mean on this machine. Jobs shared the CPU "
        "with one another, so these are comparable within the study, not benchmarks.",
        """SELECT size, condition, count(DISTINCT seed) AS runs, median(tokens_per_s) AS tokens_per_s,
       median(tokens_per_s) / (SELECT median(r.tokens_per_s) FROM train_metrics r
                               WHERE r.size = t.size
                                 AND r.condition = (SELECT reference_condition FROM study)) AS vs_reference
FROM train_metrics t JOIN (SELECT size, min(params_total) AS params FROM runs GROUP BY size) USING (size)
GROUP BY size, condition, params ORDER BY params, condition"""),
    Finding(
        "secondary", "Secondary metrics, Holm-corrected",
        "Weight spectra of the last SwiGLU matrix (w_2, the paper's) as the stored `base` weight "
        "(the paper's convention: ReLoRA's frozen W, which changes only at merges) and as the "
        "effective weight (W + scale B A), BLiMP over all and over the frequency-balanced "
        "paradigms (tested over paradigms), and the largest entry of the adapters' A over its "
        "initialisation bound (against the ablation reference, since full-rank has no adapters). "
        "`p_holm`: Holm's step-down adjustment over every test in this table (the family); a "
        "gap is significant at 5% when p_holm < 0.05.",
        f"""WITH {MAIN},
tests AS (
  SELECT metric, size, condition, reference, n_seeds, reference_mean AS reference_value,
         condition_mean AS value, mean_diff AS gap, ci_low, ci_high, test, p_value
  FROM gap
  WHERE metric IN ({_in(SECONDARY)}) AND condition IN (SELECT condition FROM main)
    AND NOT isnan(p_value)
    AND reference = CASE WHEN metric LIKE '%/adapter%' THEN (SELECT ablation_reference FROM study)
                         ELSE (SELECT reference_condition FROM study) END),
ranked AS (SELECT *, row_number() OVER (ORDER BY p_value) AS rank, count(*) OVER () AS family FROM tests)
SELECT metric, size, condition, reference, n_seeds, reference_value, value, gap, ci_low, ci_high,
       test, p_value,
       least(1, max((family - rank + 1) * p_value) OVER (ORDER BY rank ROWS UNBOUNDED PRECEDING)) AS p_holm
FROM ranked JOIN sizes USING (size)
ORDER BY metric, params, condition"""),
    Finding(
        "stability", "Gradient norms and adapter outliers",
        "Per condition over all its runs: the largest gradient norm, the share of updates whose "
        "norm exceeded 1 (where clipping at 1.0 would engage) and, for ReLoRA, the largest entry of "
        "the adapters' A over its initialisation bound at the last step (mean over seeds; a fresh A "
        "is at most 1, an optimizer reset with independent masks, quirk 4, blows entries up).",
        """WITH sizes AS (SELECT size, min(params_total) AS params FROM runs GROUP BY size),
norms AS (SELECT size, condition, count(DISTINCT seed) AS runs, max(grad_norm) AS max_grad_norm,
                 avg((grad_norm > 1)::INTEGER) AS share_over_1
          FROM train_metrics GROUP BY size, condition),
outliers AS (SELECT size, condition, avg(value) AS adapter_a_over_bound FROM final
             WHERE metric = 'max_abs_over_init_bound/adapter_A' GROUP BY size, condition)
SELECT size, condition, runs, max_grad_norm, share_over_1, adapter_a_over_bound
FROM norms LEFT JOIN outliers USING (size, condition) JOIN sizes USING (size)
ORDER BY params, condition"""),
    Finding(
        "blimp_baselines", "BLiMP against the untrained models and word frequency",
        "Mean accuracy over paradigms (and seeds) at the last evaluated step, at step 0 (the "
        "untrained model) and of the unigram frequency scorer; `balanced`: only the paradigms "
        "the frequency scorer neither solves nor anti-solves (study.blimp_balanced_low/high).",
        """WITH balanced AS (SELECT uid FROM blimp_baselines WHERE baseline = 'unigram' AND accuracy
                  BETWEEN (SELECT blimp_balanced_low FROM study) AND (SELECT blimp_balanced_high FROM study)),
last AS (SELECT size, condition, seed, max(step) AS step FROM blimp GROUP BY ALL),
scored AS (
  SELECT size, condition, 'trained' AS model, avg(accuracy) AS all_paradigms,
         avg(accuracy) FILTER (WHERE uid IN (SELECT uid FROM balanced)) AS balanced
  FROM blimp JOIN last USING (size, condition, seed, step) GROUP BY ALL
  UNION ALL
  SELECT size, condition, 'untrained (step 0)', avg(accuracy),
         avg(accuracy) FILTER (WHERE uid IN (SELECT uid FROM balanced))
  FROM blimp WHERE step = 0 GROUP BY ALL
  UNION ALL
  SELECT NULL, NULL, 'unigram frequency', avg(accuracy),
         avg(accuracy) FILTER (WHERE uid IN (SELECT uid FROM balanced))
  FROM blimp_baselines WHERE baseline = 'unigram')
SELECT model, size, condition, all_paradigms, balanced FROM scored
ORDER BY model <> 'trained', model, size DESC, condition"""),
    Finding(
        "ablations", "What each quirk costs and what each recipe change buys",
        "Conditions that change one thing of the ablation reference (`analysis.ablation_reference`), "
        "each minus it, paired by seed (`gap`), beside their gap to the reference condition. "
        "`share_closed`: the part of the ablation reference's own gap to the reference condition "
        "that the change closes (1 = all of it; negative = it widens). With one or two seeds these "
        "are estimates; an interval needs two seeds and is wide with two.",
        f"""WITH base_gap AS (
  SELECT size, metric, mean_diff FROM gap
  WHERE reference = (SELECT reference_condition FROM study)
    AND condition = (SELECT ablation_reference FROM study))
SELECT g.metric, g.size, g.condition, g.n_seeds, f.mean_diff AS gap_to_reference,
       g.mean_diff AS minus_ablation_reference, g.ci_low, g.ci_high, g.p_value,
       -g.mean_diff / b.mean_diff AS share_closed
FROM gap g
LEFT JOIN gap f ON f.size = g.size AND f.condition = g.condition AND f.metric = g.metric
                 AND f.reference = (SELECT reference_condition FROM study)
LEFT JOIN base_gap b ON b.size = g.size AND b.metric = g.metric
WHERE g.reference = (SELECT ablation_reference FROM study) AND g.metric IN ({_in(PRIMARY)})
ORDER BY g.metric, g.size DESC, g.mean_diff"""),
    Finding(
        "paper", "Against the paper",
        "The paper's 20k-step results (final loss, w_2 PER, BLiMP; arXiv 2509.12960) beside "
        "ours. Data, tokenizer, model widths and training length all differ, so only the sign of "
        "each gap and its size relative to the reference's value (`rel_gap`) are comparable. Ours: "
        "smoothed training loss, PER of w_2's stored base weight (what the paper analysed), BLiMP "
        "over all paradigms.",
        """WITH paper(size, metric, paper_full, paper_relora) AS (VALUES
  """ + ",\n  ".join(f"('{s}', '{m}', {f}::DOUBLE, {r}::DOUBLE)" for s, m, f, r in PAPER) + """),
ours AS (
  SELECT size, condition, reference_mean, mean_diff, ci_low, ci_high, n_seeds,
         CASE metric WHEN 'train_loss_smoothed' THEN 'loss'
                     WHEN 'proportional_effective_rank/base/w_2' THEN 'w_2 PER'
                     WHEN 'blimp' THEN 'BLiMP' END AS metric
  FROM gap WHERE reference = (SELECT reference_condition FROM study)
    AND condition IN ('relora-paper', 'relora'))
SELECT p.metric, p.size, paper_relora - paper_full AS paper_gap,
       (paper_relora - paper_full) / paper_full AS paper_rel_gap, o.condition, o.n_seeds,
       o.mean_diff AS our_gap, o.mean_diff / o.reference_mean AS our_rel_gap, o.ci_low, o.ci_high,
       sign(o.mean_diff) = sign(paper_relora - paper_full) AS same_sign,
       o.ci_low > 0 OR o.ci_high < 0 AS our_gap_resolved
FROM paper p JOIN ours o USING (size, metric)
ORDER BY p.metric, p.size DESC, o.condition"""),
)


def findings(con) -> list[tuple[Finding, list[str], list[tuple]]]:
    """Run every finding's query on an open study database: (finding, columns, rows)."""
    out = []
    for finding in FINDINGS:
        cursor = con.execute(finding.sql)
        out.append((finding, [d[0] for d in cursor.description], cursor.fetchall()))
    return out


# ---------------------------------------------------------------------------------------------
# sentences


def _direction(gap: float, low: float, high: float) -> str:
    if any(v is None or math.isnan(v) for v in (low, high)):
        return "higher" if gap > 0 else "lower"
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "not distinguishable from"


def primary_sentences(columns: list[str], rows: list[tuple], reference: str,
                      confidence: float = 0.95) -> list[str]:
    """One sentence per primary comparison, from the `primary` query's rows."""
    out = []
    for row in rows:
        r = dict(zip(columns, row))
        direction = _direction(r["gap"], r["ci_low"], r["ci_high"])
        interval = ("one seed, no interval" if r["ci_low"] is None or math.isnan(r["ci_low"]) else
                    f"{confidence:.0%} CI {format_value(r['ci_low'])} to {format_value(r['ci_high'])}, p = {_p(r['p_value'])}")
        what = {"bits_per_byte": "held-out bits per byte", "train_loss_smoothed": "smoothed final training loss"}
        if direction == "not distinguishable from":
            verdict = f"is not distinguishable from {reference}'s (difference {_signed(r['gap'])}; "
        else:
            verdict = f"is {direction} than {reference}'s by {format_value(abs(r['gap']))} ("
        out.append(f"{r['size']}, {r['condition']}: {what.get(r['metric'], r['metric'])} "
                   f"{format_value(r['value'])} {verdict}{interval}; {r['n_seeds']} seeds).")
    return out


# ---------------------------------------------------------------------------------------------
# rendering


def _signed(value: float) -> str:
    text = format_value(value)
    return text if text.startswith("-") or text == "–" else f"+{text}"


def _p(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2g}"


def _cell(column: str, value) -> str:
    return _p(value) if column.startswith("p_") else format_value(value)


def study_settings(con) -> dict:
    """The reference condition and confidence level the database was built with."""
    reference, confidence = con.execute("SELECT reference_condition, confidence FROM study").fetchall()[0]
    return {"reference": reference, "confidence": confidence}


def markdown(results, settings: dict, heading: str = "###") -> str:
    """The findings as Markdown: per finding its title, what it shows, the query and the table."""
    parts = [DECLARED + "\n"]
    for finding, columns, rows in results:
        parts.append(f"{heading} {finding.title}\n\n{finding.text}\n")
        if finding.key == "primary" and rows:
            sentences = primary_sentences(columns, rows, settings["reference"], settings["confidence"])
            parts.append("\n".join(f"- {s}" for s in sentences) + "\n")
        parts.append(f"<details><summary>query</summary>\n\n```sql\n{finding.sql}\n```\n</details>\n")
        if rows:
            table = [f"| {' | '.join(columns)} |", f"|{'|'.join('---' for _ in columns)}|"]
            table += [f"| {' | '.join(_cell(c, v) for c, v in zip(columns, row))} |" for row in rows]
            parts.append("\n".join(table) + "\n")
        else:
            parts.append("(no rows: the study has none of what this query compares)\n")
    return "\n".join(parts)


def html(results, settings: dict) -> str:
    """The findings as an HTML fragment (the report's Findings section)."""
    esc = html_lib.escape
    parts = [f"<p>{esc(DECLARED)}</p>"]
    for finding, columns, rows in results:
        parts.append(f"<h3>{esc(finding.title)}</h3><p>{esc(finding.text)}</p>")
        if finding.key == "primary" and rows:
            sentences = primary_sentences(columns, rows, settings["reference"], settings["confidence"])
            parts.append("<ul>" + "".join(f"<li>{esc(s)}</li>" for s in sentences) + "</ul>")
        if rows:
            head = "".join(f"<th>{esc(c)}</th>" for c in columns)
            body = "".join("<tr>" + "".join(f"<td>{esc(_cell(c, v))}</td>" for c, v in zip(columns, row))
                           + "</tr>" for row in rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        else:
            parts.append('<p class="note">No rows: the study has none of what this query compares.</p>')
        parts.append(f"<details><summary>Query</summary><pre>{esc(finding.sql)}</pre></details>")
    return "".join(parts)
