"""Batches of token windows from a token set (or a weighted mixture of them): shuffled Grain pipelines for
training, fixed ones for eval.

Window i holds tokens [i*seq_len, (i+1)*seq_len] (seq_len + 1 of them, overlapping the next window by one):
inputs are window[:-1], targets window[1:]. Windows are always full, so no position reads past the data. Training
windows are shifted by a per-epoch offset in [0, seq_len), so later epochs see new contexts rather than the same
cut (like nanoGPT's random offsets, but exhaustive). A mixture draws from its token sets in proportion to their
weights (Grain's deterministic MapDataset.mix), each set with its own shuffle and epochs.

Global batch k of B rows is items [k*B, (k+1)*B) of that endless order, whatever the number of processes: each
process reads the rows of it that its devices hold (`sharding.process_rows`). A `BatchStream`'s position is
therefore global (the rows read so far, all processes together), and a checkpoint written by N processes resumes
with M.
"""

import functools
import os
from typing import Callable, Iterator

from absl import flags, logging
import grain
import numpy as np

from gptjax import paths
from gptjax.data.corpus import DataError
from gptjax.data.tokens import open_tokens, read_manifest


class TokenWindows:
  """Grain random-access source: item i is window i of a token set, as int32.

  With `shifted`, the last seq_len - 1 tokens are left out of the windows: room for the per-epoch offset.
  """

  def __init__(self, path: str, seq_len: int, shifted: bool = True):
    self.tokens = open_tokens(path)  # pickles without its memmaps: Grain workers open their own
    self.seq_len = seq_len
    self._len = max((len(self.tokens) - 1 - (seq_len - 1) * shifted) // seq_len, 0)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int, offset: int = 0) -> np.ndarray:
    return self.tokens.read(index * self.seq_len + offset, self.seq_len + 1)

  def read_shifted(self, position: int, window: int, seed: int) -> np.ndarray:
    """Window `window` at stream position `position`, shifted by a seeded offset of its epoch."""
    epoch = position // self._len
    return self.__getitem__(window, offset=(epoch * 0x9E3779B1 + seed * 0x85EBCA77) % self.seq_len)

  def __repr__(self) -> str:
    return f"TokenWindows({self.tokens.name!r}, seq_len={self.seq_len})"


def _windows(path: str, seq_len: int, seed: int | None) -> tuple[grain.MapDataset, int]:
  """(endless dataset of windows, windows per epoch) of a token set or mixture; shuffled unless seed is None."""
  manifest = read_manifest(path)
  if "mixture" in manifest:
    parts = [_windows(paths.join(os.path.dirname(path), part["path"]), seq_len, None if seed is None else seed + i)
             for i, part in enumerate(manifest["mixture"])]
    weights = [part["weight"] for part in manifest["mixture"]]
    return grain.MapDataset.mix([ds for ds, _ in parts], weights), sum(n for _, n in parts)
  windows = TokenWindows(path, seq_len, shifted=seed is not None)
  if not len(windows):
    raise DataError(f"{windows.tokens.name} has {len(windows.tokens)} tokens, too few for one window of "
                    f"{seq_len + 1}; add data, raise data.val_fraction, or lower model.block_size.")
  ds = grain.MapDataset.range(len(windows))
  if seed is None:
    return ds.repeat().map(windows.__getitem__), len(windows)
  # Epochs without end, each in a new order and with a new offset.
  return ds.shuffle(seed=seed).repeat().map_with_index(functools.partial(windows.read_shifted, seed=seed)), len(windows)


class BatchStream:
  """This process's part of global batches, from a global position on: the iterator the loop reads and checkpoints.

  Its state is the number of rows of global batches read so far (the same on every process), so any number of
  processes can restore it. `open_at(rows)` opens the pipeline at that position.
  """

  def __init__(self, open_at: Callable[[int], Iterator], batch_size: int):
    self._open_at, self.batch_size = open_at, batch_size
    self.rows = 0
    self._it = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._it = self._open_at(self.rows)
    batch = next(self._it)
    self.rows += self.batch_size
    return batch

  def get_state(self) -> dict:
    return {"rows": self.rows, "batch_size": self.batch_size}

  def set_state(self, state: dict) -> None:
    """Continues at a saved position: this class's state, or Grain's per-process iterator state of checkpoints
    written before positions were global (its batches consumed; every process had consumed the same number)."""
    self.close()
    if "rows" in state:
      self.rows = int(state["rows"])
    elif "next_index" in state:
      self.rows = int(state["next_index"]) * self.batch_size
    elif "iterators_in_use_states" in state:  # Grain's worker processes (data.num_workers): each its share
      self.rows = sum(int(s["next_index"]) for s in state["iterators_in_use_states"]) * self.batch_size
    else:
      raise ValueError(f"unknown data position {str(state)[:200]}")

  def close(self) -> None:
    """Ends the pipeline (and its worker processes); the next batch opens it again at the position."""
    if self._it is not None:
      close = getattr(self._it, "close", None)
      if close is not None:
        close()
      self._it = None


def train_batches(path: str, seq_len: int, batch_size: int, seed: int, rows: np.ndarray | None = None,
                  num_workers: int = 0) -> BatchStream:
  """Endless int32 [len(rows), seq_len + 1] batches: `rows` of each global batch of `batch_size` windows
  (default: all of them), reshuffled each epoch."""
  ds, n_windows = _windows(path, seq_len, seed)
  rows = np.arange(batch_size) if rows is None else np.asarray(rows)
  if n_windows < batch_size:  # the stream is endless, so a step can span epochs: warn only
    logging.warning("%s has %d windows of %d tokens but one step reads %d: each step repeats windows (more "
                    "than one epoch per step); add data or lower train.batch_size for a real run.", path, n_windows,
                    seq_len + 1, batch_size)

  def open_at(start: int) -> Iterator:
    batches = grain.MapDataset.range((len(ds) - start) // batch_size).map(
        functools.partial(_read_rows, ds, start, batch_size, rows))
    # The read buffer holds whole batches: Grain's default of 500 would hold gigabytes.
    it = batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if num_workers > 0:
      if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; outside app.run (notebooks, tests) use defaults
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)
  return BatchStream(open_at, batch_size)


def _read_rows(ds: grain.MapDataset, start: int, batch_size: int, rows: np.ndarray, k: int) -> np.ndarray:
  """`rows` of global batch k counted from item `start` (a module function: Grain's workers pickle it)."""
  return np.stack([ds[start + k * batch_size + int(r)] for r in rows])


def eval_batches(path: str, seq_len: int, batch_size: int, num_batches: int, shard_index: int,
                 shard_count: int) -> list[np.ndarray]:
  """The same int32 [batch_size, seq_len + 1] batches on every call, in file order (wrapping around)."""
  ds, _ = _windows(path, seq_len, seed=None)
  rows = np.arange(num_batches * batch_size) * shard_count + shard_index
  windows = np.stack([ds[int(row)] for row in rows])
  return list(windows.reshape(num_batches, batch_size, seq_len + 1))
