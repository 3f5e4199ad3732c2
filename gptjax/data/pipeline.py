"""Batches of token windows from a token file: shuffled Grain pipelines for training, fixed ones for eval.

Window i holds tokens [i*seq_len, (i+1)*seq_len] (seq_len + 1 of them, overlapping the next window by one):
inputs are window[:-1], targets window[1:]. Training windows are shifted by a per-epoch offset in [0, seq_len),
so later epochs see new contexts rather than the same cut (like nanoGPT's random offsets, but exhaustive). Both pipelines give shard s of S the global items s, s+S, s+2S, ...,
so the S shards of one step together read one contiguous run of the global order, whatever S is.
"""

import functools

from absl import flags
import grain
import numpy as np

from gptjax.data.corpus import DataError
from gptjax.data.prepare import open_tokens


class TokenWindows:
  """Grain random-access source: item i is window i of the token file, as int32 (room left for an offset)."""

  def __init__(self, path: str, seq_len: int):
    self.path = path
    self.seq_len = seq_len
    self._len = (len(open_tokens(path)) - seq_len) // seq_len
    self._tokens = None  # opened on first use, in whichever process reads (Grain workers unpickle the source)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int, offset: int = 0) -> np.ndarray:
    if self._tokens is None:
      self._tokens = open_tokens(self.path)
    start = index * self.seq_len + offset
    return np.asarray(self._tokens[start:start + self.seq_len + 1], np.int32)

  def read_shifted(self, position: int, window: int, seed: int) -> np.ndarray:
    """Window `window` at global stream position `position`, shifted by a seeded offset of its epoch."""
    epoch = position // self._len
    return self.__getitem__(window, offset=(epoch * 0x9E3779B1 + seed * 0x85EBCA77) % self.seq_len)

  def __getstate__(self) -> dict:
    return dict(self.__dict__, _tokens=None)

  def __repr__(self) -> str:
    return f"TokenWindows(path={self.path!r}, seq_len={self.seq_len})"


def train_batches(path: str, seq_len: int, batch_size: int, seed: int, shard_index: int, shard_count: int,
                  num_workers: int = 0) -> grain.DatasetIterator:
  """Endless int32 [batch_size, seq_len + 1] batches, reshuffled each epoch; supports get_state/set_state."""
  windows = TokenWindows(path, seq_len)
  if len(windows) < batch_size * shard_count:
    raise DataError(f"{path} has {len(windows)} windows of {seq_len + 1} tokens but one step needs "
                    f"{batch_size} x {shard_count} shards = {batch_size * shard_count}; use more data, a smaller "
                    "train.batch_size or a smaller model.block_size.")
  ds = (grain.MapDataset.range(len(windows))
        .shuffle(seed=seed)
        .repeat()  # epochs without end, each in a new order
        .map_with_index(functools.partial(windows.read_shifted, seed=seed))
        [shard_index::shard_count]
        .batch(batch_size, drop_remainder=True))
  # The read buffer holds whole batches: Grain's default of 500 would hold gigabytes.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; outside app.run (notebooks, tests) use defaults
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


def eval_batches(path: str, seq_len: int, batch_size: int, num_batches: int, shard_index: int,
                 shard_count: int) -> list[np.ndarray]:
  """The same int32 [batch_size, seq_len + 1] batches on every call, in file order (wrapping around)."""
  tokens = open_tokens(path)
  if len(tokens) < seq_len + 1:
    raise DataError(f"{path} has {len(tokens)} tokens, fewer than one window of {seq_len + 1}; raise "
                    "data.val_fraction or lower model.block_size.")
  n_windows = (len(tokens) - 1) // seq_len
  rows = np.arange(num_batches * batch_size) * shard_count + shard_index
  starts = (rows % n_windows) * seq_len
  windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return list(windows.reshape(num_batches, batch_size, seq_len + 1))
