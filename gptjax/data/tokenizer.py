"""Tokenizers that round-trip any text exactly: SentencePiece BPE/unigram with byte fallback, or characters."""

import abc
import hashlib
import io
import itertools
import json
import os
import shutil
import tempfile
import time

from absl import logging
import numpy as np
import sentencepiece as spm

from gptjax.data.corpus import DataError, corpus_sha256

KINDS = ("bpe", "unigram", "char")
_META = "tokenizer.json"
_MODEL = "tokenizer.model"
# SentencePiece trains on at most this many characters, sampled evenly over the corpus: more costs time, not quality.
_TRAIN_CHARS = 20_000_000
# Training sentences are runs of whole lines up to this length; SentencePiece drops longer sentences.
_CHUNK_CHARS = 4096
# SentencePiece writes spaces as U+2581, so a literal U+2581 would decode as a space: encode it as raw bytes.
_SPACE = "\u2581"


class Tokenizer(abc.ABC):
  """Text <-> int32 ids. `payload` is the serialized tokenizer; its hash is the fingerprint."""

  def __init__(self, kind: str, payload: bytes, vocab_size: int, eos_id: int):
    self.kind = kind
    self.payload = payload
    self.vocab_size = vocab_size
    self.eos_id = eos_id
    self.fingerprint = hashlib.sha256(payload).hexdigest()[:16]

  def encode(self, text: str) -> np.ndarray:
    """The int32 ids of text, without EOS."""
    return self.encode_batch([text])[0]

  @abc.abstractmethod
  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """encode() of many texts at once (faster)."""

  def decode(self, ids) -> str:
    """The text of ids; EOS and ids outside the tokenizer (model-vocabulary padding) are skipped."""
    ids = np.asarray(ids, np.int64).ravel()
    return self._decode(ids[(ids >= 0) & (ids < self.vocab_size) & (ids != self.eos_id)])

  @abc.abstractmethod
  def _decode(self, ids: np.ndarray) -> str:
    """decode() of ids that are all valid, non-EOS tokens."""

  def save(self, directory: str) -> None:
    """Writes the tokenizer into directory; load_tokenizer(directory) reads it back."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _MODEL), "wb") as f:
      f.write(self.payload)
    meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
            "fingerprint": self.fingerprint}
    with open(os.path.join(directory, _META), "w") as f:  # written last: its presence marks a complete save
      json.dump(meta, f, indent=2)


class SentencePieceTokenizer(Tokenizer):
  """SentencePiece 'bpe' or 'unigram' model; unknown characters fall back to their UTF-8 bytes."""

  def __init__(self, kind: str, payload: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=payload)
    super().__init__(kind, payload, self._sp.vocab_size(), self._sp.eos_id())
    self._space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE.encode()]

  @classmethod
  def train(cls, documents: list[str], kind: str, vocab_size: int) -> "SentencePieceTokenizer":
    """Trains on an even sample of at most _TRAIN_CHARS characters of the documents."""
    total = sum(map(len, documents))
    step = -(-total // _TRAIN_CHARS)
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=itertools.islice(_line_chunks(documents), 0, None, step),
          model_writer=model,
          model_type=kind,
          vocab_size=vocab_size,
          hard_vocab_limit=False,  # a small corpus yields fewer tokens (warned below) rather than an error
          # Exact round-trips: no normalisation, whitespace kept as is, bytes for unseen characters.
          normalization_rule_name="identity",
          add_dummy_prefix=False,
          remove_extra_whitespaces=False,
          allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become single tokens
          byte_fallback=True,
          user_defined_symbols=["\n", "\t", "\r"],
          character_coverage=0.9999,
          unk_id=0,  # required by SentencePiece; never produced thanks to byte fallback
          eos_id=1,
          bos_id=-1,
          pad_id=-1,
          max_sentence_length=4 * _CHUNK_CHARS,  # bytes: up to 4 per character
          num_threads=os.cpu_count(),
          minloglevel=1)
    except RuntimeError as e:
      raise DataError(f"SentencePiece cannot train a {kind} tokenizer with data.vocab_size={vocab_size} on this "
                      f"corpus of {total} characters ({e}); choose a data.vocab_size it allows, or add text.") from e
    tokenizer = cls(kind, model.getvalue())
    if tokenizer.vocab_size < vocab_size:
      logging.warning("The corpus (%d characters) supports only %d of the requested data.vocab_size=%d %s "
                      "tokens; using %d. Add text for a larger vocabulary.", total, tokenizer.vocab_size, vocab_size,
                      kind, tokenizer.vocab_size)
    return tokenizer

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    parts = [text.split(_SPACE) for text in texts]
    encoded = iter(self._sp.encode([p for ps in parts for p in ps], num_threads=os.cpu_count()))
    out = []
    for ps in parts:
      ids = next(encoded)
      for _ in ps[1:]:
        ids = ids + self._space_ids + next(encoded)
      out.append(np.array(ids, np.int32))
    return out

  def _decode(self, ids: np.ndarray) -> str:
    return self._sp.decode(ids.tolist())


class CharTokenizer(Tokenizer):
  """One id per character of the corpus (sorted by code point); EOS is the last id."""

  def __init__(self, payload: bytes):
    self._codes = np.array(json.loads(payload), np.uint32)
    super().__init__("char", payload, len(self._codes) + 1, len(self._codes))

  @classmethod
  def train(cls, documents: list[str]) -> "CharTokenizer":
    """The characters that occur in the documents."""
    codes = sorted({ord(c) for doc in documents for c in set(doc)})
    return cls(json.dumps(codes).encode())

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self._encode(text) for text in texts]

  def _encode(self, text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), np.uint32)
    ids = np.searchsorted(self._codes, codes)
    unseen = self._codes[np.minimum(ids, len(self._codes) - 1)] != codes
    if unseen.any():
      c = chr(codes[np.argmax(unseen)])
      raise DataError(f"character {c!r} (U+{ord(c):04X}) is not among the {len(self._codes)} characters of the "
                      "char tokenizer's corpus, so a character-level model cannot represent it; remove it from "
                      "the text or use data.tokenizer='bpe'.")
    return ids.astype(np.int32)

  def _decode(self, ids: np.ndarray) -> str:
    return self._codes[ids].astype("<u4").tobytes().decode("utf-32-le", errors="surrogatepass")


def _line_chunks(documents: list[str]):
  """Yields runs of whole lines (newlines kept) of at most _CHUNK_CHARS; longer lines are cut."""
  for doc in documents:
    chunk = ""
    for line in doc.splitlines(keepends=True):
      if chunk and len(chunk) + len(line) > _CHUNK_CHARS:
        yield chunk
        chunk = ""
      chunk += line
      while len(chunk) > _CHUNK_CHARS:
        yield chunk[:_CHUNK_CHARS]
        chunk = chunk[_CHUNK_CHARS:]
    if chunk:
      yield chunk


def load_tokenizer(directory: str) -> Tokenizer:
  """Reads a tokenizer written by Tokenizer.save."""
  meta_path = os.path.join(directory, _META)
  if not os.path.exists(meta_path):
    raise DataError(f"no tokenizer in {directory!r} ({_META} is missing); give a directory written by "
                    "Tokenizer.save, or train one with train_tokenizer.")
  with open(meta_path) as f:
    meta = json.load(f)
  with open(os.path.join(directory, _MODEL), "rb") as f:
    payload = f.read()
  tok = CharTokenizer(payload) if meta["kind"] == "char" else SentencePieceTokenizer(meta["kind"], payload)
  if tok.fingerprint != meta["fingerprint"]:
    raise DataError(f"{directory!r}: {_MODEL} has fingerprint {tok.fingerprint} but {_META} says "
                    f"{meta['fingerprint']}; the files are corrupt or mixed up: delete the directory to retrain.")
  return tok


def train_tokenizer(documents: list[str], kind: str, vocab_size: int, cache_dir: str) -> Tokenizer:
  """The tokenizer of this corpus, from cache_dir/tokenizer-<kind>-<vocab>-<corpus hash>/ or trained and cached."""
  if kind not in KINDS:
    raise DataError(f"data.tokenizer={kind!r}: use one of {KINDS}.")
  if not any(documents):
    raise DataError("cannot train a tokenizer on an empty corpus; check data.path.")
  size = 0 if kind == "char" else vocab_size  # a char vocabulary is whatever the corpus holds
  directory = os.path.join(cache_dir, f"tokenizer-{kind}-{size}-{corpus_sha256(documents)[:12]}")
  if os.path.exists(os.path.join(directory, _META)):
    return load_tokenizer(directory)
  start = time.time()
  tok = CharTokenizer.train(documents) if kind == "char" else SentencePieceTokenizer.train(documents, kind, size)
  logging.info("Trained a %s tokenizer (%d tokens) in %.1f s; caching it in %s.", kind, tok.vocab_size,
               time.time() - start, directory)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-tokenizer-")
  tok.save(tmp)
  try:
    os.rename(tmp, directory)  # atomic: a half-written tokenizer is never found in the cache
  except OSError:  # another process cached one first; use it so that all processes agree
    shutil.rmtree(tmp)
    return load_tokenizer(directory)
  return tok
