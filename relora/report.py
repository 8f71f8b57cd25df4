"""The study report: one self-contained HTML page (relora.results + relora.plots).

`write_report(db, figures_dir, out)` writes `report.html` atomically: the headline final
metrics (mean and t-interval over seeds) and gaps to the reference condition (paired t-test
over seeds; for BLiMP over paradigms, with the Wilcoxon test and the paper's anti-conservative
z-test beside), the unigram frequency baseline of BLiMP, every figure embedded as a PNG data URI (no file
or network access needed to read it; each figure also links to its interactive HTML next to the
PNG), the runs, the study config and the data manifest. No script is loaded from anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

from .io import atomic_write_text
from .data.unigram import BALANCED_RANGE
from .plots import DEFAULT_HEADLINE, METRIC_LABELS

# in every report's <head>: what lets a later `relora report` know the file at --out is its own
GENERATOR = '<meta name="generator" content="relora report">'
CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', 'DejaVu Sans', sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #666; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
tr.ref td { color: #555; background: #fafafa; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
details summary { cursor: pointer; font-weight: 600; margin: 0.6em 0; }
.note { color: #666; font-size: 0.9em; }
nav a { margin-right: 1em; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def format_value(value, digits: int = 4) -> str:
    """A table cell: 4 significant digits, thousands separated, NaN and None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _p(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "<0.001" if value < 1e-3 else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]], left: int = 0, row_classes=None) -> str:
    """An HTML table; cells are already-escaped strings; the first `left` columns align left."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = []
    for n, row in enumerate(rows):
        cls = f' class="{row_classes[n]}"' if row_classes and row_classes[n] else ""
        cells = "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _rows(con, sql: str, *params) -> list[dict]:
    cursor = con.execute(sql, list(params))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r)) for r in cursor.fetchall()]


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _mean_ci(row: dict | None) -> str:
    if not row:
        return "–"
    text = format_value(row["mean"])
    if row["n_seeds"] and row["n_seeds"] >= 2 and row["ci_low"] is not None and not math.isnan(row["ci_low"]):
        text += f' <span class="note">[{format_value(row["ci_low"])}, {format_value(row["ci_high"])}]</span>'
    return text


def _final_section(con, ctx) -> str:
    summary = {(r["size"], r["condition"], r["metric"]): r for r in _rows(
        con, "SELECT * FROM metric_summary")}
    n_seeds = max((r["n_seeds"] for r in summary.values()), default=0)
    metrics = [m for m in ctx["headline"] if any(k[2] == m for k in summary)]
    rows, classes = [], []
    for size in ctx["sizes"]:
        for condition in ctx["conditions"]:
            if not any((size, condition, m) in summary for m in metrics):
                continue
            rows.append([_esc(size), _esc(condition)] + [_mean_ci(summary.get((size, condition, m)))
                                                         for m in metrics])
            classes.append("ref" if condition == ctx["reference"] else "")
    if not rows:
        return "<p>No final metrics (no run produced metrics).</p>"
    interval = (f"mean over seeds [{ctx['confidence']:.0%} t-interval]" if n_seeds >= 2 else
                "n_seeds = 1: single values, no intervals")
    header = ["size", "condition"] + [_esc(_label(m)) for m in metrics]
    return (f'<p class="note">Last step of every run; {interval}. Query: '
            "<code>SELECT * FROM metric_summary</code>.</p>" + _table(header, rows, 2, classes))


def _gap_section(con, ctx) -> str:
    placeholders = ", ".join("?" for _ in ctx["headline"])
    gap = _rows(con, f"SELECT * FROM gap WHERE reference = ? AND metric IN ({placeholders})",
                ctx["reference"], *ctx["headline"])
    if not gap:
        return (f"<p>No gaps: the study has no condition to compare with the reference condition "
                f"'{_esc(ctx['reference'])}'.</p>")
    order = {m: i for i, m in enumerate(ctx["headline"])}
    sizes = {s: i for i, s in enumerate(ctx["sizes"])}
    conditions = {c: i for i, c in enumerate(ctx["conditions"])}
    gap.sort(key=lambda r: (order[r["metric"]], conditions.get(r["condition"], 99), sizes.get(r["size"], 99)))
    rows = []
    for r in gap:
        ci = ("–" if r["ci_low"] is None or math.isnan(r["ci_low"])
              else f"[{format_value(r['ci_low'])}, {format_value(r['ci_high'])}]")
        over = "paradigms" if r["test"] == "paired_t_paradigms" else "seeds"
        rows.append([_esc(_label(r["metric"])), _esc(r["better"] or ""), _esc(r["size"]),
                     _esc(r["condition"]), format_value(r["reference_mean"]), format_value(r["condition_mean"]),
                     format_value(r["mean_diff"]), ci, f"{_p(r['p_value'])} <span class=\"note\">({over})</span>",
                     _p(r["wilcoxon_p_value"]), _p(r["paper_ztest_p_anticonservative"]),
                     format_value(r["n_seeds"])])
    header = ["metric", "better", "size", "condition", f"{_esc(ctx['reference'])} (reference)",
              "condition", "difference", "CI", "p (paired t)", "p (Wilcoxon, paradigms)",
              "p (paper's z-test, anti-conservative)", "n_seeds"]
    n_seeds = max(r["n_seeds"] for r in gap)
    note = ("Condition minus reference, paired by seed; CI: t-interval of the mean difference; "
            "paired t-test over seeds" + (" (n_seeds = 1: no interval, no p)" if n_seeds < 2 else "") +
            ". BLiMP metrics are tested over paradigms instead (the headline BLiMP test: paired "
            "per-paradigm accuracy differences, seed-averaged; CI and p from the paired t-test over "
            "paradigms, also the Wilcoxon signed-rank test); <code>blimp_balanced</code> keeps only "
            "the paradigms a unigram frequency scorer neither solves nor anti-solves. The paper's "
            "two-proportion z-test on all pairs is shown for comparison only: it counts correlated "
            "pairs as independent trials, so its p-values are far too small (anti-conservative). "
            "Query: <code>SELECT * FROM gap</code>, <code>SELECT * FROM blimp_tests</code>.")
    return f'<p class="note">{note}</p>' + _table(header, rows, 4)


def _findings_section(con, ctx) -> str:
    """relora.findings: every finding's table, generated from the database, with its query."""
    from .findings import findings, html

    return html(findings(con), {"reference": ctx["reference"], "confidence": ctx["confidence"]})


