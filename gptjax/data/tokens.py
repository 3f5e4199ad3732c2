"""Token files on disk, read through memory maps as one stream of ids: the shards that prepare writes, nanoGPT's
raw uint16 `train.bin`/`val.bin`, and llm.c's shards (a 256-int32 header, then the tokens).

A token set is described by a JSON manifest (`train.json`, `val.json`): the tokenizer it was made with and its
shards, each a byte range of a file (`path` relative to the manifest or absolute, `offset`, `tokens`, `dtype`) and
the file's size in `bytes`, checked on every open so that a truncated or replaced file is never read. A mixture
manifest instead lists other manifests with weights.
"""

import bisect
import os

from absl import logging
import numpy as np

from gptjax import paths
from gptjax.data.corpus import LLMC_MAGIC, DataError

_LLMC_HEADER_BYTES = 256 * 4
# Tokens per read when scanning token files (for their largest id and EOS count): bounded memory.
_SCAN_TOKENS = 1 << 24


def manifest_path(path: str) -> str:
  """The manifest of a token set named by its manifest or by a token file next to it (x.bin -> x.json)."""
  return os.path.splitext(path)[0] + ".json"


def read_manifest(path: str) -> dict:
  """A token set's manifest, with each shard's file checked to exist with the size it had when listed."""
  path = manifest_path(path)
  if not paths.path(path).exists():
    raise DataError(f"token set {path!r} is missing; run data preparation (python -m gptjax.prepare) first.")
  manifest = paths.read_json(path)
  for shard in manifest.get("shards", ()):
    file = paths.join(os.path.dirname(path), shard["path"])
    try:
      size = paths.size(file)
    except FileNotFoundError:
      size = None
    if size != shard["bytes"]:
      raise DataError(f"token file {file} has {size} bytes but {path} lists it with {shard['bytes']}: it was "
                      f"changed, truncated or removed since; delete {os.path.dirname(path)} to prepare it again.")
  return manifest


class TokenStream:
  """Shards (byte ranges of files) as one read-only sequence of ids; memmaps open on first read, so it pickles.

  Remote files are read from local copies (paths.local_copy: downloaded once into the local cache and kept),
  made here, before the stream is handed to Grain's worker processes.
  """

  def __init__(self, shards: list[dict], directory: str = "", name: str = ""):
    self.shards = shards
    # Relative shard paths are relative to `directory`.
    self.files = [paths.local_copy(paths.join(directory, s["path"])) for s in shards]
    self.name = name
    self._starts = np.cumsum([0] + [s["tokens"] for s in shards]).tolist()
    self._maps = None

  def __len__(self) -> int:
    return self._starts[-1]

  def _open(self) -> list[np.memmap]:
    return [np.memmap(file, np.dtype(s["dtype"]).newbyteorder("<"), mode="r", offset=s["offset"], shape=(s["tokens"],))
            for file, s in zip(self.files, self.shards)]

  def read(self, start: int, count: int) -> np.ndarray:
    """Tokens [start, start + count) as int32 (crossing shard boundaries where needed)."""
    if self._maps is None:
      self._maps = self._open()
    if not 0 <= start <= start + count <= len(self):
      raise IndexError(f"tokens [{start}, {start + count}) are outside {self.name} ({len(self)} tokens)")
    i = bisect.bisect_right(self._starts, start) - 1
    lo = start - self._starts[i]
    if lo + count <= self.shards[i]["tokens"]:  # the common case: one shard
      return np.asarray(self._maps[i][lo:lo + count], np.int32)
    parts = []
    while count > 0:
      take = min(count, self.shards[i]["tokens"] - lo)
      parts.append(np.asarray(self._maps[i][lo:lo + take], np.int32))
      count -= take
      i, lo = i + 1, 0
    return np.concatenate(parts)

  def __getitem__(self, index: slice) -> np.ndarray:
    start, stop, step = index.indices(len(self))
    return self.read(start, max(stop - start, 0))[::step]

  def __getstate__(self) -> dict:
    return dict(self.__dict__, _maps=None)

  def __repr__(self) -> str:
    return f"TokenStream({self.name!r}, {len(self)} tokens)"


def open_tokens(path: str) -> TokenStream:
  """The token set at `path` (a manifest, or a token file next to its manifest) as one stream of ids."""
  path = manifest_path(path)
  manifest = read_manifest(path)
  if "mixture" in manifest:
    raise DataError(f"{path} is a mixture of token sets, not one; read it with the data pipeline.")
  return TokenStream(manifest["shards"], os.path.dirname(path), path)


