"""`relora aggregate`, `relora figures`, `relora report`: the results stage (docs/design.md,
Tables); `relora sql`: query a study database without a DuckDB command-line client."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("aggregate", help="run directories -> study.duckdb (tables, views, statistics)")
    p.add_argument("--config", type=Path, default=None,
                   help="study YAML (reference condition, confidence, BLiMP reference)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key (repeatable)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", type=Path, help="results/<study> (its runs/size=*/condition=*/seed=*)")
    source.add_argument("--runs", type=Path, nargs="+", help="explicit run directories")
    p.add_argument("--blimp-reference", type=Path, default=None,
                   help="published BLiMP accuracies: `published` (the package's table) or a folder of the "
                        "authors' files (overrides evaluation.blimp.reference)")
    p.add_argument("--blimp-baselines", type=Path, default=None,
                   help="the data stage's blimp_unigram.parquet: the unigram frequency baseline per "
                        "paradigm (table blimp_baselines, metric blimp_balanced)")
    p.add_argument("--out", required=True, type=Path, help="the DuckDB file to write")
    p.set_defaults(handler=run_aggregate)

    p = subparsers.add_parser("figures", help="study.duckdb -> PNG, SVG and interactive HTML figures")
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--formats", nargs="+", default=["png", "svg", "html"], choices=["png", "svg", "html"])
    p.add_argument("--only", nargs="+", default=None, metavar="FIGURE", help="draw only these figures")
    p.set_defaults(handler=run_figures)

    p = subparsers.add_parser("report", help="study.duckdb + figures -> one self-contained report.html")
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--figures", type=Path, default=None, help="the figures folder")
    p.add_argument("--config", type=Path, default=None, help="study YAML shown in the report")
    p.add_argument("--manifest", type=Path, default=None, help="data manifest.json shown in the report")
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(handler=run_report)

    p = subparsers.add_parser("sql", help="run one read-only query on a study database and print the result",
                              description="Query results/<study>/study.duckdb with the DuckDB of this install "
                                          "(which reads the storage version it wrote), read-only.")
    p.add_argument("db", type=Path, help="the study database, e.g. results/default/study.duckdb")
    p.add_argument("query", help="one SQL query, e.g. \"SELECT * FROM gap\"")
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p.add_argument("--max-rows", type=int, default=200, help="rows shown in the table (default 200)")
    p.set_defaults(handler=run_sql)


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
    print(f"relora aggregate: wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def run_figures(args) -> int:
    import time

    from ..plots import write_figures

    start = time.perf_counter()
    figures = write_figures(args.db, args.out_dir, formats=args.formats, names=args.only)
    print(f"relora figures: wrote {len(figures)} figures to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def run_report(args) -> int:
    from ..report import write_report

    out = write_report(args.db, args.figures, args.config, args.manifest, args.out, args.title)
    print(f"relora report: wrote {out}")
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
