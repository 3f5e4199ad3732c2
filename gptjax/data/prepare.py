"""Corpora -> tokenizer -> train/val token sets on disk: built once with every core, resumable, then cached.

The documents of each corpus are read in order, split into train/val, and encoded by a pool of worker processes
into token shards of at most _SHARD_TOKENS. A shard is written under a temporary name and renamed when complete;
`progress.json` records the finished shards and how many documents they hold, so an interrupted run resumes after
the last finished shard. Manifests (`train.json`, `val.json`) are written last: their presence means done.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import fractions
import glob
import hashlib
import itertools
import math
import multiprocessing
import os
import re

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from gptjax import config as config_lib, paths
from gptjax.data import tokens as tokens_lib
from gptjax.data.corpus import DataError, Corpus, open_corpus
from gptjax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

# With fewer documents than this, the split cuts inside each document (nanoGPT's 90/10 cut of one file).
_MIN_DOCS_FOR_DOCUMENT_SPLIT = 10
# Characters of text per encoding task: enough to amortise the inter-process transfer, small enough to balance.
_CHUNK_CHARS = 1 << 20
# Longer documents are encoded in pieces of about this many characters: SentencePiece's BPE slows down on long
# inputs (3 vs 7 MB/s per core at 1M vs 4K characters) and spreads a batch's inputs over its threads.
_PIECE_CHARS = 1 << 13
# Tokens per shard: the unit of resumption after an interruption.
_SHARD_TOKENS = 1 << 27
# Below this much text, encoding in this process beats starting worker processes.
_POOL_MIN_CHARS = 8 << 20
_SPLITS = ("train", "val")
_PROGRESS = "progress.json"


@dataclasses.dataclass
class PreparedData:
  """The tokenizer and the token sets (manifests, with their sizes) that training reads."""
  tokenizer: Tokenizer
  train_path: str
  val_path: str
  train_tokens: int
  val_tokens: int


def parse_mixture(mixture: str) -> list[tuple[str, float]]:
  """[(path, weight)] of 'path1:0.7,path2:0.3' ('' = none); paths may contain ':' (the weight is last)."""
  if not mixture.strip():
    return []
  parts = []
  for item in mixture.split(","):
    path, _, weight = item.strip().rpartition(":")
    try:
      value = float(weight)
    except ValueError:
      value = 0.0
    if not path or not 0 < value < math.inf:
      raise DataError(f"data.mixture={mixture!r}: {item.strip()!r} is not 'path:weight' with a positive weight; "
                      "write e.g. 'books/*.txt:0.7,web.jsonl:0.3'.")
    parts.append((path, value))
  return parts


def prepare(config, workdir: str) -> PreparedData:
  """Tokenizer and token sets for config.data; process 0 builds them, the others then read the cache."""
  cache_dir = config.data.cache_dir or os.path.join(workdir, "data")
  if jax.process_count() == 1:
    return _prepare(config, cache_dir)
  if jax.process_index() == 0:
    result = _prepare(config, cache_dir)
    multihost_utils.sync_global_devices("gptjax.data.prepare")
    return result
  # On a shared disk this finds everything cached; on per-host disks each host builds its own copy.
  multihost_utils.sync_global_devices("gptjax.data.prepare")
  return _prepare(config, cache_dir)


def _open(data, path: str) -> Corpus:
  return open_corpus(path, data.format, data.text_field, data.max_documents)


def _prepare(config, cache_dir: str) -> PreparedData:
  data = config.data
  mixture = parse_mixture(data.mixture) or [(data.path, 1.0)]
  corpora = [_open(data, path) for path, _ in mixture]
  val_corpus = _open(data, data.val_path) if data.val_path else None
  tok = _tokenizer(data, corpora + [val_corpus] * bool(val_corpus), cache_dir)
  config_lib.check_vocab(config, tok.vocab_size)  # before hours of encoding, not after
  if val_corpus:  # all of data.path is training data (but for token files named as val); val_path validates
    sets = [_build([(part, "train") for part, rule in _entries(c) if rule != "val"], tok, data.val_fraction,
                   cache_dir)[0] for c in corpora]
    val_sets = [_build([(val_corpus, "val")], tok, data.val_fraction, cache_dir)[1]]
    val_weights = [1.0]
  else:
    sets, val_sets = zip(*(_build(_entries(c), tok, data.val_fraction, cache_dir) for c in corpora))
    val_weights = [w for _, w in mixture]
  train_path = _mixture(sets, [w for _, w in mixture], tok, cache_dir)
  val_path = _mixture(val_sets, val_weights, tok, cache_dir)
  return PreparedData(tok, train_path, val_path, _tokens(train_path), _tokens(val_path))


def _tokens(path: str) -> int:
  return tokens_lib.read_manifest(path)["tokens"]


def _entries(corpus: Corpus) -> list[tuple[Corpus, str]]:
  """(corpus, split rule) of one data path: 'split' by data.val_fraction, except a directory of token files
  whose names say 'val' (nanoGPT's val.bin, llm.c's *_val_*.bin): those are the validation set."""
  val = tuple(f for f in corpus.files if "val" in os.path.basename(f[0]))
  train = tuple(f for f in corpus.files if f not in val)
  if corpus.is_tokens and paths.is_dir(corpus.path) and val and train:
    return [(dataclasses.replace(corpus, files=train), "train"), (dataclasses.replace(corpus, files=val), "val")]
  return [(corpus, "split")]


def _tokenizer(data, corpora: list[Corpus], cache_dir: str) -> Tokenizer:
  """The tokenizer at data.tokenizer_path, or one trained on the document corpora (and cached)."""
  if data.tokenizer_path:
    tok = load_tokenizer(data.tokenizer_path)
    if tok.kind != data.tokenizer:
      raise DataError(f"data.tokenizer_path={data.tokenizer_path!r} holds a {tok.kind} tokenizer but "
                      f"data.tokenizer={data.tokenizer!r}; set data.tokenizer={tok.kind!r}.")
    return tok
  token_corpus = next((c for c in corpora if c.is_tokens), None)
  if token_corpus:
    raise DataError(f"{token_corpus.path!r} holds token ids ({token_corpus.files[0][1]} files), which only the "
                    "tokenizer that made them can read: set data.tokenizer='gpt2' and data.tokenizer_path=<a "
                    "directory with its vocab.json and merges.txt> (or a saved tokenizer directory).")
  key = hashlib.sha256("".join(c.fingerprint for c in corpora).encode()).hexdigest()[:12]
  texts = (text for c in corpora for text, _ in c.documents())
  return train_tokenizer(texts, data.tokenizer, data.vocab_size, cache_dir, key, sum(c.size_bytes for c in corpora))


def _build(entries: list[tuple[Corpus, str]], tok: Tokenizer, val_fraction: float,
           cache_dir: str) -> tuple[str | None, str | None]:
  """(train, val) manifests of the entries' token sets, built or found in the cache (None: a split is empty)."""
  key = hashlib.sha256(repr([(c.fingerprint, rule) for c, rule in entries] +
                            [val_fraction] * any(rule == "split" for _, rule in entries)).encode()).hexdigest()
  directory = os.path.join(cache_dir, f"tokens-{tok.fingerprint}-{key[:12]}")
  manifests = {split: os.path.join(directory, f"{split}.json") for split in _SPLITS}
  wanted = {split for _, rule in entries for split in (_SPLITS if rule == "split" else (rule,))}
  if all(paths.path(manifests[s]).exists() for s in wanted):
    for split in wanted:
      manifest = tokens_lib.read_manifest(manifests[split])
      if manifest["tokenizer_fingerprint"] != tok.fingerprint:
        raise DataError(f"{manifests[split]} was made with tokenizer {manifest['tokenizer_fingerprint']} but the "
                        f"tokenizer is {tok.fingerprint}; delete {directory} to prepare it again.")
    logging.info("Using the cached token sets in %s.", directory)
    return tuple(manifests[s] if s in wanted else None for s in _SPLITS)
  shards = {split: [] for split in _SPLITS}
  documents = dict.fromkeys(_SPLITS, 0)
  text_entries = [(c, rule) for c, rule in entries if not c.is_tokens]
  if text_entries:
    encoded = _encode(text_entries, tok, val_fraction, directory)
    for split in _SPLITS:
      shards[split] += encoded["shards"][split]
      documents[split] += encoded["documents"][split]
  for corpus, rule in entries:
    if corpus.is_tokens:  # read in place: the manifest lists byte ranges of the user's own files
      found = [tokens_lib.external_shard(f, fmt) for f, fmt in corpus.files]
      if rule == "split":
        parts = zip(_SPLITS, tokens_lib.split_shards(found, val_fraction, tok.eos_id))
      else:
        parts = [(rule, found)]
      for split, part in parts:
        documents[split] += tokens_lib.check_shards(part, tok)
        shards[split] += part
  for split in sorted(wanted):
    count = sum(s["tokens"] for s in shards[split])
    if not count:
      sources = ", ".join(repr(c.path) for c, _ in entries)
      raise DataError(f"the {split} split of {sources} is empty (data.val_fraction={val_fraction}); add text or "
                      "change data.val_fraction.")
    paths.write_json(manifests[split], {
        "tokens": count, "documents": documents[split], "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "tokenizer_fingerprint": tok.fingerprint, "sources": [c.path for c, _ in entries],
        "shards": shards[split]})
    logging.info("Wrote %s: %d tokens of %d documents.", manifests[split], count, documents[split])
  return tuple(manifests[s] if s in wanted else None for s in _SPLITS)


