"""relora.tables: the one declaration of every table, and the one Parquet writer."""

import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relora import tables
from relora.tables import BLIMP, DATABASE, EVAL_DOCUMENTS, PERPLEXITY, RUN_FILES, TRAIN_METRICS, write_table

REPO = Path(__file__).resolve().parents[1]


def test_every_table_and_column_is_declared_with_a_type_and_a_comment():
    for table in [*DATABASE.values(), EVAL_DOCUMENTS]:
        assert table.comment.strip(), table.name
        assert len(set(table.names)) == len(table.names), table.name
        for column in table.columns:
            assert column.comment.strip(), (table.name, column.name)
            tables.arrow_type(column.type)  # every type maps to a Parquet type
    for table in RUN_FILES.values():
        assert table.names[:4] == ["size", "condition", "seed", "step"], table.name


def test_write_table_types_the_columns_and_renames_into_place(tmp_path):
    row = {"size": "tiny", "condition": "full", "seed": 0, "step": 3, "domain": "wiki", "docs": 2,
           "tokens": 10, "bytes": 40, "nll": 5.0, "perplexity": math.exp(0.5), "bits_per_byte": 0.1,
           "perplexity_doc_mean": 1.7}  # `seconds` is optional
    path = write_table(PERPLEXITY, [row], tmp_path / "perplexity.parquet")
    table = pq.read_table(path)
    assert table.column_names == PERPLEXITY.names
    assert table.schema.field("seed").type == pa.int32() and table.schema.field("step").type == pa.int64()
    assert table.schema.field("seconds").type == pa.float64() and table.column("seconds").to_pylist() == [None]
    assert [p.name for p in tmp_path.iterdir()] == ["perplexity.parquet"]  # no temporary left
    empty = pq.read_table(write_table(TRAIN_METRICS, [], tmp_path / "train_metrics.parquet"))
    assert empty.num_rows == 0 and empty.column_names == TRAIN_METRICS.names


def test_write_table_refuses_rows_that_drift_from_the_declaration(tmp_path):
    row = {"size": "tiny", "condition": "full", "seed": 0, "step": 3, "uid": "p0", "phenomenon": "a",
           "field": "syntax", "pairs": 10, "correct": 6, "accuracy": 0.6, "source": "generated"}
    with pytest.raises(ValueError, match=r"blimp.parquet: row 0 does not fit table blimp: unknown \['ppl'\]"):
        write_table(BLIMP, [{**row, "ppl": 1.0}], tmp_path / "blimp.parquet")
    without = {k: v for k, v in row.items() if k != "correct"}
    with pytest.raises(ValueError, match=r"missing \['correct'\]"):
        write_table(BLIMP, [without], tmp_path / "blimp.parquet")
    assert not list(tmp_path.iterdir())


def test_readme_lists_every_renamed_metric():
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Renamed metrics", 1)[1].split("\n## ", 1)[0]
    listed = dict(re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", section, flags=re.M))
    assert listed == tables.RENAMED_METRICS
    assert "not migrated" in section
    names = {c.name for t in DATABASE.values() for c in t.columns}
    assert not set(tables.RENAMED_METRICS) & names  # no old name left as a column