def _all_gaps(con) -> str:
    gap = _rows(con, """SELECT * FROM gap WHERE family <> 'dynamics'
                        OR (metric LIKE '%/weight%' AND metric IN (
                            SELECT DISTINCT metric FROM gap WHERE family = 'dynamics'
                            AND metric NOT LIKE '%/%/%'))""")
    if not gap:
        return ""
    rows = [[_esc(r["metric"]), _esc(r["size"]), _esc(r["condition"]), _esc(r["reference"]), format_value(r["mean_diff"]),
             format_value(r["ci_low"]), format_value(r["ci_high"]), _p(r["p_value"]), _esc(r["test"]),
             _p(r["paper_ztest_p_anticonservative"]), format_value(r["n_seeds"])] for r in gap]
    return ("<details><summary>All gaps (every evaluation metric; dynamics averaged over module types)"
            "</summary>" + _table(["metric", "size", "condition", "minus", "difference", "CI low", "CI high",
                                   "p", "test", "p (paper's z-test, anti-conservative)", "n_seeds"],
                                  rows, 4) + "</details>")


def _blimp_baselines_section(con) -> str:
    """The unigram frequency scorer per paradigm: which paradigms frequency alone decides."""
    if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = "
                       "'blimp_baselines'").fetchall()[0][0]:
        return ""
    study = _rows(con, "SELECT * FROM study")
    low, high = BALANCED_RANGE
    if study:
        low = study[0].get("blimp_balanced_low", low)
        high = study[0].get("blimp_balanced_high", high)
    base = _rows(con, "SELECT * FROM blimp_baselines WHERE baseline = 'unigram' ORDER BY accuracy, uid")
    if not base:
        return ""
    outside = [r for r in base if not low <= r["accuracy"] <= high]
    rows = [[_esc(r["uid"]), _esc(r["phenomenon"] or ""), format_value(r["accuracy"]), format_value(r["pairs"])]
            for r in outside]
    return (f'<p class="note">A context-free unigram scorer (each sentence scored by the sum of its '
            f"tokens' log unigram probabilities from the training counts; a tie counts as wrong) lies "
            f"outside [{low:g}, {high:g}] on {len(outside)} of {len(base)} paradigms: on those, word "
            "frequency alone decides most pairs, and <code>blimp_balanced</code> leaves them out. "
            "Query: <code>SELECT * FROM blimp_baselines</code>.</p>"
            + (_table(["paradigm", "phenomenon", "unigram accuracy", "pairs"], rows, 2) if rows else ""))


