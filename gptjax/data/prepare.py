"""Corpus -> tokenizer -> train/val token files on disk, built once and then found in the cache."""

import dataclasses
import json
import os
import tempfile

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from gptjax.data.corpus import DataError, corpus_sha256, read_documents
from gptjax.data.tokenizer import Tokenizer, train_tokenizer

# With fewer documents than this, the split cuts inside each document (nanoGPT's 90/10 cut of one file).
_MIN_DOCS_FOR_DOCUMENT_SPLIT = 10
# Documents per encode call: enough for SentencePiece's threads, few enough to bound memory.
_ENCODE_BATCH = 256


@dataclasses.dataclass
class PreparedData:
  """The tokenizer and the token files (with their sizes) that training reads."""
  tokenizer: Tokenizer
  train_path: str
  val_path: str
  train_tokens: int
  val_tokens: int


def split_documents(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """(train, val) texts: the last documents holding ~val_fraction of the characters, or each document's tail."""
  if len(documents) >= _MIN_DOCS_FOR_DOCUMENT_SPLIT:
    ends = np.cumsum([len(d) for d in documents])
    k = int(np.searchsorted(ends, (1 - val_fraction) * ends[-1])) + 1
    k = min(max(k, 1), len(documents) - 1)
    return documents[:k], documents[k:]
  cuts = [int(len(d) * (1 - val_fraction)) for d in documents]
  train = [d[:c] for d, c in zip(documents, cuts)]
  val = [d[c:] for d, c in zip(documents, cuts)]
  return [t for t in train if t], [t for t in val if t]


def prepare(config, workdir: str) -> PreparedData:
  """Tokenizer and token files for config.data; process 0 builds them, the others then read the cache."""
  cache_dir = config.data.cache_dir or os.path.join(workdir, "data")
  if jax.process_count() == 1:
    return _prepare(config.data, cache_dir)
  if jax.process_index() == 0:
    result = _prepare(config.data, cache_dir)
    multihost_utils.sync_global_devices("gptjax.data.prepare")
    return result
  # On a shared disk this finds everything cached; on per-host disks each host builds its own copy.
  multihost_utils.sync_global_devices("gptjax.data.prepare")
  return _prepare(config.data, cache_dir)


def _prepare(data, cache_dir: str) -> PreparedData:
  docs = read_documents(data.path)
  tok = train_tokenizer(docs, data.tokenizer, data.vocab_size, cache_dir)
  corpus = corpus_sha256(docs)
  directory = os.path.join(cache_dir, f"tokens-{tok.fingerprint}-{corpus[:12]}")
  meta = {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "tokenizer_fingerprint": tok.fingerprint,
          "corpus_sha256": corpus, "val_fraction": data.val_fraction}
  tokens = {}
  for name, texts in zip(("train", "val"), split_documents(docs, data.val_fraction)):
    if not texts:
      raise DataError(f"the {name} split of data.path={data.path!r} is empty ({len(docs)} documents, "
                      f"data.val_fraction={data.val_fraction}); add text or change data.val_fraction.")
    path = os.path.join(directory, f"{name}.bin")
    try:
      sidecar = _sidecar(path)
    except DataError:
      sidecar = {}
    if any(sidecar.get(k) != v for k, v in meta.items()):
      sidecar = _write_tokens(path, texts, tok, meta)
    else:
      logging.info("Using cached %s (%d tokens).", path, sidecar["tokens"])
    tokens[name] = sidecar["tokens"]
  return PreparedData(tok, os.path.join(directory, "train.bin"), os.path.join(directory, "val.bin"),
                      tokens["train"], tokens["val"])


def _write_tokens(path: str, texts: list[str], tok: Tokenizer, meta: dict) -> dict:
  """Encodes texts, each followed by EOS, into path (then its sidecar); returns the sidecar."""
  dtype = np.dtype("<u2" if tok.vocab_size <= 1 << 16 else "<u4")  # ids < vocab_size
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  count = 0
  with os.fdopen(fd, "wb") as f:
    for i in range(0, len(texts), _ENCODE_BATCH):
      for ids in tok.encode_batch(texts[i:i + _ENCODE_BATCH]):
        np.append(ids, tok.eos_id).astype(dtype).tofile(f)
        count += len(ids) + 1
  # Replace the data before the sidecar: a sidecar only ever describes a complete file.
  os.replace(tmp, path)
  sidecar = dict(meta, dtype=dtype.name, tokens=count, documents=len(texts))
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  with os.fdopen(fd, "w") as f:
    json.dump(sidecar, f, indent=2)
  os.replace(tmp, _sidecar_path(path))
  logging.info("Wrote %d tokens of %d texts to %s.", count, len(texts), path)
  return sidecar


def _sidecar_path(path: str) -> str:
  return os.path.splitext(path)[0] + ".json"


def _sidecar(path: str) -> dict:
  """The sidecar of a token file, checked against the file's size."""
  sidecar_path = _sidecar_path(path)
  if not os.path.exists(sidecar_path) or not os.path.exists(path):
    raise DataError(f"token file {path!r} or its sidecar {sidecar_path!r} is missing; run data preparation "
                    "(gptjax.data.prepare) first.")
  with open(sidecar_path) as f:
    sidecar = json.load(f)
  size = os.path.getsize(path)
  expected = sidecar["tokens"] * np.dtype(sidecar["dtype"]).itemsize
  if sidecar["tokens"] <= 0 or size != expected:
    raise DataError(f"token file {path!r} has {size} bytes but its sidecar says {sidecar['tokens']} "
                    f"{sidecar['dtype']} tokens ({expected} bytes); delete both files to prepare them again.")
  return sidecar


def open_tokens(path: str) -> np.memmap:
  """A read-only memmap of a token file written by prepare, validated against its sidecar."""
  sidecar = _sidecar(path)
  return np.memmap(path, np.dtype(sidecar["dtype"]).newbyteorder("<"), mode="r", shape=(sidecar["tokens"],))