def _mixture(sets: list[str], weights: list[float], tok: Tokenizer, cache_dir: str) -> str:
  """The token set itself, or for several a mixture manifest that draws from each in proportion to its weight."""
  if len(sets) == 1:
    return sets[0]
  key = hashlib.sha256(repr(list(zip(sets, weights))).encode()).hexdigest()
  path = os.path.join(cache_dir, f"mixture-{key[:12]}.json")
  if paths.path(path).exists():  # the key covers the sets' contents: nothing to update
    return path
  paths.write_json(path, {
      "tokens": sum(map(_tokens, sets)), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
      "tokenizer_fingerprint": tok.fingerprint,
      "mixture": [{"path": paths.relative(p, cache_dir), "weight": w} for p, w in zip(sets, weights)]})
  return path


def _items(entries: list[tuple[Corpus, str]], val_fraction: float):
  """(split, text, source bytes) of every document of the entries in order, whole or cut in two."""
  fraction = fractions.Fraction(repr(val_fraction))  # exact: 0.1 is 1/10, not the float's 0.1000...0555
  for corpus, rule in entries:
    n = corpus.num_documents
    few = rule == "split" and n is not None and n < _MIN_DOCS_FOR_DOCUMENT_SPLIT
    for i, (text, n_bytes) in enumerate(corpus.documents()):
      if rule != "split":
        yield rule, text, n_bytes
      elif few:
        cut = int(len(text) * (1 - val_fraction))
        yield "train", text[:cut], n_bytes
        yield "val", text[cut:], 0
      else:
        # Document i is val when i * val_fraction crosses an integer: evenly spread, starting with the first.
        yield ("val" if math.ceil((i + 1) * fraction) > math.ceil(i * fraction) else "train"), text, n_bytes


