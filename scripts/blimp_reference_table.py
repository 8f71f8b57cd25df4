"""Write relora/data/blimp_reference.csv, the package's table of published BLiMP accuracies.

    python scripts/blimp_reference_table.py FOLDER

FOLDER holds the per-paradigm accuracies released with BLiMP (models_summary.jsonl and
human_validation_summary.csv). Only figures are kept: UIDs, phenomena and accuracies, no
sentences. `relora.results.published_blimp_reference` reads the table back; a test checks it
against `relora.results.load_blimp_reference(FOLDER)`.
"""

import argparse
import csv
import io
from pathlib import Path

from relora.io import atomic_write_text
from relora.results import HUMAN, PUBLISHED_REFERENCE_TABLE, REFERENCE_MODELS, load_blimp_reference

HEADER = """\
# Published per-paradigm accuracies on BLiMP, from Warstadt, Parrish, Liu, Mohananey, Peng, Wang
# and Bowman (2020), "BLiMP: The Benchmark of Linguistic Minimal Pairs for English", Transactions
# of the Association for Computational Linguistics 8, 377-392. Columns: the paradigm (uid), its
# phenomenon as the published model summary groups it (join by uid: it files the two
# animate_subject_* paradigms under argument_structure) and the accuracy of a 5-gram model
# (ngram), an LSTM (lstm), Transformer-XL (txl), GPT-2 (gpt2) and human agreement (human). Two
# paradigms of the human validation are not among BLiMP's 67 released ones: human figure only.
# Written by scripts/blimp_reference_table.py; read by relora.results.published_blimp_reference.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="models_summary.jsonl and human_validation_summary.csv")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "relora" / "data" / PUBLISHED_REFERENCE_TABLE)
    args = parser.parse_args()

    table: dict[str, dict] = {}
    for row in load_blimp_reference(args.folder):
        record = table.setdefault(row["uid"], {"uid": row["uid"], "phenomenon": None})
        record["phenomenon"] = record["phenomenon"] or row["phenomenon"]
        record[row["model"]] = repr(row["accuracy"])  # repr: the float exactly as published
    columns = ["uid", "phenomenon", *REFERENCE_MODELS, HUMAN[0]]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table[uid] for uid in sorted(table))
    atomic_write_text(args.out, HEADER + out.getvalue())
    print(f"wrote {args.out}: {len(table)} paradigms")


if __name__ == "__main__":
    main()