def _adapter_a_section(con) -> str:
    """Per ReLoRA run: the largest |A| over its initialisation bound at any analysed step, and how
    many entries exceed 3x the bound there (an inconsistent optimizer reset, quirk 4)."""
    rows = _rows(con, """
        WITH per_step AS (
          SELECT size, condition, seed, step,
                 max(value) FILTER (WHERE metric = 'max_abs_over_init_bound') AS max_ratio,
                 sum(value) FILTER (WHERE metric = 'entries_over_3x_bound') AS over_3x,
                 count(*) FILTER (WHERE metric = 'entries_over_3x_bound' AND value > 0) AS adapters_over_3x,
                 count(*) FILTER (WHERE metric = 'entries_over_3x_bound') AS adapters
          FROM dynamics WHERE target = 'adapter_A' GROUP BY ALL)
        SELECT size, condition, seed, arg_max(step, max_ratio) AS step, max(max_ratio) AS max_ratio,
               arg_max(over_3x, max_ratio) AS over_3x, arg_max(adapters_over_3x, max_ratio) AS adapters_over_3x,
               max(adapters) AS adapters, max(over_3x) AS most_over_3x
        FROM per_step GROUP BY ALL ORDER BY size, condition, seed""")
    if not rows:
        return ""
    columns = {r["column_name"] for r in _rows(con, "SELECT column_name FROM (DESCRIBE runs)")}
    masks = {}
    if "method_optimizer_reset_masks" in columns:
        masks = {(r["size"], r["condition"], r["seed"]): r["m"] for r in _rows(
            con, "SELECT size, condition, seed, method_optimizer_reset_masks AS m FROM runs")}
    table = [[_esc(r["size"]), _esc(r["condition"]), _esc(r["seed"]),
              _esc(masks.get((r["size"], r["condition"], r["seed"])) or "–"), format_value(r["max_ratio"]),
              _esc(r["step"]), _esc(format_value(r["over_3x"])), f"{format_value(r['adapters_over_3x'])} of {format_value(r['adapters'])}",
              _esc(format_value(r["most_over_3x"]))] for r in rows]
    header = ["size", "condition", "seed", "reset masks", "largest |A| / bound", "at step",
              "entries &gt; 3x bound there", "adapters with one", "most entries &gt; 3x at a step"]
    note = ("The adapters' factor A starts inside the Kaiming-uniform bound 1/&radic;in_features. "
            "An optimizer reset with independent masks for Adam's two moments (the reference's, quirk 4) "
            "leaves entries with a first moment but no second; right after a merge they move by about "
            "lr&middot;m&#770;/eps, far outside the bound. Query: <code>SELECT * FROM dynamics WHERE "
            "target = 'adapter_A'</code>.")
    return f'<p class="note">{note}</p>' + _table(header, table, 4)


def _runs_section(con) -> str:
    runs = _rows(con, "SELECT * FROM runs")
    if not runs:
        return "<p>No runs.</p>"
    cols = ["size", "condition", "seed", "method", "params_total", "params_trainable", "last_step",
            "n_merges", "device", "files"]
    rows = [[_esc(format_value(r.get(c))) for c in cols] for r in runs]
    return _table(cols, rows, 2)


def _figures_section(figures_dir: Path | None, out: Path) -> tuple[str, list[str]]:
    if figures_dir is None:
        return "<p>No figures.</p>", []
    figures_dir = Path(figures_dir)
    listing = figures_dir / "figures.json"
    if listing.exists():
        figures = json.loads(listing.read_text())
    else:
        figures = [{"name": p.stem, "title": p.stem, "caption": "", "files": {"png": p.name}}
                   for p in sorted(figures_dir.glob("*.png"))]
    parts, names = [], []
    for fig in figures:
        png = figures_dir / fig["files"].get("png", f"{fig['name']}.png")
        if not png.exists():
            continue
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        link = ""
        if "html" in fig["files"]:
            rel = os.path.relpath(figures_dir / fig["files"]["html"], out.parent)
            link = f' <a href="{_esc(rel)}">interactive version</a>'
        parts.append(f'<figure id="fig-{_esc(fig["name"])}"><img alt="{_esc(fig.get("title") or fig["name"])}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{_esc(fig.get("caption", ""))}'
                     f"{link}</figcaption></figure>")
        names.append(fig["name"])
    return ("".join(parts) or "<p>No figures found.</p>"), names