# Where a long document may be cut for encoding in parallel: after a newline between two non-spaces. Every
# tokenizer here makes such a newline a token of its own (SentencePiece's user symbol; GPT-2's pre-tokenizer), so
# the ids of the pieces, joined, are the ids of the document.
_PIECE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def _pieces(text: str):
  """(piece, is the last) of text, cut at _PIECE_CUT after every _PIECE_CHARS characters or so."""
  start = 0
  while len(text) - start > _PIECE_CHARS and (cut := _PIECE_CUT.search(text, start + _PIECE_CHARS)):
    yield text[start:cut.end()], False
    start = cut.end()
  if start < len(text):
    yield text[start:], True


def _chunks(items):
  """Groups items into encoding tasks of about _CHUNK_CHARS characters: ([(split, text, ends a document)],
  {"items": items finished, "bytes": source bytes finished, "complete": ends at a document boundary})."""
  chunk, chars, meta = [], 0, {"items": 0, "bytes": 0}
  for split, text, size in items:
    for piece, last in _pieces(text):
      chunk.append((split, piece, last))
      chars += len(piece)
      if chars >= _CHUNK_CHARS and not last:  # mid-document: the items and bytes go with the last piece
        yield chunk, dict(meta, complete=False)
        chunk, chars, meta = [], 0, {"items": 0, "bytes": 0}
    meta["items"] += 1
    meta["bytes"] += size
    if chars >= _CHUNK_CHARS:
      yield chunk, dict(meta, complete=True)
      chunk, chars, meta = [], 0, {"items": 0, "bytes": 0}
  if meta["items"]:
    yield chunk, dict(meta, complete=True)


def _encode_chunk(tok: Tokenizer, chunk: list[tuple[str, str, bool]], dtype: np.dtype) -> dict:
  """{split: (tokens of its texts, EOS after each document's last piece, as dtype; documents ended)}."""
  ids = tok.encode_batch([text for _, text, _ in chunk])
  out = {}
  for split in _SPLITS:
    parts = [np.append(x, tok.eos_id) if last else x for (s, _, last), x in zip(chunk, ids) if s == split]
    ended = sum(last for s, _, last in chunk if s == split)
    out[split] = (np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype), ended)
  return out


_worker_tokenizer = None


def _init_worker(tok: Tokenizer) -> None:
  global _worker_tokenizer
  tok.threads = 1  # the pool already keeps every core busy
  _worker_tokenizer = tok


def _encode_in_worker(chunk: list[tuple[str, str, bool]], dtype: np.dtype) -> dict:
  return _encode_chunk(_worker_tokenizer, chunk, dtype)