def external_shard(file: str, fmt: str) -> dict:
  """The shard entry of an existing nanoGPT (raw uint16) or llm.c (header + tokens) file, read in place."""
  size = paths.size(file)
  if fmt == "nanogpt":
    if size % 2:
      raise DataError(f"{file} has an odd size ({size} bytes) but nanoGPT token files are uint16 (2 bytes per "
                      "token): it is not one; set data.format to what it is.")
    return {"path": paths.absolute(file), "offset": 0, "tokens": size // 2, "dtype": "uint16", "bytes": size}
  with paths.path(file).open("rb") as f:
    header = np.frombuffer(f.read(_LLMC_HEADER_BYTES), "<i4")
  if len(header) < 3 or header[0] != LLMC_MAGIC or header[1] not in (1, 2):
    raise DataError(f"{file} is not an llm.c token shard (it needs magic {LLMC_MAGIC} and version 1 or 2 in its "
                    "first 256 int32); set data.format='nanogpt' for raw uint16 tokens.")
  dtype = np.dtype("uint16" if header[1] == 1 else "uint32")
  expected = _LLMC_HEADER_BYTES + int(header[2]) * dtype.itemsize
  if size != expected:
    raise DataError(f"{file}: its llm.c header says {int(header[2])} {dtype.name} tokens ({expected} bytes with the "
                    f"header) but the file has {size} bytes: it is truncated or corrupt; copy or export it again.")
  return {"path": paths.absolute(file), "offset": _LLMC_HEADER_BYTES, "tokens": int(header[2]),
          "dtype": dtype.name, "bytes": size}


def check_shards(shards: list[dict], tokenizer) -> int:
  """Checks that existing token files fit the tokenizer (dtype and largest id); returns their EOS count."""
  documents = 0
  for shard in shards:
    file = shard["path"]
    if np.iinfo(shard["dtype"]).max + 1 < tokenizer.vocab_size:
      raise DataError(f"{file} holds {shard['dtype']} ids but the {tokenizer.kind} tokenizer has "
                      f"{tokenizer.vocab_size} tokens, more than {shard['dtype']} can hold: the file was made with "
                      "another tokenizer; set data.tokenizer_path to the one that made it.")
    tokens = TokenStream([shard])
    largest = 0
    for start in range(0, len(tokens), _SCAN_TOKENS):
      chunk = tokens.read(start, min(_SCAN_TOKENS, len(tokens) - start))
      largest = max(largest, int(chunk.max()))
      documents += int(np.count_nonzero(chunk == tokenizer.eos_id))
    if largest >= tokenizer.vocab_size:
      raise DataError(f"{file} holds token id {largest} but the {tokenizer.kind} tokenizer has only "
                      f"{tokenizer.vocab_size} tokens: the file was made with another tokenizer (or is not "
                      f"{shard['dtype']}); set data.tokenizer_path to the tokenizer that made it.")
  return documents


def split_shards(shards: list[dict], fraction: float, eos_id: int) -> tuple[list[dict], list[dict]]:
  """(train, val) shards: the last ~fraction of the tokens is val, cut just after an EOS (a document boundary)."""
  total = sum(s["tokens"] for s in shards)
  cut = int(total * (1 - fraction))
  stream = TokenStream(shards)
  for start in range(max(cut - 1, 0), total, _SCAN_TOKENS):  # from cut - 1: the cut may be a boundary already
    eos = np.flatnonzero(stream.read(start, min(_SCAN_TOKENS, total - start)) == eos_id)
    if len(eos):
      cut = start + int(eos[0]) + 1
      break
  else:
    logging.warning("No end-of-text token after token %d of %d: the validation split cuts inside a document.",
                    cut, total)
  if not 0 < cut < total:
    raise DataError(f"cannot split {total} tokens of {shards[0]['path']} at a document boundary for "
                    f"data.val_fraction={fraction}: give a separate data.val_path or change data.val_fraction.")
  train, val, start = [], [], 0
  for shard in shards:
    end = start + shard["tokens"]
    itemsize = np.dtype(shard["dtype"]).itemsize
    if start < cut:
      train.append(dict(shard, tokens=min(end, cut) - start))
    if end > cut:
      skip = max(cut - start, 0)
      val.append(dict(shard, offset=shard["offset"] + skip * itemsize, tokens=shard["tokens"] - skip))
    start = end
  return train, val