def _manifest_section(manifest: Path | None) -> str:
    if manifest is None:
        return "<p>No data manifest given.</p>"
    manifest = Path(manifest)
    if not manifest.exists():
        return f"<p>Data manifest {_esc(manifest)} not found.</p>"
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        return f"<p>Data manifest {_esc(manifest)} is not valid JSON: {_esc(e)}</p>"
    table = ""
    files = data.get("files") if isinstance(data, dict) else None
    if isinstance(files, dict):
        files = [{"path": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in files.items()]
    if isinstance(files, list) and files and all(isinstance(f, dict) for f in files):
        cols = list(dict.fromkeys(k for f in files for k in f if not isinstance(f[k], (dict, list))))
        table = _table([_esc(c) for c in cols],
                       [[_esc(format_value(f.get(c))) for c in cols] for f in files], len(cols))
    return (f'<p class="note">{_esc(manifest)}</p>{table}<details><summary>manifest.json</summary>'
            f"<pre>{_esc(json.dumps(data, indent=2))}</pre></details>")


def _config_section(con, config: Path | None) -> str:
    if config is not None and Path(config).exists():
        text = Path(config).read_text()
        source = str(config)
    else:
        stored = _rows(con, "SELECT config FROM study")
        if not stored or not stored[0]["config"]:
            return "<p>No study config recorded.</p>"
        import yaml

        text = yaml.safe_dump(json.loads(stored[0]["config"]), sort_keys=False)
        source = "study.duckdb (resolved, defaults filled)"
    return f'<p class="note">{_esc(source)}</p><pre>{_esc(text)}</pre>'


def build_report(db, figures_dir=None, config=None, manifest=None, out=Path("report.html"),
                 title: str | None = None) -> str:
    """The report's HTML text."""
    import duckdb

    db = Path(db)
    if not db.exists():
        raise FileNotFoundError(f"{db}: study database not found (run `relora aggregate` first)")
    con = duckdb.connect(str(db), read_only=True)
    try:
        from .plots import Context

        plot_ctx = Context(con)
        ctx = {"headline": plot_ctx.headline, "sizes": plot_ctx.sizes, "conditions": plot_ctx.conditions,
               "reference": plot_ctx.reference, "confidence": plot_ctx.confidence}
        title = title or (plot_ctx.config.get("report") or {}).get("title") or f"Study '{plot_ctx.study}'"
        study = _rows(con, "SELECT * FROM study")[0] if _rows(con, "SELECT count(*) AS n FROM study")[0]["n"] else {}
        runs = _rows(con, "SELECT count(*) AS n, count(DISTINCT seed) AS seeds FROM runs")[0]
        figures, names = _figures_section(figures_dir, Path(out))
        sections = [
            ("findings", "Findings", _findings_section(con, ctx)),
            ("final", "Final metrics", _final_section(con, ctx)),
            ("gap", f"Gap to '{_esc(ctx['reference'])}'", _gap_section(con, ctx) + _all_gaps(con)),
            ("blimp-baselines", "BLiMP and word frequency", _blimp_baselines_section(con)
             or "<p>No unigram baseline in this study's database.</p>"),
            ("adapter_a", "Adapter entries against their initialisation bound", _adapter_a_section(con)
             or "<p>No adapter factors analysed (no ReLoRA run, or analysis.targets lacks adapter_A).</p>"),
            ("figures", "Figures", figures),
            ("runs", "Runs", _runs_section(con)),
            ("config", "Study config", _config_section(con, config)),
            ("manifest", "Data manifest", _manifest_section(manifest)),
        ]
    finally:
        con.close()
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = (f"{runs['n']} runs: sizes {', '.join(map(_esc, ctx['sizes']))}; conditions "
            f"{', '.join(map(_esc, ctx['conditions']))}; {runs['seeds']} seed(s); reference condition "
            f"'{_esc(ctx['reference'])}'. Aggregated {_esc(str(study.get('aggregated_at', ''))[:16])} UTC, report "
            f"generated {generated}. Everything here is in <code>{_esc(db.name)}</code> "
            "(tables runs, train_metrics, dynamics, perplexity, blimp, blimp_baselines, metric_summary, "
            "blimp_tests; "
            "views final and gap).")
    nav = " ".join(f'<a href="#{key}">{name}</a>' for key, name, _ in sections)
    body = "".join(f'<h2 id="{key}">{name}</h2>{content}' for key, name, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">{GENERATOR}<style>{CSS}</style>'
            f'</head><body><h1>{_esc(title)}</h1><p class="meta">{meta}</p><nav>{nav}</nav>{body}'
            "</body></html>\n")


def write_report(db, figures_dir=None, config=None, manifest=None, out="report.html",
                 title: str | None = None) -> Path:
    """Write the report atomically (temporary file, then rename); return its path."""
    out = Path(out)
    if out.exists() and not (out.is_file() and GENERATOR in out.read_bytes()[:1 << 16].decode("utf-8", "replace")):
        raise ValueError(f"{out}: exists and is not a report written by `relora report`; refusing to "
                         "replace it: move it away or choose another --out")
    text = build_report(db, figures_dir, config, manifest, out, title)
    return atomic_write_text(out, text)  # temporary name, then rename: never a torn report


__all__ = ["DEFAULT_HEADLINE", "build_report", "write_report"]