def _encoded(chunks, tok: Tokenizer, dtype: np.dtype):
  """Yields (_encode_chunk result, chunk meta) in order: in this process at first, then in a pool of one worker
  process per core once the text outgrows _POOL_MIN_CHARS (starting processes costs about a second), unless the
  tokenizer's own threads already use every core."""
  pending = collections.deque()
  pool, chars = None, 0
  workers = os.cpu_count() or 1
  try:
    for chunk, meta in chunks:
      chars += sum(len(text) for _, text, _ in chunk)
      if pool is None and workers > 1 and chars > _POOL_MIN_CHARS and not tok.saturates_cores:
        # forkserver, not fork: this process runs JAX's threads, which a forked child must not inherit.
        pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("forkserver"),
                                                      initializer=_init_worker, initargs=(tok,))
      if pool is None:
        future = concurrent.futures.Future()
        future.set_result(_encode_chunk(tok, chunk, dtype))
      else:
        future = pool.submit(_encode_in_worker, chunk, dtype)
      pending.append((future, meta))
      while len(pending) > 2 * workers or (pending and pending[0][0].done()):
        future, meta = pending.popleft()
        yield future.result(), meta
    for future, meta in pending:
      yield future.result(), meta
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)


class _ShardWriter:
  """Appends encoded chunks to the current train and val shards; every _SHARD_TOKENS it finishes both and records
  the progress, which then covers exactly the finished shards."""

  def __init__(self, directory: str, dtype: np.dtype, progress: dict):
    self.directory, self.dtype, self.progress = directory, dtype, progress
    self._files = {}  # split: (shard name, file being written)
    self._writing = contextlib.ExitStack()

  def add(self, encoded: dict, meta: dict) -> None:
    for split, (ids, n_docs) in encoded.items():
      if len(ids):
        if split not in self._files:
          name = f"{split}-{len(self.progress['shards'][split]):05d}.bin"
          # Under a temporary name (locally .tmp-*) until finished: never taken as a shard before.
          f = self._writing.enter_context(paths.atomic_write(os.path.join(self.directory, name), "wb"))
          self._files[split] = name, f
        ids.tofile(self._files[split][1])
      self.progress["documents"][split] += n_docs
    self.progress["items"] += meta["items"]
    self.progress["bytes"] += meta["bytes"]
    if meta["complete"] and any(f.tell() >= _SHARD_TOKENS * self.dtype.itemsize for _, f in self._files.values()):
      self.finish()

  def finish(self) -> None:
    """Completes the current shards under their final names, then records them in progress.json."""
    sizes = {split: f.tell() for split, (_, f) in self._files.items()}
    self._writing.close()
    for split, (name, _) in self._files.items():
      self.progress["shards"][split].append({"path": name, "offset": 0, "tokens": sizes[split] // self.dtype.itemsize,
                                             "dtype": self.dtype.name, "bytes": sizes[split]})
    self._files = {}
    paths.write_json(os.path.join(self.directory, _PROGRESS), self.progress)


def _encode(entries: list[tuple[Corpus, str]], tok: Tokenizer, val_fraction: float, directory: str) -> dict:
  """Encodes the documents of entries into shards in directory, resuming after the shards of an earlier run;
  returns the final progress record: {"shards": {split: [...]}, "documents": {split: n}, ...}."""
  paths.makedirs(directory)
  for stale in paths.glob_files(os.path.join(glob.escape(directory), ".tmp-*")):
    paths.path(stale).unlink()  # a shard that an interrupted run was writing: never taken as finished
  progress_path = os.path.join(directory, _PROGRESS)
  progress = {"items": 0, "bytes": 0, "shards": {s: [] for s in _SPLITS}, "documents": dict.fromkeys(_SPLITS, 0)}
  if paths.path(progress_path).exists():
    progress = paths.read_json(progress_path)
    logging.info("Resuming %s after %d finished documents.", directory, progress["items"])
  dtype = np.dtype("<u2" if tok.vocab_size <= 1 << 16 else "<u4")  # ids < vocab_size
  total = sum(c.size_bytes for c, _ in entries)
  bar = tqdm(total=total or None, initial=progress["bytes"], unit="B", unit_scale=True, dynamic_ncols=True,
             desc=f"encoding {', '.join(c.path or 'built-in corpus' for c, _ in entries)}",
             disable=jax.process_index() != 0)
  writer = _ShardWriter(directory, dtype, progress)
  items = itertools.islice(_items(entries, val_fraction), progress["items"], None)
  for encoded, meta in _encoded(_chunks(items), tok, dtype):
    writer.add(encoded, meta)
    bar.update(meta["bytes"])
  writer.finish()
  bar.close()
  return progress
