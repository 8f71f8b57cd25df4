"""Training batches from the data directory: windows of DATA_DIR/train.npy (`TokenBatches`), or
the streamed rows the data manifest names (`relora.data.stream`).

Update k's batch is a pure function of (seed, k), so a resumed run needs no data state but its
step (docs/design.md, What a step is).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .manifest import verify_inputs


class TokenBatches:
    """Batches of non-overlapping (seq_len + 1)-token windows of a 1-D token array.

    The windows of update k are a pure function of (seed, k): epoch e visits all windows in the
    order of a permutation seeded by (seed, e). Runs with the same seed therefore see the same
    batches whatever their condition, and a resumed run needs no data state but its step.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, source="train.npy"):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < batch_size:
            raise ValueError(f"{source}: {len(tokens)} tokens make {self.n_windows} windows of data.seq_len "
                             f"{seq_len} + 1 tokens, too few to fill a batch of training.batch_size {batch_size} "
                             "(more training data, or a smaller seq_len or batch_size)")
        self._epoch, self._order = None, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._order

    def window_ids(self, step: int) -> np.ndarray:
        """Window indices of update `step` (1-based), crossing epochs seamlessly."""
        start = (step - 1) * self.batch_size
        ids = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.n_windows)
            ids.append(self._permutation(epoch)[offset])
        return np.asarray(ids)

    def batch(self, step: int, rows: slice = slice(None)) -> torch.Tensor:
        """(rows, seq_len + 1) int64 tokens of update `step`."""
        starts = self.window_ids(step)[rows] * self.seq_len
        windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
        return torch.from_numpy(windows.astype(np.int64))


def load_train_tokens(data_dir: Path, vocab_size: int) -> np.ndarray:
    path = Path(data_dir) / "train.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training tokens not found")
    # size and sha256 against the data manifest, once per process, before a step is taken
    # (hashing reads the file once: seconds per GB, against hours of training on it)
    manifest = verify_inputs(data_dir, ["train.npy"])
    if manifest and manifest.get("vocab_size") not in (None, vocab_size):
        raise ValueError(f"{Path(data_dir) / 'manifest.json'}: the data was tokenized with a vocabulary of "
                         f"{manifest['vocab_size']} tokens, the run's data.tokenizer.vocab_size is {vocab_size}")
    try:
        tokens = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
        raise ValueError(f"{path}: expected a 1-D integer token array, got {tokens.dtype} {tokens.shape}")
    top = int(tokens.max()) if len(tokens) else -1
    if top >= vocab_size or (tokens.dtype.kind == "i" and int(tokens.min()) < 0):
        raise ValueError(f"{path}: token id {top} is outside the vocabulary of {vocab_size} tokens")
    return tokens


def training_batches(data_dir: Path, seq_len: int, batch_size: int, seed: int, vocab_size: int):
    """Batches from DATA_DIR/train.npy, or streamed when the data manifest says so."""
    manifest_path = data_dir / "manifest.json"
    if not (data_dir / "train.npy").exists() and manifest_path.exists():
        train = json.loads(manifest_path.read_text()).get("train", {})
        if train.get("kind") == "stream":
            from .stream import StreamedBatches

            return StreamedBatches(train["datasets"], seq_len, batch_size, vocab_size)
    return TokenBatches(load_train_tokens(data_dir, vocab_size), seq_len, batch_size, seed,
                        source=data_dir / "train.npy")
