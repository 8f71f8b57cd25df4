"""Training batches streamed from pre-tokenized rows (paper scale), instead of train.npy.

The paper trains on `pico-lm/pretokenized-dolma`: rows of 2049 OLMo token ids, already
shuffled, 42B tokens in all (84 GB), which a run reads once in order rather than materialising.
Update k reads rows [(k - 1) B, k B) of the concatenated streams: like `TokenBatches`, a pure
function of the step, so every condition sees the same batches and a resumed run only skips to
its step's rows. The seed does not reorder a stream (the paper's data order is fixed).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from .corpus import iter_hf


class StreamedBatches:
    def __init__(self, datasets: list[dict], seq_len: int, batch_size: int, vocab_size: int):
        if not datasets:
            raise ValueError("manifest: train.kind is 'stream' but no datasets are listed")
        self.datasets, self.seq_len, self.batch_size, self.vocab_size = datasets, seq_len, batch_size, vocab_size
        self._rows, self._position = None, None

    def _open(self, start: int):
        rows = itertools.chain.from_iterable(
            (value for _, _, value in iter_hf(spec, f"data.corpus.hf[{spec['path']}]")) for spec in self.datasets)
        return itertools.islice(rows, start, None)

    def batch(self, step: int, rows: slice = slice(None)) -> torch.Tensor:
        """(rows, seq_len + 1) int64 tokens of update `step` (1-based)."""
        start = (step - 1) * self.batch_size
        if self._position != start:
            self._rows, self._position = self._open(start), start
        taken = list(itertools.islice(self._rows, self.batch_size))
        self._position += len(taken)
        if len(taken) < self.batch_size:
            raise ValueError(f"the training stream ended at row {self._position}: update {step} needs "
                             f"rows {start}..{start + self.batch_size - 1}")
        window = self.seq_len + 1
        short = [len(r) for r in taken if len(r) < window]
        if short:
            raise ValueError(f"streamed rows must hold at least seq_len + 1 = {window} tokens; got {short[0]}")
        tokens = np.stack([np.asarray(r[:window], dtype=np.int64) for r in taken])[rows]
        if tokens.size and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            raise ValueError(f"streamed token id {int(tokens.max())} is outside the vocabulary of "
                             f"{self.vocab_size} tokens (update {step})")
        return torch.from_numpy(tokens)
