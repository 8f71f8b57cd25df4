"""Figures of a study, drawn with Altair from its DuckDB file (relora.results).

`write_figures(db, out_dir)` writes every figure in FIGURES as PNG and SVG (rendered by
vl-convert, no browser) and as interactive HTML whose scripts are inlined (the page works
offline), plus `figures.json` (name, title, caption, files) for the report. A figure whose data
the study lacks (no BLiMP, no dynamics, one condition) is still written, as a short note saying
so, so that the set of files is the same for every study.

Conventions: one colour per condition in every figure (the reference condition first, in dark
grey); sizes ordered by parameter count; runs of several seeds drawn as one thin line per seed.
Long curves are thinned to at most `report.max_points` points per run (mean per bin for losses,
every n-th step for learning rates).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .data.unigram import BALANCED_RANGE
from .tables import PROPORTIONAL_EFFECTIVE_RANK
from .model_config import LINEAR_MODULES, block_linear_shapes

PALETTE = ["#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2",
           "#ff9da6", "#9d755d", "#bab0ac"]
REFERENCE_COLOR = "#333333"
STEP_TITLE = "optimizer step"
DEFAULT_HEADLINE = ["train_loss", "bits_per_byte", "blimp", "blimp_balanced",
                    "proportional_effective_rank/weight/w_2", "condition_number/weight/w_2"]
METRIC_LABELS = {"train_loss": "training loss (nats/token)",
                 "train_loss_smoothed": "training loss, smoothed (nats/token)",
                 "bits_per_byte": "held-out bits per byte", "perplexity": "held-out perplexity",
                 "perplexity_doc_mean": "held-out perplexity (document mean)",
                 "blimp": "BLiMP accuracy", "blimp_balanced": "BLiMP, balanced paradigms",
                 "proportional_effective_rank/weight/w_2": "PER of w_2 weights",
                 "condition_number/weight/w_2": "condition number of w_2 weights"}


class Context:
    """What every figure needs: the connection, orders, colours and settings."""

    def __init__(self, con, settings: dict | None = None):
        self.con = con
        self.datasets: dict[str, list[dict]] = {}
        self.prefix = "relora"  # not Vega-Lite's own data_<n> names
        study = self.one("SELECT * FROM study") if _has(con, "study") else {}
        self.config = json.loads(study["config"]) if study.get("config") else {}
        report = dict(self.config.get("report") or {})
        report.update(settings or {})
        self.max_points = int(report.get("max_points", 600))
        self.headline = list(report.get("headline_metrics") or DEFAULT_HEADLINE)
        self.reference = study.get("reference_condition") or "full"
        self.study = study.get("study") or "study"
        self.confidence = study.get("confidence") or 0.95
        self.sizes = [r["size"] for r in self.rows(
            "SELECT size, min(params_total) AS p FROM runs GROUP BY size ORDER BY p NULLS LAST, size")]
        known = list(self.config.get("conditions") or [])
        present = [r["condition"] for r in self.rows("SELECT DISTINCT condition FROM runs ORDER BY 1")]
        order = [c for c in known if c in present] + [c for c in present if c not in known]
        if self.reference in order:
            order.remove(self.reference)
            order.insert(0, self.reference)
        self.conditions = order
        self.params = {r["size"]: r["p"] for r in self.rows(
            "SELECT size, min(params_total) AS p FROM runs GROUP BY size")}
        # the paradigms a context-free unigram scorer neither solves nor anti-solves
        self.balanced_range = (study.get("blimp_balanced_low", BALANCED_RANGE[0]),
                               study.get("blimp_balanced_high", BALANCED_RANGE[1]))
        self.has_baselines = _has(con, "blimp_baselines") and bool(self.one(
            "SELECT count(*) AS n FROM blimp_baselines WHERE baseline = 'unigram'").get("n"))

    def data(self, rows: list[dict]):
        """A named dataset for a chart; its rows go into the spec's `datasets` in chart_spec
        (inline values would be schema-validated row by row, which takes seconds)."""
        import altair as alt

        name = f"{self.prefix}_rows_{len(self.datasets)}"
        self.datasets[name] = rows
        return alt.NamedData(name=name)

    def rows(self, sql: str, *params) -> list[dict]:
        cursor = self.con.execute(sql, list(params))
        names = [d[0] for d in cursor.description]
        return [{k: _clean(v) for k, v in zip(names, r)} for r in cursor.fetchall()]

    def one(self, sql: str, *params) -> dict:
        found = self.rows(sql, *params)
        return found[0] if found else {}

    def color(self, field: str = "condition", title: str = "condition", legend: bool = True):
        import altair as alt

        # the palette's colours go to the other conditions in order, so that the first two
        # (e.g. relora-paper and relora) get its two most distinct hues, blue and orange
        others = iter(PALETTE * (1 + len(self.conditions) // len(PALETTE)))
        colors = [REFERENCE_COLOR if c == self.reference else next(others) for c in self.conditions]
        return alt.Color(f"{field}:N", title=title, legend=alt.Undefined if legend else None,
                         scale=alt.Scale(domain=self.conditions, range=colors))

    def size_label(self, size: str) -> str:
        p = self.params.get(size)
        return f"{size} ({p / 1e6:.1f}M)" if p else size

    def size_labels(self) -> list[str]:
        return [self.size_label(s) for s in self.sizes]

    def bin_width(self, table: str) -> int:
        last = self.one(f"SELECT max(step) AS m FROM {table}").get("m") or 0
        return max(1, math.ceil(last / self.max_points))


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN / inf; Vega-Lite drops nulls
    return v


def _has(con, table: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                            [table]).fetchall()[0][0])


def _note(title: str, message: str):
    import altair as alt

    return alt.Chart(alt.Data(values=[{"text": message}])).mark_text(
        fontSize=13, align="left", x=5, y=20).encode(text="text:N").properties(
        title=title, width=520, height=40)


def _step(title: str = STEP_TITLE):
    import altair as alt

    return alt.X("step:Q", title=title, axis=alt.Axis(format="~s"))


def _seed_detail():
    import altair as alt

    return alt.Detail("seed:N")


def _tooltip(*fields):
    return list(fields)


# ---------------------------------------------------------------------------------------------
# figures


def train_loss(ctx: Context):
    import altair as alt

    title = "Training loss"
    b = ctx.bin_width("train_metrics")
    data = ctx.rows(f"""
        SELECT 'loss' AS kind, size, condition, seed, avg(step) AS step, avg(loss) AS loss
        FROM train_metrics WHERE loss IS NOT NULL GROUP BY size, condition, seed, (step - 1) // {b}
        UNION ALL
        SELECT DISTINCT 'merge', size, condition, NULL, step, NULL FROM train_metrics WHERE merged
        ORDER BY kind, size, condition, seed, step""")
    if not any(r["kind"] == "loss" for r in data):
        return _note(title, "no training metrics in this study")
    for r in data:
        r["size"] = ctx.size_label(r["size"])
    last = max(r["step"] for r in data)
    half = last / 2
    zoom_losses = [r["loss"] for r in data if r["kind"] == "loss" and r["step"] >= half and r["loss"] is not None]
    lo, hi = min(zoom_losses), max(zoom_losses)
    pad = 0.05 * (hi - lo or 1.0)

    named = ctx.data(data)  # one dataset shared by both panels

    def panel(subtitle, rows, domain=None, height=220):
        x = alt.X("step:Q", title=STEP_TITLE, axis=alt.Axis(format="~s"),
                  scale=alt.Scale(domain=[rows[0], last]) if rows else alt.Undefined)
        y_scale = alt.Scale(domain=domain, clamp=True, nice=False) if domain else alt.Scale(zero=False)
        line = alt.Chart().transform_filter(alt.datum.kind == "loss").mark_line(strokeWidth=1.2).encode(
            x=x, y=alt.Y("loss:Q", title="training loss (nats/token)", scale=y_scale),
            color=ctx.color(), detail=_seed_detail(),
            tooltip=["condition:N", "seed:N", alt.Tooltip("step:Q", format=".0f"), alt.Tooltip("loss:Q", format=".4f")])
        rules = alt.Chart().transform_filter(alt.datum.kind == "merge").mark_rule(
            strokeDash=[4, 3], strokeWidth=0.8).encode(
            x=x, color=ctx.color(), tooltip=["condition:N", alt.Tooltip("step:Q", title="merge after update")])
        if rows:
            line = line.transform_filter(alt.datum.step >= rows[0])
            rules = rules.transform_filter(alt.datum.step >= rows[0])
        return alt.layer(line, rules, data=named).properties(
            width=300, height=height).facet(
            column=alt.Column("size:N", title=None, sort=ctx.size_labels()),
            title=subtitle)

    full = panel("whole run", [])
    zoom = panel(f"second half (steps {half:.0f} to {last:.0f})", [half], [lo - pad, hi + pad])
    n = len(data)
    caption = (f"mean per bin of {b} steps" if b > 1 else "every step") + \
        "; dashed rules: merge-and-reinit steps of ReLoRA conditions; one line per seed"
    return alt.vconcat(full, zoom).properties(
        title=alt.Title(title, subtitle=caption)) if n else _note(title, "no data")


def learning_rate(ctx: Context):
    import altair as alt

    title = "Learning-rate schedules"
    b = ctx.bin_width("train_metrics")
    first = ctx.one("""SELECT t.size, t.seed FROM train_metrics t
                       ORDER BY t.seed, t.size LIMIT 1""")
    if not first:
        return _note(title, "no training metrics in this study")
    size, seed = ctx.sizes[0] if ctx.sizes else first["size"], first["seed"]
    data = ctx.rows(f"""
        SELECT 'lr' AS kind, condition, step, lr FROM train_metrics
        WHERE size = ? AND seed = ? AND (step % {b} = 0 OR step = 1 OR merged
              OR (step - 1) % {b} = 0)
        UNION ALL
        SELECT DISTINCT 'merge', condition, step, NULL FROM train_metrics
        WHERE size = ? AND seed = ? AND merged ORDER BY kind, condition, step""", size, seed, size, seed)
    line = alt.Chart().transform_filter(alt.datum.kind == "lr").mark_line(strokeWidth=1.3).encode(
        x=_step(), y=alt.Y("lr:Q", title="learning rate", axis=alt.Axis(format="~e")),
        color=ctx.color(), tooltip=["condition:N", "step:Q", alt.Tooltip("lr:Q", format=".3e")])
    rules = alt.Chart().transform_filter(alt.datum.kind == "merge").mark_rule(
        strokeDash=[4, 3], strokeWidth=0.8).encode(x=_step(), color=ctx.color())
    chart = alt.layer(line, rules, data=ctx.data(data)).properties(width=620, height=180)
    chart = chart.facet(row=alt.Row("condition:N", title=None, sort=ctx.conditions,
                                    header=alt.Header(labelAngle=0, labelAlign="left")))
    return chart.resolve_scale(y="independent").properties(title=alt.Title(
        title, subtitle=f"learning rate of each update (size {size}, seed {seed}); "
                        "dashed rules: merge-and-reinit steps"))


def heldout_bpb(ctx: Context):
    import altair as alt

    title = "Held-out bits per byte"
    data = ctx.rows("""
        SELECT size, condition, seed, step, domain, bits_per_byte FROM perplexity
        UNION ALL
        SELECT size, condition, seed, step, 'all domains', sum(nll) / (ln(2) * sum("bytes"))
        FROM perplexity GROUP BY size, condition, seed, step
        ORDER BY size, condition, seed, domain, step""")
    if not data:
        return _note(title, "no held-out evaluation in this study")
    for r in data:
        r["size"] = ctx.size_label(r["size"])
    domains = ["all domains"] + sorted({r["domain"] for r in data} - {"all domains"})
    base = alt.Chart().encode(
        x=_step(), y=alt.Y("bits_per_byte:Q", title="bits per byte", scale=alt.Scale(type="log", nice=False, padding=6)),
        color=ctx.color(), detail=_seed_detail(),
        tooltip=["condition:N", "seed:N", "domain:N", "step:Q", alt.Tooltip("bits_per_byte:Q", format=".4f")])
    chart = alt.layer(base.mark_line(strokeWidth=1.2), base.mark_point(size=18, filled=True, opacity=1),
                      data=ctx.data(data)).properties(width=200, height=160)
    return chart.facet(column=alt.Column("domain:N", title="evaluation domain", sort=domains),
                       row=alt.Row("size:N", title=None, sort=ctx.size_labels())).resolve_scale(
        y="independent").properties(title=alt.Title(
            title, subtitle="lower is better; log scale; 'all domains' pools the bytes of every "
                            "domain; one line per seed"))


ALL_PARADIGMS, BALANCED_PARADIGMS = "all paradigms", "frequency-balanced paradigms"


def _paradigm_sets(ctx: Context) -> str:
    """SQL of (panel, uid): every paradigm the study evaluated, and the frequency-balanced ones
    (unigram baseline accuracy within the study's balanced range) when baselines exist."""
    sql = f"SELECT DISTINCT '{ALL_PARADIGMS}' AS panel, uid FROM blimp"
    if ctx.has_baselines:
        low, high = (float(v) for v in ctx.balanced_range)
        sql += (f" UNION ALL SELECT '{BALANCED_PARADIGMS}', uid FROM blimp_baselines "
                f"WHERE baseline = 'unigram' AND accuracy BETWEEN {low!r} AND {high!r}")
    return sql


def _reference_overall(ctx: Context) -> list[dict]:
    """Published accuracies averaged over the paradigms each size's runs evaluated (by UID), for
    every paradigm set of the study."""
    return ctx.rows(f"""
        WITH sets AS ({_paradigm_sets(ctx)}),
        evaluated AS (SELECT DISTINCT b.size, s.panel, b.uid FROM blimp b JOIN sets s USING (uid))
        SELECT e.size, e.panel, r.model_label AS model, avg(r.accuracy) AS accuracy, count(*) AS paradigms
        FROM evaluated e JOIN blimp_reference r USING (uid)
        GROUP BY e.size, e.panel, r.model_label ORDER BY e.size, e.panel, accuracy""")


def _baselines_overall(ctx: Context) -> list[dict]:
    """The unigram scorer and the untrained models (step 0, mean over runs) over the same
    paradigms as the curves, per size and paradigm set."""
    rows = ctx.rows(f"""
        WITH sets AS ({_paradigm_sets(ctx)}),
        evaluated AS (SELECT DISTINCT b.size, s.panel, b.uid FROM blimp b JOIN sets s USING (uid)),
        step0 AS (SELECT b.size, s.panel, b.condition, b.seed, avg(b.accuracy) AS accuracy
                  FROM blimp b JOIN sets s USING (uid) WHERE b.step = 0 GROUP BY ALL)
        SELECT size, panel, 'untrained (step 0)' AS model, avg(accuracy) AS accuracy, count(*) AS runs
        FROM step0 GROUP BY size, panel""")
    if ctx.has_baselines:
        rows += ctx.rows("""
            WITH sets AS (""" + _paradigm_sets(ctx) + """),
            evaluated AS (SELECT DISTINCT b.size, s.panel, b.uid FROM blimp b JOIN sets s USING (uid))
            SELECT e.size, e.panel, 'unigram' AS model, avg(u.accuracy) AS accuracy, NULL AS runs
            FROM evaluated e JOIN blimp_baselines u ON u.uid = e.uid AND u.baseline = 'unigram'
            GROUP BY e.size, e.panel""")
    return rows


def blimp_overall(ctx: Context):
    import altair as alt

    title = "BLiMP accuracy"
    data = ctx.rows(f"""
        WITH sets AS ({_paradigm_sets(ctx)})
        SELECT 'run' AS kind, b.size, s.panel, b.condition, b.seed, b.step, avg(b.accuracy) AS accuracy,
               count(*) AS paradigms, NULL AS model
        FROM blimp b JOIN sets s USING (uid) GROUP BY ALL ORDER BY size, panel, condition, seed, step""")
    if not data:
        return _note(title, "no BLiMP evaluation in this study")
    panels = [p for p in (ALL_PARADIGMS, BALANCED_PARADIGMS) if any(r["panel"] == p for r in data)]
    refs = _reference_overall(ctx)
    data += [{"kind": "reference", "size": r["size"], "panel": r["panel"], "model": r["model"],
              "accuracy": r["accuracy"]} for r in refs]
    data += [{"kind": "baseline", "size": r["size"], "panel": r["panel"], "model": r["model"],
              "accuracy": r["accuracy"]} for r in _baselines_overall(ctx)]
    data += [{"kind": "chance", "size": s, "panel": p, "model": "chance", "accuracy": 0.5}
             for s in ctx.sizes for p in panels]
    for r in data:
        r["size"] = ctx.size_label(r["size"])
        if r["kind"] == "run":
            r["panel_label"] = f"{r['panel']} ({r['paradigms']})"
    base = alt.Chart().transform_filter(alt.datum.kind == "run").encode(
        x=_step(), y=alt.Y("accuracy:Q", title="accuracy (mean over paradigms)",
                           scale=alt.Scale(zero=False), axis=alt.Axis(format="%")),
        color=ctx.color(), detail=_seed_detail(),
        tooltip=["condition:N", "seed:N", "step:Q", "paradigms:Q", alt.Tooltip("accuracy:Q", format=".3f")])
    ref = alt.Chart().transform_filter((alt.datum.kind == "reference") | (alt.datum.kind == "chance"))
    baseline = alt.Chart().transform_filter(alt.datum.kind == "baseline")
    tip = ["model:N", alt.Tooltip("accuracy:Q", format=".3f")]
    layers = [base.mark_line(), base.mark_point(size=18, filled=True, opacity=1),
              ref.mark_rule(strokeDash=[2, 2], color="#888888").encode(y="accuracy:Q", tooltip=tip),
              ref.mark_text(align="right", dx=-2, dy=-5, fontSize=10, color="#555555").encode(
                  y="accuracy:Q", x=alt.value(298), text="model:N"),
              # the context-free unigram scorer and the untrained models: what is not learnt grammar
              baseline.mark_rule(strokeDash=[6, 3], strokeWidth=1.5, color="#8c564b").encode(
                  y="accuracy:Q", tooltip=tip),
              # labels at two places: the two levels are often close
              baseline.transform_filter(alt.datum.model == "unigram").mark_text(
                  align="left", dy=-5, fontSize=10, color="#8c564b").encode(
                  y="accuracy:Q", text="model:N", x=alt.value(2)),
              baseline.transform_filter(alt.datum.model != "unigram").mark_text(
                  align="left", dy=10, fontSize=10, color="#8c564b").encode(
                  y="accuracy:Q", text="model:N", x=alt.value(90))]
    chart = alt.layer(*layers, data=ctx.data(data)).properties(width=300, height=220)
    subtitle = ["higher is better; mean over paradigms, one line per seed; brown dashed: the unigram "
                "frequency scorer and the untrained models (step 0) on the same paradigms",
                "dotted: chance" + (" and published models / human agreement on the same paradigms "
                                    "(joined by UID; Warstadt et al. 2020)" if refs else "")]
    if len(panels) > 1:
        low, high = ctx.balanced_range
        subtitle.append(f"bottom row: only the paradigms on which the unigram scorer's accuracy is "
                        f"within [{low:g}, {high:g}] (frequency neither solves nor anti-solves them)")
    return chart.facet(column=alt.Column("size:N", title=None, sort=ctx.size_labels()),
                       row=alt.Row("panel:N", title=None, sort=panels,
                                   header=alt.Header(labelAngle=0, labelAlign="left"))).properties(
        title=alt.Title(title, subtitle=subtitle))


def blimp_paradigms(ctx: Context):
    """Every paradigm: the models' last-step accuracy beside the unigram scorer's and the
    untrained models', ordered by the unigram scorer's accuracy."""
    import altair as alt

    title = "BLiMP accuracy per paradigm vs a unigram frequency scorer"
    data = ctx.rows("""
        WITH last AS (SELECT size, condition, seed, max(step) AS step FROM blimp GROUP BY ALL)
        SELECT 'run' AS kind, size, condition AS who, uid, avg(accuracy) AS accuracy, count(*) AS n
        FROM blimp JOIN last USING (size, condition, seed, step) GROUP BY ALL
        UNION ALL
        SELECT 'untrained', size, 'untrained (step 0)', uid, avg(accuracy), count(*)
        FROM blimp WHERE step = 0 GROUP BY ALL""")
    if not data:
        return _note(title, "no BLiMP evaluation in this study")
    if not ctx.has_baselines:
        return _note(title, "no unigram baseline in this study's database (aggregate with "
                            "--blimp-baselines DATA/blimp_unigram.parquet)")
    unigram = {r["uid"]: r["accuracy"] for r in ctx.rows(
        "SELECT uid, accuracy FROM blimp_baselines WHERE baseline = 'unigram'")}
    sizes = sorted({r["size"] for r in data})
    data += [{"kind": "unigram", "size": s, "who": "unigram", "uid": uid, "accuracy": a}
             for s in sizes for uid, a in unigram.items()
             if any(r["uid"] == uid and r["size"] == s for r in data)]
    low, high = ctx.balanced_range
    data += [{"kind": "band", "size": s, "lo": low, "hi": high} for s in sizes]
    for r in data:
        r["size"] = ctx.size_label(r["size"])
    uids = sorted({r["uid"] for r in data if r.get("uid")}, key=lambda u: (unigram.get(u, 2), u))
    y = alt.Y("uid:N", title=None, sort=uids, axis=alt.Axis(labelFontSize=9, labelLimit=260))
    x = alt.X("accuracy:Q", title="accuracy", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"))
    tip = ["who:N", "uid:N", alt.Tooltip("accuracy:Q", format=".3f")]
    layers = [
        alt.Chart().transform_filter(alt.datum.kind == "band").mark_rect(color="#eeeeee").encode(
            x=alt.X("lo:Q", scale=alt.Scale(domain=[0, 1])), x2="hi:Q"),
        alt.Chart().mark_rule(strokeDash=[2, 2], color="#888888").encode(x=alt.datum(0.5)),
        alt.Chart().transform_filter(alt.datum.kind == "run").mark_point(
            size=30, filled=True, opacity=0.9).encode(x=x, y=y, color=ctx.color("who"), tooltip=tip),
        alt.Chart().transform_filter(alt.datum.kind == "untrained").mark_point(
            shape="circle", size=40, color="#888888", filled=False).encode(x=x, y=y, tooltip=tip),
        # on top: where the models sit exactly on the unigram scorer, the cross stays visible
        alt.Chart().transform_filter(alt.datum.kind == "unigram").mark_point(
            shape="cross", size=60, color="#8c564b", filled=True, opacity=0.8).encode(x=x, y=y, tooltip=tip),
    ]
    chart = alt.layer(*layers, data=ctx.data(data)).properties(width=300, height=max(120, 13 * len(uids)))
    outside = sum(1 for u in uids if not low <= unigram.get(u, 0.5) <= high)
    return chart.facet(column=alt.Column("size:N", title=None, sort=ctx.size_labels())).properties(
        title=alt.Title(title, subtitle=[
            "dots: each condition at its last evaluated step (mean over seeds); brown cross: the unigram "
            "scorer (sum of token log-frequencies, a tie counted wrong); open circle: the untrained models (step 0)",
            f"grey band: frequency-balanced [{low:g}, {high:g}]; {outside} of {len(uids)} paradigms lie "
            "outside it (frequency solves or anti-solves them); paradigms ordered by the unigram accuracy"]))


def blimp_phenomena(ctx: Context):
    import altair as alt

    title = "BLiMP accuracy per phenomenon (last evaluated step)"
    data = ctx.rows("""
        WITH last AS (SELECT size, condition, seed, max(step) AS step FROM blimp GROUP BY ALL),
        per_seed AS (SELECT size, condition, seed, phenomenon, avg(accuracy) AS accuracy
                     FROM blimp JOIN last USING (size, condition, seed, step) GROUP BY ALL)
        SELECT 'run' AS kind, size, condition, phenomenon, avg(accuracy) AS accuracy,
               min(accuracy) AS lo, max(accuracy) AS hi, count(*) AS n_seeds, NULL AS model
        FROM per_seed GROUP BY size, condition, phenomenon""")
    if not data:
        return _note(title, "no BLiMP evaluation in this study")
    refs = ctx.rows("""
        WITH ours AS (SELECT DISTINCT size, uid, phenomenon FROM blimp)
        SELECT 'reference' AS kind, o.size, NULL AS condition, o.phenomenon, r.model_label AS model,
               avg(r.accuracy) AS accuracy
        FROM ours o JOIN blimp_reference r USING (uid) GROUP BY ALL""")
    data += refs
    for r in data:
        r["size"] = ctx.size_label(r["size"])
    phenomena = sorted({r["phenomenon"] for r in data})
    y = alt.Y("phenomenon:N", title=None, sort=phenomena)
    bars = alt.Chart().transform_filter(alt.datum.kind == "run").mark_bar(height={"band": 0.8}).encode(
        x=alt.X("accuracy:Q", title="accuracy (mean over paradigms)", scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(format="%")),
        y=y, yOffset=alt.YOffset("condition:N", sort=ctx.conditions), color=ctx.color(),
        tooltip=["condition:N", "phenomenon:N", alt.Tooltip("accuracy:Q", format=".3f"), "n_seeds:Q"])
    spread = alt.Chart().transform_filter(alt.datum.kind == "run").mark_rule(color="black").encode(
        x="lo:Q", x2="hi:Q", y=y, yOffset=alt.YOffset("condition:N", sort=ctx.conditions))
    layers = [bars, spread]
    if refs:
        layers.append(alt.Chart().transform_filter(alt.datum.kind == "reference").mark_point(
            filled=False, color="black", size=40).encode(
            x="accuracy:Q", y=y, shape=alt.Shape("model:N", title="published (by UID)"),
            tooltip=["model:N", "phenomenon:N", alt.Tooltip("accuracy:Q", format=".3f")]))
    chance = alt.Chart().mark_rule(strokeDash=[2, 2], color="#888888").encode(x=alt.datum(0.5))
    layers.append(chance)
    chart = alt.layer(*layers, data=ctx.data(data)).properties(width=260)
    return chart.facet(column=alt.Column("size:N", title=None, sort=ctx.size_labels())).resolve_scale(
        shape="shared").properties(title=alt.Title(
            title, subtitle="bars: mean over seeds (black line: range over seeds); phenomena as in "
                            "the evaluated data; dotted: chance" +
                            ("; open symbols: published accuracies on the same paradigms" if refs else "")))


def _adapter_caps(ctx: Context) -> list[dict]:
    """rank r / min(out, in) per (size, ReLoRA condition, module type): the largest PER an
    adapter scale·BA can reach."""
    needed = {"method_rank", "model_d_model", "model_n_heads", "model_n_kv_heads", "model_ffn_hidden"}
    if not needed <= {r["column_name"] for r in ctx.rows("SELECT column_name FROM (DESCRIBE runs)")}:
        return []
    caps = []
    for r in ctx.rows("""SELECT DISTINCT size, condition, method_rank AS r, model_d_model AS d,
                                model_n_heads AS h, model_n_kv_heads AS kv, model_ffn_hidden AS f
                         FROM runs WHERE method = 'relora' AND method_rank IS NOT NULL"""):
        d = r["d"]
        kv = r["kv"] * d // r["h"] if r["h"] and r["kv"] else d
        ffn = r["f"] or 4 * d
        dims = {m: min(shape) for m, shape in block_linear_shapes(d, kv, ffn).items()}
        caps += [{"kind": "cap", "size": r["size"], "condition": r["condition"], "module": m,
                  "value": min(1.0, r["r"] / k)} for m, k in dims.items()]
    return caps


def _dynamics(ctx: Context, title: str, metric: str, target: str, y_title: str,
              log: bool = False, note: str = "", caps: bool = False):
    import altair as alt

    data = ctx.rows("""
        SELECT 'run' AS kind, size, condition, seed, step, module, avg(value) AS value,
               count(*) AS layers, count(*) FILTER (WHERE isinf(value)) AS infinite
        FROM dynamics WHERE metric = ? AND target = ? AND module <> 'block'
              AND (value IS NULL OR NOT isnan(value))
        GROUP BY size, condition, seed, step, module ORDER BY size, condition, seed, module, step""",
                    metric, target)
    if not data:
        return _note(title, f"no {metric} of {target} in this study")
    infinite = sum(r["infinite"] for r in data)
    data = [r for r in data if r["value"] is not None]
    if not data:
        return _note(title, f"{metric} of {target} is infinite or undefined everywhere")
    shown = {(r["size"], r["condition"]) for r in data}
    if caps:
        data += [c for c in _adapter_caps(ctx) if (c["size"], c["condition"]) in shown]
    for r in data:
        r["size"] = ctx.size_label(r["size"])
    modules = [m for m in LINEAR_MODULES if any(r["module"] == m for r in data)]
    modules += sorted({r["module"] for r in data} - set(modules))
    scale = alt.Scale(type="log") if log else alt.Scale(zero=False, padding=6)
    x = alt.X("step:Q", title=STEP_TITLE, scale=alt.Scale(domainMin=0),
              axis=alt.Axis(format="~s", tickCount=4))
    base = alt.Chart().transform_filter(alt.datum.kind == "run").encode(
        x=x, y=alt.Y("value:Q", title=y_title, scale=scale), color=ctx.color(),
        detail=_seed_detail(),
        tooltip=["condition:N", "seed:N", "module:N", "step:Q", alt.Tooltip("value:Q", format=".4g")])
    layers = [base.mark_line(strokeWidth=1.2), base.mark_point(size=14, filled=True, opacity=1)]
    subtitle = f"mean over layers; one line per seed{note}"
    if caps and any(r["kind"] == "cap" for r in data):
        layers.append(alt.Chart().transform_filter(alt.datum.kind == "cap").mark_rule(
            strokeDash=[4, 3]).encode(y="value:Q", color=ctx.color(legend=False),
                                      tooltip=["condition:N", alt.Tooltip("value:Q", title="cap r / min dim",
                                                                          format=".3f")]))
        subtitle += "; dashed: the cap r / min dim"
    chart = alt.layer(*layers, data=ctx.data(data)).properties(width=120, height=130)
    if infinite:
        subtitle += f"; {infinite} infinite values (rank-deficient matrices) left out of the means"
    return chart.facet(column=alt.Column("module:N", title="module type", sort=modules),
                       row=alt.Row("size:N", title=None, sort=ctx.size_labels())).properties(
        title=alt.Title(title, subtitle=subtitle))


def per_weight(ctx):
    return _dynamics(ctx, "Proportional effective rank (PER) of the weights", PROPORTIONAL_EFFECTIVE_RANK, "weight",
                     "PER (effective rank / min dim)", note="; the effective weight W + scale·BA for ReLoRA")


def condition_number_weight(ctx):
    return _dynamics(ctx, "Condition number of the weights", "condition_number", "weight",
                     "σ_max / σ_min", log=True, note="; log scale")


def per_update(ctx):
    return _dynamics(ctx, "PER of the cumulative update W_t − W_0", PROPORTIONAL_EFFECTIVE_RANK, "update",
                     "PER (effective rank / min dim)", note="; undefined at step 0 (all-zero update)")


def per_adapter(ctx):
    return _dynamics(ctx, "PER of the adapter update scale·BA (ReLoRA only)", PROPORTIONAL_EFFECTIVE_RANK, "adapter",
                     "PER (effective rank / min dim)",
                     note="; undefined right after a reset (all-zero adapter)", caps=True)


def per_gradient(ctx):
    return _dynamics(ctx, "PER of the gradient on the probe batch", PROPORTIONAL_EFFECTIVE_RANK, "gradient",
                     "PER (effective rank / min dim)", note="; gradient of the effective weight")


def _merges(ctx: Context) -> list[dict]:
    """The merge steps of every ReLoRA run (one row per size, condition and step)."""
    return ctx.rows("""SELECT DISTINCT 'merge' AS kind, size, condition, step FROM train_metrics
                       WHERE merged ORDER BY size, condition, step""")


def rank_around_merges(ctx: Context):
    """PER of the w_2 matrices, the frozen base W and the effective weight, at the steps
    analysed around each merge (analysis.around_merges), with the merges marked."""
    import altair as alt

    title = "PER of w_2 around ReLoRA merges: frozen base W and effective weight"
    data = ctx.rows("""
        SELECT 'run' AS kind, size, condition, seed, step, target, avg(value) AS value
        FROM dynamics WHERE metric = 'proportional_effective_rank' AND module = 'w_2' AND target IN ('base', 'weight')
              AND NOT isnan(value)
        GROUP BY size, condition, seed, step, target ORDER BY size, condition, seed, target, step""")
    if not any(r["target"] == "base" for r in data):
        return _note(title, "no PER of the base weight in this study (analysis.targets lacks `base`)")
    panels = {"base": "base: stored W (frozen for ReLoRA)", "weight": "weight: W + scale·BA"}
    merges = _merges(ctx)
    data += [{**m, "target": t} for m in merges for t in panels]  # the rules in both panels
    for r in data:
        r["size"] = ctx.size_label(r["size"])
        r["panel"] = panels[r["target"]]
    x = alt.X("step:Q", title=STEP_TITLE, scale=alt.Scale(domainMin=0), axis=alt.Axis(format="~s"))
    base = alt.Chart().transform_filter(alt.datum.kind == "run").encode(
        x=x, y=alt.Y("value:Q", title="PER of w_2 (mean over layers)", scale=alt.Scale(zero=False, padding=6)),
        color=ctx.color(), detail=_seed_detail(),
        tooltip=["condition:N", "seed:N", "target:N", "step:Q", alt.Tooltip("value:Q", format=".4f")])
    rules = alt.Chart().transform_filter(alt.datum.kind == "merge").mark_rule(
        strokeDash=[4, 3], strokeWidth=0.8, opacity=0.6).encode(
        x=x, color=ctx.color(), tooltip=["condition:N", alt.Tooltip("step:Q", title="merge after update")])
    chart = alt.layer(base.mark_line(strokeWidth=1.2), base.mark_point(size=16, filled=True, opacity=1), rules,
                      data=ctx.data(data)).properties(width=300, height=170)
    return chart.facet(column=alt.Column("panel:N", title=None, sort=list(panels.values())),
                       row=alt.Row("size:N", title=None, sort=ctx.size_labels())).properties(
        title=alt.Title(title, subtitle=(
            "mean over layers at the analysed steps (analysis.around_merges adds steps around each merge; "
            "full-rank is analysed at the same steps, its base is its weight); dashed rules: merges")))


def adapter_a_outliers(ctx: Context):
    """The largest |A| of each run over its Kaiming-uniform bound 1/sqrt(in_features), per step:
    an inconsistent optimizer reset (quirk 4) shows as A entries hundreds of times the bound."""
    import altair as alt

    title = "Largest adapter entry |A| over its initialisation bound 1/√in_features"
    data = ctx.rows("""
        SELECT 'run' AS kind, size, condition, seed, step,
               max(value) FILTER (WHERE metric = 'max_abs_over_init_bound') AS value,
               sum(value) FILTER (WHERE metric = 'entries_over_3x_bound') AS entries_over_3x,
               count(*) FILTER (WHERE metric = 'entries_over_3x_bound' AND value > 0) AS adapters_over_3x,
               count(*) FILTER (WHERE metric = 'entries_over_3x_bound') AS adapters
        FROM dynamics WHERE target = 'adapter_A'
        GROUP BY size, condition, seed, step ORDER BY size, condition, seed, step""")
    data = [r for r in data if r["value"] is not None and r["value"] > 0]  # all-zero A (quirk 1): no point
    if not data:
        return _note(title, "no adapter factors A in this study (no ReLoRA run, or analysis.targets lacks adapter_A)")
    shown = {(r["size"], r["condition"]) for r in data}
    data += [m for m in _merges(ctx) if (m["size"], m["condition"]) in shown]
    data += [{"kind": "bound", "size": size, "value": v, "label": label} for size in sorted({r["size"] for r in data})
             for v, label in ((1.0, "the bound (Kaiming-uniform init)"), (3.0, "3x the bound"))]
    for r in data:
        r["size"] = ctx.size_label(r["size"])
    x = alt.X("step:Q", title=STEP_TITLE, scale=alt.Scale(domainMin=0), axis=alt.Axis(format="~s"))
    y = alt.Y("value:Q", title="max |A| · √in_features (log)", scale=alt.Scale(type="log"))
    base = alt.Chart().transform_filter(alt.datum.kind == "run").encode(
        x=x, y=y, color=ctx.color(), detail=_seed_detail(),
        tooltip=["condition:N", "seed:N", "step:Q", alt.Tooltip("value:Q", title="max |A| / bound", format=".3g"),
                 alt.Tooltip("entries_over_3x:Q", title="entries > 3x bound"),
                 alt.Tooltip("adapters_over_3x:Q", title="adapters with one"), "adapters:Q"])
    merges = alt.Chart().transform_filter(alt.datum.kind == "merge").mark_rule(
        strokeDash=[4, 3], strokeWidth=0.8, opacity=0.6).encode(x=x, color=ctx.color())
    bounds = alt.Chart().transform_filter(alt.datum.kind == "bound").mark_rule(
        color="#888888", strokeDash=[2, 2]).encode(y="value:Q", tooltip=["label:N"])
    chart = alt.layer(base.mark_line(strokeWidth=1.2), base.mark_point(size=16, filled=True, opacity=1), merges, bounds,
                      data=ctx.data(data)).properties(width=300, height=200)
    return chart.facet(column=alt.Column("size:N", title=None, sort=ctx.size_labels())).properties(
        title=alt.Title(title, subtitle=(
            "largest over every adapter at each analysed step; grey rules: the bound and 3x; dashed: merges. "
            "Independent reset masks (quirk 4) let entries with a first moment but no second move by ~lr·m/eps")))


def cka_to_final(ctx: Context):
    import altair as alt

    title = "Linear CKA of each block's output to the final step"
    # one feature per figure: block outputs (the default), else SwiGLU w_2's last-token outputs
    # (analysis.cka.features; per-head OV features stay in the table)
    data = ctx.rows("""
        WITH chosen AS (SELECT module FROM dynamics WHERE metric = 'cka_to_final' AND module IN ('block', 'w_2')
                        ORDER BY module = 'block' DESC LIMIT 1)
        SELECT size, condition, step, layer, avg(value) AS cka, count(*) AS n_seeds, any_value(module) AS module
        FROM dynamics WHERE metric = 'cka_to_final' AND module = (SELECT module FROM chosen)
        GROUP BY size, condition, step, layer
        ORDER BY size, condition, layer, step""")
    if not data:
        return _note(title, "no CKA of block or w_2 outputs in this study")
    features = ("residual stream after each block" if data[0]["module"] == "block"
                else "SwiGLU w_2 output at each row's last token")
    if data[0]["module"] != "block":
        title = "Linear CKA of each block's w_2 output to the final step"
    base = alt.Chart().encode(
        x=_step(), y=alt.Y("cka:Q", title="CKA to final", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("layer:O", title="block", scale=alt.Scale(scheme="viridis")),
        tooltip=["condition:N", "layer:O", "step:Q", alt.Tooltip("cka:Q", format=".3f"), "n_seeds:Q"])
    # one row per size, each faceted by the conditions it has: a row x column facet misplaced the
    # cells of a size that lacks some conditions (ablations run at one size) in the renderer
    rows = []
    for size in ctx.sizes:
        cells = [r for r in data if r["size"] == size]
        if not cells:
            continue
        present = [c for c in ctx.conditions if any(r["condition"] == c for r in cells)]
        layer = alt.layer(base.mark_line(strokeWidth=1.2), base.mark_point(size=14, filled=True, opacity=1),
                          data=ctx.data(cells)).properties(width=180, height=150)
        rows.append(layer.facet(column=alt.Column("condition:N", title=None, sort=present)).properties(
            title=alt.Title(ctx.size_label(size), anchor="start", fontSize=12)))
    return alt.vconcat(*rows).properties(
        title=alt.Title(title, subtitle=f"{features}, mean over seeds; colour: block (0 = first)"))


def gap_vs_size(ctx: Context):
    import altair as alt

    title = f"Final gap to '{ctx.reference}' vs model size"
    placeholders = ", ".join("?" for _ in ctx.headline)
    data = ctx.rows(f"SELECT * FROM gap WHERE reference = ? AND metric IN ({placeholders})",
                    ctx.reference, *ctx.headline)
    if not data:
        return _note(title, f"no condition to compare with the reference condition '{ctx.reference}'")
    max_seeds = max(r["n_seeds"] for r in data)
    for r in data:
        label = METRIC_LABELS.get(r["metric"], r["metric"])
        r["panel"] = f"{label} ({r['better']} is better)" if r["better"] else label
        r["size"] = ctx.size_label(r["size"])
    panels = []
    for m in ctx.headline:
        panels += [r["panel"] for r in data if r["metric"] == m][:1]
    x = alt.X("size:N", title="model size (parameters)", sort=ctx.size_labels(),
              axis=alt.Axis(labelAngle=0))
    base = alt.Chart().encode(x=x, color=ctx.color(),
                              xOffset=alt.XOffset("condition:N", sort=ctx.conditions))
    layers = [
        alt.Chart().mark_rule(color="#888888").encode(y=alt.datum(0)),
        base.mark_line(strokeWidth=1.2).encode(y=alt.Y("mean_diff:Q", title=f"condition − {ctx.reference}")),
        base.mark_point(size=50, filled=True, opacity=1).encode(
            y="mean_diff:Q", tooltip=["condition:N", "size:N", "metric:N",
                                      alt.Tooltip("mean_diff:Q", format=".4g"),
                                      alt.Tooltip("ci_low:Q", format=".4g"),
                                      alt.Tooltip("ci_high:Q", format=".4g"),
                                      alt.Tooltip("p_value:Q", format=".3g"), "n_seeds:Q"]),
    ]
    over_paradigms = any(r["test"] == "paired_t_paradigms" and r["ci_low"] is not None for r in data)
    if max_seeds >= 2 or over_paradigms:
        layers.append(base.mark_rule(strokeWidth=1.5).encode(
            y=alt.Y("ci_low:Q", title=f"condition − {ctx.reference}"), y2="ci_high:Q"))
    if max_seeds >= 2:
        subtitle = (f"mean paired difference over seeds (n_seeds = {max_seeds}) with "
                    f"{ctx.confidence:.0%} t-intervals; 0 = no gap")
    else:
        subtitle = "n_seeds = 1: point gaps, no confidence intervals over seeds; 0 = no gap"
    if over_paradigms:
        subtitle += (f"; BLiMP: {ctx.confidence:.0%} t-intervals over paradigms (paired per-paradigm "
                     "differences)")
    chart = alt.layer(*layers, data=ctx.data(data)).properties(width=170, height=190)
    return chart.facet(column=alt.Column("panel:N", title=None, sort=panels,
                                         header=alt.Header(labelFontSize=11))).resolve_scale(
        y="independent").properties(title=alt.Title(title, subtitle=subtitle))


# name -> (function, caption for the report)
FIGURES = {
    "train_loss": (train_loss, "Training loss per step; merges of ReLoRA conditions marked."),
    "learning_rate": (learning_rate, "Learning rate of each update per condition."),
    "heldout_bpb": (heldout_bpb, "Held-out bits per byte per evaluation domain vs step."),
    "blimp_overall": (blimp_overall, "BLiMP accuracy (mean over paradigms) vs step, over all paradigms "
                                     "and over the frequency-balanced ones, beside the unigram scorer "
                                     "and the untrained models."),
    "blimp_phenomena": (blimp_phenomena, "BLiMP accuracy per phenomenon at the last evaluated step."),
    "blimp_paradigms": (blimp_paradigms, "BLiMP accuracy per paradigm beside the unigram frequency "
                                         "scorer and the untrained models; the band marks the "
                                         "frequency-balanced paradigms."),
    "per_weight": (per_weight, "PER of the weights per module type vs step."),
    "condition_number_weight": (condition_number_weight, "Condition number of the weights per module type."),
    "per_update": (per_update, "PER of the cumulative update W_t − W_0 per module type."),
    "per_adapter": (per_adapter, "PER of the ReLoRA adapter update per module type."),
    "per_gradient": (per_gradient, "PER of the probe-batch gradient per module type."),
    "rank_around_merges": (rank_around_merges, "PER of w_2, frozen base W and effective weight, around each merge."),
    "adapter_a_outliers": (adapter_a_outliers, "Largest adapter entry |A| over its initialisation bound per step."),
    "cka_to_final": (cka_to_final, "Linear CKA of each block's output to the final step."),
    "gap_vs_size": (gap_vs_size, "Final gap of each condition to the reference vs model size."),
}
FORMATS = ("png", "svg", "html")


def _finish(chart):
    return chart.configure(font="DejaVu Sans").configure_title(
        fontSize=15, anchor="start", subtitleFontSize=11, subtitleColor="#555555").configure_axis(
        labelFontSize=10, titleFontSize=11).configure_header(
        labelFontSize=11, titleFontSize=11).configure_legend(labelFontSize=11, titleFontSize=11)


def _write_atomic(path: Path, data) -> None:
    """Temporary name, then rename (relora.io): a killed or failed write leaves the old figure."""
    from .io import atomic_write_bytes, atomic_write_text

    (atomic_write_text if isinstance(data, str) else atomic_write_bytes)(path, data)


def chart_spec(chart, ctx: Context | None = None) -> dict:
    """The Vega-Lite spec of a figure, with the datasets its charts name inlined."""
    spec = _finish(chart).to_dict()
    if ctx is not None and ctx.datasets:
        spec.setdefault("datasets", {}).update(ctx.datasets)
        ctx.datasets = {}
    return spec


def render(spec: dict, fmt: str, scale: float = 2.0):
    import vl_convert as vlc

    if fmt == "png":
        return vlc.vegalite_to_png(spec, scale=scale, allowed_base_urls=[])
    if fmt == "svg":
        return vlc.vegalite_to_svg(spec, allowed_base_urls=[])
    if fmt == "html":
        return vlc.vegalite_to_html(spec, bundle=True)  # vega scripts inlined: works offline
    raise ValueError(f"unknown figure format '{fmt}' (use {', '.join(FORMATS)})")


def write_figures(db, out_dir, formats=FORMATS, names=None, settings: dict | None = None,
                  scale: float = 2.0) -> list[dict]:
    """Write every figure (or `names`) of the study in `db` into `out_dir`; return the list
    written to `out_dir/figures.json`. PNGs are drawn at `scale` times the chart size."""
    import duckdb

    db, out_dir = Path(db), Path(out_dir)
    if not db.exists():
        raise FileNotFoundError(f"{db}: study database not found (run `relora aggregate` first)")
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown figure format '{fmt}' (use {', '.join(FORMATS)})")
    from .io import check_replaceable

    check_replaceable(out_dir, "figures.json")  # absent, empty, or a figures folder of ours
    out_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db), read_only=True)
    try:
        ctx = Context(con, settings)
        manifest = []
        for name in names or FIGURES:
            if name not in FIGURES:
                raise ValueError(f"unknown figure '{name}' (figures: {', '.join(FIGURES)})")
            function, caption = FIGURES[name]
            spec = chart_spec(function(ctx), ctx)
            files = {}
            for fmt in formats:
                path = out_dir / f"{name}.{fmt}"
                _write_atomic(path, render(spec, fmt, scale))
                files[fmt] = path.name
            title = spec.get("title", {})
            manifest.append({"name": name, "title": title.get("text") if isinstance(title, dict) else title,
                             "caption": caption, "files": files})
    finally:
        con.close()
    listing = out_dir / "figures.json"
    if names and listing.exists():  # a partial redraw keeps the other figures' entries
        drawn = {m["name"] for m in manifest}
        kept = [m for m in json.loads(listing.read_text()) if m.get("name") not in drawn]
        manifest = sorted(kept + manifest, key=lambda m: list(FIGURES).index(m["name"])
                          if m["name"] in FIGURES else len(FIGURES))
    _write_atomic(listing, json.dumps(manifest, indent=2))
    return manifest
