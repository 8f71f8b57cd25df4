"""`relora aggregate`, `relora figures`, `relora report`: the results stage (docs/design.md,
Tables); `relora findings`: what a study found, with its queries; `relora sql`: query a study
database without a DuckDB command-line client."""

from __future__ import annotations

import logging
from pathlib import Path

from . import add_command, add_study_options

log = logging.getLogger("relora.commands.results")


def register(subparsers) -> None:
    from ..plots import FIGURES, FORMATS  # names only: the drawing libraries load when figures are drawn

    p = add_command(subparsers, "aggregate", run_aggregate,
                    "run directories -> study.duckdb (tables, views, statistics)",
                    "Gather the tables of every run into one DuckDB file: the tables, the views (final, "
                    "gap, ...) and the statistics across seeds and conditions.")
    add_study_options(p, required=False, what="gives the reference condition, the confidence level and "
                                              "the BLiMP reference (default: none, the defaults)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", type=Path, metavar="RESULTS_DIR",
                        help="results/<study> (its runs/size=*/condition=*/seed=*)")
    source.add_argument("--runs", type=Path, nargs="+", metavar="RUN_DIR", help="explicit run directories")
    p.add_argument("--blimp-reference", type=Path, default=None, metavar="SOURCE",
                   help="published BLiMP accuracies: `published` (the package's table) or a folder of the "
                        "authors' files (overrides evaluation.blimp.reference)")
    p.add_argument("--blimp-baselines", type=Path, default=None, metavar="PARQUET",
                   help="the data stage's blimp_unigram.parquet: the unigram frequency baseline per "
                        "paradigm (table blimp_baselines, metric blimp_balanced)")
    p.add_argument("--out", required=True, type=Path, metavar="DB", help="the DuckDB file to write")

    p = add_command(subparsers, "figures", run_figures, "study.duckdb -> PNG, SVG and interactive HTML figures",
                    "Draw the study's figures from its database, each as PNG, SVG and self-contained "
                    "interactive HTML, and list them in figures.json.")
    p.add_argument("--db", required=True, type=Path, help="the study database (from `relora aggregate`)")
    p.add_argument("--out-dir", required=True, type=Path,
                   help="the figures folder to write (absent, empty or an earlier figures folder)")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                   help=f"file formats to write (default: {' '.join(FORMATS)})")
    p.add_argument("--only", nargs="+", default=None, choices=list(FIGURES), metavar="FIGURE",
                   help="draw only these figures (the others in figures.json are kept): " + ", ".join(FIGURES))

    p = add_command(subparsers, "report", run_report, "study.duckdb + figures -> one self-contained report.html",
                    "Write one self-contained report.html: the study, the headline results with their "
                    "statistics, and the figures.")
    p.add_argument("--db", required=True, type=Path, help="the study database (from `relora aggregate`)")
    p.add_argument("--figures", type=Path, default=None, help="the figures folder (from `relora figures`)")
    p.add_argument("--config", type=Path, default=None, metavar="STUDY.yaml", help="study YAML shown in the report")
    p.add_argument("--manifest", type=Path, default=None, help="data manifest.json shown in the report")
    p.add_argument("--title", default=None,
                   help="the report's title (default: the study's report.title, else from its name)")
    p.add_argument("--out", required=True, type=Path, help="the report.html to write")

    p = add_command(subparsers, "findings", run_findings,
                    "print what a study found: each finding's query and its table, as Markdown",
                    "Run the findings' queries (relora/findings.py: primary metrics, equal FLOPs, speed, "
                    "Holm-corrected secondary metrics, BLiMP baselines, ablations, the paper) on a study "
                    "database and print them as Markdown, each with the query that made it.")
    p.add_argument("db", type=Path, help="the study database, e.g. results/seeds/study.duckdb")
    p.add_argument("--heading", default="###", help="Markdown heading of each finding (default ###)")

    p = add_command(subparsers, "sql", run_sql, "run one read-only query on a study database and print the result",
                    "Query results/<study>/study.duckdb with the DuckDB of this install (which reads the "
                    "storage version it wrote), read-only.")
    p.add_argument("db", type=Path, help="the study database, e.g. results/default/study.duckdb")
    p.add_argument("query", help="one SQL query, e.g. \"SELECT * FROM gap\"")
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p.add_argument("--max-rows", type=int, default=200, help="rows shown in the table (default 200)")


def run_aggregate(args) -> int:
    import time

    from ..config import load_study
    from ..results import ResultsError, aggregate

    study = load_study(args.config, args.overrides) if args.config else None
    start = time.perf_counter()
    try:
        out = aggregate(args.runs if args.runs else args.results, study, args.out,
                        blimp_reference=args.blimp_reference, blimp_baselines=args.blimp_baselines)
    except ResultsError as e:
        raise ValueError(str(e)) from None
    log.info("wrote %s in %.1f s", out, time.perf_counter() - start)
    return 0


def run_figures(args) -> int:
    import time

    from ..plots import write_figures

    start = time.perf_counter()
    figures = write_figures(args.db, args.out_dir, formats=args.formats, names=args.only)
    log.info("wrote %d figures to %s in %.1f s", len(figures), args.out_dir, time.perf_counter() - start)
    return 0


def run_report(args) -> int:
    from ..report import write_report

    out = write_report(args.db, args.figures, args.config, args.manifest, args.out, args.title)
    log.info("wrote %s", out)
    return 0


def run_findings(args) -> int:
    import duckdb

    from ..findings import findings, markdown, study_settings

    if not args.db.is_file():
        raise ValueError(f"{args.db}: no such study database")
    with duckdb.connect(str(args.db), read_only=True) as con:
        try:
            results = findings(con)
        except duckdb.Error as e:
            raise ValueError(f"{args.db}: not a study database of this version of relora ({e}); "
                             "rebuild it with `relora aggregate`") from None
        print(markdown(results, study_settings(con), args.heading))
    return 0


def run_sql(args) -> int:
    import csv
    import sys

    import duckdb

    if not args.db.is_file():
        raise ValueError(f"{args.db}: no such study database")
    with duckdb.connect(str(args.db), read_only=True) as con:
        try:
            relation = con.sql(args.query)
        except duckdb.Error as e:
            raise ValueError(f"{args.db}: {e}") from None
        if relation is None:  # a statement without a result (the database is read-only anyway)
            return 0
        if args.csv:
            writer = csv.writer(sys.stdout)
            writer.writerow(relation.columns)
            writer.writerows(relation.fetchall())
        else:
            relation.show(max_rows=args.max_rows, max_width=10_000)
    return 0
