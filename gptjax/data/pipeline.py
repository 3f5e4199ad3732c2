"""Batches of token windows from a token set (or a weighted mixture of them): shuffled Grain pipelines for
training, fixed ones for eval.

Window i holds tokens [i*seq_len, (i+1)*seq_len] (seq_len + 1 of them, overlapping the next window by one):
inputs are window[:-1], targets window[1:]. Windows are always full, so no position reads past the data. Training
windows are shifted by a per-epoch offset in [0, seq_len), so later epochs see new contexts rather than the same
cut (like nanoGPT's random offsets, but exhaustive). A mixture draws from its token sets in proportion to their
weights (Grain's deterministic MapDataset.mix), each set with its own shuffle and epochs. Both pipelines give shard
s of S the global items s, s+S, s+2S, ..., so the S shards of one step together read one contiguous run of the
global order, whatever S is.
"""

import functools
import os

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


def train_batches(path: str, seq_len: int, batch_size: int, seed: int, shard_index: int, shard_count: int,
                  num_workers: int = 0) -> grain.DatasetIterator:
  """Endless int32 [batch_size, seq_len + 1] batches, reshuffled each epoch; supports get_state/set_state."""
  ds, n_windows = _windows(path, seq_len, seed)
  if n_windows < batch_size * shard_count:  # the stream is endless, so a step can span epochs: warn only
    logging.warning("%s has %d windows of %d tokens but one step reads %d: each step repeats windows (more "
                    "than one epoch per step); add data or lower train.batch_size for a real run.", path, n_windows,
                    seq_len + 1, batch_size * shard_count)
  ds = ds[shard_index::shard_count].batch(batch_size, drop_remainder=True)
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
  ds, _ = _windows(path, seq_len, seed=None)
  rows = np.arange(num_batches * batch_size) * shard_count + shard_index
  windows = np.stack([ds[int(row)] for row in rows])
  return list(windows.reshape(num_batches, batch_size, seq_len + 1))
