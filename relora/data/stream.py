"""Training batches streamed from pre-tokenized parquet shards (paper scale), instead of train.npy.

The paper trains on `pico-lm/pretokenized-dolma`: rows of 2049 OLMo token ids, already shuffled,
in parquet shards (42B tokens in all, 84 GB), which a run reads once in order rather than
materialising. The data stage (`resolve_stream`) lists each streamed dataset's shards, at the
commit its `revision` resolves to for a hub dataset, with their row counts from the shards'
footers (no row is read), checks their columns, and records all of it in the data manifest
(`train.datasets[].shards`).

Update k reads rows [(k - 1) B, k B) of the concatenated shards: like `TokenBatches`, a pure
function of the step, so every condition sees the same batches. The row counts turn that row
into a shard s and a row r within it, so a run resumed at step k opens shard s and starts
reading at the row group that holds row r, dropping fewer rows than one row group holds: the
position costs the same at step 19k as at step 1 (instead of re-reading 19k x 1024 rows). A
hub shard whose read fails (a dropped connection) is re-opened at the row it stopped at, up to
`RETRIES` times. The seed does not reorder a stream (the paper's data order is fixed).
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from . import hub

log = logging.getLogger("relora.data.stream")

RETRIES = 5  # re-opens of a hub shard whose read failed, waiting 2, 4, 8 ... s (at most 60 s)
RETRY_WAIT_S = 2.0


class StreamError(ValueError):
    """A training stream that cannot be read; the message names the dataset and shard."""


# --- the data stage: shards, row counts, columns ------------------------------------------------

def is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path)) or any(c in path for c in "*?[")


def split_shards(files: list[dict], split: str, name: str | None) -> list[dict]:
    """The parquet files of one split (and config `name`) of a hub dataset repository, in path
    order: those under a folder named after the split (`train/0000.parquet`) or named after it
    (`data/train-000-of-100.parquet`), under a folder named `name` when a config is given."""
    chosen = []
    for entry in files:
        parts = entry["file"].split("/")
        if not parts[-1].endswith(".parquet") or (name and name not in parts[:-1]):
            continue
        if split in parts[:-1] or re.match(rf"{re.escape(split)}([-_.]|$)", parts[-1]):
            chosen.append(entry)
    return sorted(chosen, key=lambda e: e["file"])


def check_columns(schema, field: str, where: str) -> None:
    """Raise naming the expected and the found columns unless `field` is a column of lists of
    integers."""
    import pyarrow as pa

    if field not in schema.names:
        raise StreamError(f"{where}: expected column '{field}' (the tokens_field), found columns: "
                          f"{', '.join(schema.names) or 'none'}")
    kind = schema.field(field).type
    if not ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)):
        raise StreamError(f"{where}: column '{field}' holds {kind}, expected a list of integer token ids")


def resolve_stream(spec: dict, what: str) -> dict:
    """A streamed dataset's manifest record: the spec, where it was read (hub.source_revision)
    and its shards [{"file", "bytes", "rows"} (+ "sha256" of a hub file's LFS object)]."""
    import pyarrow.parquet as pq

    path, field = spec["path"], spec.get("tokens_field")
    if not field:
        raise StreamError(f"{what}: a streamed dataset needs `tokens_field` (pre-tokenized rows)")
    local = is_local(path)
    record = {**spec, "source": "hf", **hub.source_revision(path, spec.get("revision"), local)}
    if local:
        from .corpus import _expand

        files = [p for p in _expand([path], what)]
        others = [p.name for p in files if p.suffix != ".parquet"]
        if others:
            raise StreamError(f"{what}: a streamed dataset is read from .parquet shards; {others[0]} is not one")
        shards = [{"file": str(p.resolve()), "bytes": p.stat().st_size} for p in files]
    else:
        shards = split_shards(hub.list_files(path, record["resolved_revision"]), spec.get("split", "train"),
                              spec.get("name"))
        if not shards:
            raise StreamError(f"{what}: {path}@{record['resolved_revision']} has no .parquet files of split "
                              f"'{spec.get('split', 'train')}'")
    for shard in shards:
        with _open(record, shard) as f:
            footer = pq.ParquetFile(f)
            check_columns(footer.schema_arrow, field, f"{what}: {shard['file']}")
            shard["rows"] = footer.metadata.num_rows
    record["shards"], record["rows"] = shards, sum(s["rows"] for s in shards)
    return record


def _open(dataset: dict, shard: dict):
    if dataset.get("hub"):
        return hub.open_file(dataset["path"], dataset["resolved_revision"], shard["file"])
    return open(shard["file"], "rb")


# --- the trainer: rows from a position ----------------------------------------------------------

def read_shard(dataset: dict, shard: dict, start: int):
    """Token-id rows (int64 arrays) of one shard from row `start` on. Only the row groups from
    the one holding `start` are read; the columns and the row count are checked against the
    manifest first."""
    import pyarrow.parquet as pq

    field, where = dataset["tokens_field"], f"training stream {dataset['path']}: {shard['file']}"
    with _open(dataset, shard) as f:
        parquet = pq.ParquetFile(f)
        check_columns(parquet.schema_arrow, field, where)
        if parquet.metadata.num_rows != shard["rows"]:
            raise StreamError(f"{where}: {parquet.metadata.num_rows} rows, the data manifest says "
                              f"{shard['rows']} (the shard changed since the data stage: rebuild the data)")
        first, groups = 0, []
        for g in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if groups or first + n > start:
                groups.append(g)
            else:
                first += n
        skip = start - first
        for batch in parquet.iter_batches(batch_size=256, row_groups=groups, columns=[field]):
            column = batch.column(0)
            if column.null_count:
                raise StreamError(f"{where}: a row's '{field}' is null")
            offsets, values = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)
            for i in range(len(column)):
                if skip:
                    skip -= 1
                    continue
                yield values[offsets[i]:offsets[i + 1]].astype(np.int64)


class StreamedBatches:
    """Batches of the concatenated shards of the manifest's `train.datasets`, by step."""

    def __init__(self, datasets: list[dict], seq_len: int, batch_size: int, vocab_size: int):
        if not datasets:
            raise StreamError("manifest: train.kind is 'stream' but no datasets are listed")
        # a manifest written before shards were recorded: list them now (on the compute node)
        datasets = [d if "shards" in d else resolve_stream(d, f"training stream {d['path']}") for d in datasets]
        self.seq_len, self.batch_size, self.vocab_size = seq_len, batch_size, vocab_size
        self.shards = [(dataset, shard) for dataset in datasets for shard in dataset["shards"]]
        self.starts = np.concatenate([[0], np.cumsum([s["rows"] for _, s in self.shards])]).tolist()
        self._rows, self._position = None, None

    @property
    def total_rows(self) -> int:
        return self.starts[-1]

    def locate(self, row: int) -> tuple[int, int]:
        """(shard index, row within it) of a row of the concatenated stream."""
        index = bisect.bisect_right(self.starts, row) - 1
        return index, row - self.starts[index]

    def rows_from(self, row: int):
        """The stream's rows from `row` on (a hub shard's failed read re-opened where it stopped)."""
        index, offset = self.locate(row)
        while index < len(self.shards):
            dataset, shard = self.shards[index]
            attempt = 0
            while True:
                try:
                    for tokens in read_shard(dataset, shard, offset):
                        yield tokens
                        offset += 1
                    break
                except StreamError:
                    raise
                except Exception as e:
                    if not dataset.get("hub") or attempt >= RETRIES:
                        raise StreamError(f"training stream {dataset['path']}: {shard['file']}: reading row "
                                          f"{offset} failed ({type(e).__name__}: {e})") from e
                    attempt += 1
                    wait = min(60.0, RETRY_WAIT_S * 2 ** (attempt - 1))
                    log.warning("training stream: %s row %d: %s; re-opening in %.0f s (attempt %d of %d)",
                                shard["file"], offset, e, wait, attempt, RETRIES)
                    time.sleep(wait)
            index, offset = index + 1, 0

    def batch(self, step: int, rows: slice = slice(None)) -> torch.Tensor:
        """(rows, seq_len + 1) int64 tokens of update `step` (1-based)."""
        start = (step - 1) * self.batch_size
        if start + self.batch_size > self.total_rows:
            raise StreamError(f"the training stream ended at row {self.total_rows}: update {step} needs "
                              f"rows {start}..{start + self.batch_size - 1}")
        if self._position != start:  # the first batch, or a resumed run: go straight to the row
            index, offset = self.locate(start)
            log.info("training stream: update %d starts at row %d, row %d of shard %s", step, start,
                     offset, Path(self.shards[index][1]["file"]).name)
            self._rows, self._position = self.rows_from(start), start
        taken = [next(self._rows) for _ in range(self.batch_size)]
        self._position += len(taken)
        window = self.seq_len + 1
        short = [len(r) for r in taken if len(r) < window]
        if short:
            raise StreamError(f"streamed rows must hold at least seq_len + 1 = {window} tokens; got {short[0]}")
        tokens = np.stack([r[:window] for r in taken])[rows]
        if tokens.size and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            raise StreamError(f"streamed token id {int(tokens.max())} is outside the vocabulary of "
                              f"{self.vocab_size} tokens (update {step})")
        return torch.from_numpy(np.ascontiguousarray(tokens))
