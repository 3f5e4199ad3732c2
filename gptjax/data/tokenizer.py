"""Tokenizers that round-trip any text exactly: SentencePiece BPE/unigram with byte fallback, characters, or
GPT-2's byte-level BPE loaded from its vocab.json + merges.txt."""

import abc
import concurrent.futures
import functools
import hashlib
import io
import itertools
import json
import os
import shutil
import tempfile
import time
from typing import Iterable

from absl import logging
import numpy as np
import sentencepiece as spm
import tiktoken

from gptjax import paths
from gptjax.data.corpus import DataError, corpus_sha256

# Kinds trained on the corpus; 'gpt2' is loaded from data.tokenizer_path.
TRAINED_KINDS = ("bpe", "unigram", "char")
_META = "tokenizer.json"
_MODEL = "tokenizer.model"
_GPT2_FILES = ("vocab.json", "merges.txt")
_GPT2_EOS = "<|endoftext|>"
# SentencePiece trains on at most this many characters, sampled evenly over the corpus: more costs time, not quality.
_TRAIN_CHARS = 20_000_000
# Training sentences are runs of whole lines up to this length; SentencePiece drops longer sentences.
_CHUNK_CHARS = 4096
# SentencePiece writes spaces as U+2581, so a literal U+2581 would decode as a space: encode it as raw bytes.
_SPACE = "\u2581"


class Tokenizer(abc.ABC):
  """Text <-> int32 ids. `payload` is the serialized tokenizer; its hash is the fingerprint."""

  # Threads an encode_batch call may use; 1 in the worker processes of a pool that already uses every core.
  threads = os.cpu_count()
  # Whether encode_batch alone keeps every core busy (GIL-free threads and little Python per text): then a pool of
  # worker processes only adds pickling (gptjax.data.prepare).
  saturates_cores = False

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

  def __reduce__(self):
    # Pickled as its payload (SentencePiece processors do not pickle): pool workers rebuild their own.
    return from_payload, (self.kind, self.payload)

  def files(self) -> dict[str, bytes]:
    """The files `save` writes, by name (`from_saved` reads them back)."""
    meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
            "fingerprint": self.fingerprint}
    return {_MODEL: self.payload, _META: json.dumps(meta, indent=2).encode()}

  def save(self, directory: str) -> None:
    """Writes the tokenizer into directory; load_tokenizer(directory) reads it back."""
    paths.makedirs(directory)
    for name, content in self.files().items():  # _META last: its presence marks a complete save
      paths.path(os.path.join(directory, name)).write_bytes(content)


class SentencePieceTokenizer(Tokenizer):
  """SentencePiece 'bpe' or 'unigram' model; unknown characters fall back to their UTF-8 bytes."""

  def __init__(self, kind: str, payload: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=payload)
    super().__init__(kind, payload, self._sp.vocab_size(), self._sp.eos_id())
    self._space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE.encode()]

  @classmethod
  def train(cls, documents: Iterable[str], kind: str, vocab_size: int, total_chars: int) -> "SentencePieceTokenizer":
    """Trains on an even sample of at most _TRAIN_CHARS characters of documents (of about total_chars)."""
    sampled = [0]

    def sample():
      step = max(1, -(-total_chars // _TRAIN_CHARS))
      for chunk in itertools.islice(_line_chunks(documents), 0, None, step):
        sampled[0] += len(chunk)
        yield chunk
        if sampled[0] >= _TRAIN_CHARS:  # total_chars was an estimate (or 0 = unknown): stop at the budget
          return
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=sample(),
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
      raise DataError(f"SentencePiece cannot train a {kind} tokenizer with data.vocab_size={vocab_size} on a "
                      f"sample of {sampled[0]} characters ({e}); choose a data.vocab_size it allows, or add "
                      "text.") from e
    tokenizer = cls(kind, model.getvalue())
    if tokenizer.vocab_size < vocab_size:
      logging.warning("The corpus (a sample of %d characters) supports only %d of the requested "
                      "data.vocab_size=%d %s tokens; using %d. Add text for a larger vocabulary.", sampled[0],
                      tokenizer.vocab_size, vocab_size, kind, tokenizer.vocab_size)
    return tokenizer

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    parts = [text.split(_SPACE) for text in texts]
    encoded = iter(self._sp.encode([p for ps in parts for p in ps], num_threads=self.threads))
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
  def train(cls, documents: Iterable[str]) -> "CharTokenizer":
    """The characters that occur in the documents."""
    codes = sorted({ord(c) for doc in documents for c in set(doc)})
    if not codes:
      raise DataError("cannot train a char tokenizer on an empty corpus; check data.path.")
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


# GPT-2's pre-tokenizer (OpenAI's encoder.py): contractions, letter runs, digit runs, other symbols, whitespace, each
# with one leading space. \s is Unicode's White_Space, as in the `regex` package that GPT-2 used.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.cache
def _byte_chars() -> tuple[str, ...]:
  """GPT-2's printable stand-in character for each byte value (so no merge sees a space or control byte)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  chars = dict(zip(printable, printable)) | {b: 256 + i for i, b in enumerate(others)}
  return tuple(chr(chars[b]) for b in range(256))


@functools.cache
def _thread_pool(pid: int, threads: int) -> concurrent.futures.ThreadPoolExecutor:
  """Threads for tiktoken, which encodes without the GIL; one pool per process (a forked child lacks the threads
  of its parent's)."""
  del pid
  return concurrent.futures.ThreadPoolExecutor(threads)


class GPT2Tokenizer(Tokenizer):
  """GPT-2's byte-level BPE (the same ids as tiktoken's and HF's 'gpt2'), encoded by tiktoken; EOS is
  '<|endoftext|>'.

  Text that contains the literal string '<|endoftext|>' is encoded as ordinary text, never as EOS (tiktoken's
  encode_ordinary): documents cannot fake a boundary. Lone surrogates (from JSON escapes) become U+FFFD.
  """

  saturates_cores = True  # tiktoken encodes in GIL-free threads

  def __init__(self, payload: bytes):
    spec = json.loads(payload)
    vocab = spec["vocab"]
    super().__init__("gpt2", payload, max(vocab.values()) + 1, vocab[_GPT2_EOS])
    byte_of = {ord(c): b for b, c in enumerate(_byte_chars())}
    self._bytes = [b""] * self.vocab_size  # each id's bytes (none for ids that vocab.json skips)
    for token, i in vocab.items():
      self._bytes[i] = token.translate(byte_of).encode("latin-1")
    # tiktoken ranks tokens by merge priority (the single bytes first, then the merges in order), GPT-2 by id:
    # equal for GPT-2's own files, not for every vocab.json, so its ranks are mapped to our ids. tiktoken merges
    # the adjacent pair whose join ranks lowest, and takes a word that is a whole token as that token: the same
    # ids as GPT-2's merge loop for vocabularies learned by BPE (GPT-2's own, HF tokenizers').
    tokens = [*_byte_chars(), *(merge.replace(" ", "") for merge in spec["merges"])]
    self._ids = np.array([vocab[t] for t in tokens], np.int32)
    self._encoding = tiktoken.Encoding("gpt2", pat_str=_GPT2_PATTERN, special_tokens={},
                                       mergeable_ranks={self._bytes[i]: rank for rank, i in enumerate(self._ids)})

  @classmethod
  def from_files(cls, directory: str) -> "GPT2Tokenizer":
    """Reads GPT-2's vocab.json and merges.txt (as published with the HF 'gpt2' model) from directory."""
    vocab_path, merges_path = (os.path.join(directory, name) for name in _GPT2_FILES)
    with paths.open_text(merges_path) as f:
      merges = [line.rstrip("\r\n") for line in f if line.strip() and not line.startswith("#version")]
    return cls.from_vocab(paths.read_json(vocab_path), merges, vocab_path, merges_path)

  @classmethod
  def from_vocab(cls, vocab: dict[str, int], merges: list[str], vocab_path: str = "vocab.json",
                 merges_path: str = "merges.txt") -> "GPT2Tokenizer":
    """From the contents of vocab.json (token: id) and merges.txt (one 'a b' per merge, by rank); the paths name
    them in errors."""
    problems = [f"{vocab_path} has no {_GPT2_EOS!r} token"] if _GPT2_EOS not in vocab else []
    problems += [f"{vocab_path} lacks the byte token {c!r}" for c in _byte_chars() if c not in vocab][:1]
    alphabet = set(_byte_chars())
    problems += [f"{vocab_path} has the token {t!r}, which is not made of byte tokens" for t in vocab
                 if not set(t) <= alphabet][:1]
    made = {}  # token: the merge that makes it
    for line_no, merge in enumerate(merges, 1):
      pair = merge.split(" ")
      if len(pair) != 2 or "".join(pair) not in vocab:
        problems.append(f"{merges_path}: merge {line_no} {merge!r} is not two tokens whose join is in vocab.json")
        break
      if made.setdefault("".join(pair), line_no) != line_no:
        problems.append(f"{merges_path}: merge {line_no} {merge!r} makes the token of merge {made[''.join(pair)]} "
                        "again")
        break
    if problems:
      raise DataError(f"{'; '.join(problems)}: these are not the files of a byte-level BPE tokenizer; give "
                      "data.tokenizer_path a directory with GPT-2's own vocab.json and merges.txt.")
    by_id = dict(sorted(vocab.items(), key=lambda item: item[1]))
    return cls(json.dumps({"vocab": by_id, "merges": merges}, ensure_ascii=False).encode())

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    encode = self._encoding.encode_ordinary
    parallel = self.threads > 1 and len(texts) > 1
    ranks = _thread_pool(os.getpid(), self.threads).map(encode, texts) if parallel else map(encode, texts)
    return [self._ids[r] for r in ranks]

  def _decode(self, ids: np.ndarray) -> str:
    return b"".join(self._bytes[i] for i in ids.tolist()).decode("utf-8", errors="replace")


def _line_chunks(documents: Iterable[str]):
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


def from_payload(kind: str, payload: bytes) -> Tokenizer:
  """The tokenizer of `kind` serialized as `payload` (Tokenizer.payload)."""
  if kind == "char":
    return CharTokenizer(payload)
  if kind == "gpt2":
    return GPT2Tokenizer(payload)
  return SentencePieceTokenizer(kind, payload)


def load_tokenizer(directory: str) -> Tokenizer:
  """Reads a tokenizer written by Tokenizer.save, or GPT-2's vocab.json + merges.txt, from directory."""
  meta_path = paths.path(os.path.join(directory, _META))
  meta = meta_path.read_bytes() if meta_path.exists() else b"{}"
  if "fingerprint" not in json.loads(meta):  # HF model directories have a tokenizer.json of their own: not ours
    if all(paths.path(os.path.join(directory, name)).exists() for name in _GPT2_FILES):
      return GPT2Tokenizer.from_files(directory)
    raise DataError(f"no tokenizer in {directory!r}: it needs {_META} + {_MODEL} (written by Tokenizer.save, as "
                    f"in a run's tokenizer/ directory) or GPT-2's {' + '.join(_GPT2_FILES)}; point "
                    "data.tokenizer_path at such a directory.")
  return from_saved({_MODEL: paths.path(os.path.join(directory, _MODEL)).read_bytes(), _META: meta}, repr(directory))


def from_saved(files: dict[str, bytes], where: str = "the tokenizer") -> Tokenizer:
  """The tokenizer whose `Tokenizer.files` are `files`; `where` names them in errors."""
  meta = json.loads(files[_META])
  tok = from_payload(meta["kind"], files[_MODEL])
  if tok.fingerprint != meta["fingerprint"]:
    raise DataError(f"{where}: {_MODEL} has fingerprint {tok.fingerprint} but {_META} says "
                    f"{meta['fingerprint']}; the files are corrupt or mixed up: delete the directory to retrain.")
  return tok


def train_tokenizer(documents: Iterable[str], kind: str, vocab_size: int, cache_dir: str, key: str = "",
                    total_chars: int = 0) -> Tokenizer:
  """The tokenizer of documents (read at most once), from or else into cache_dir/tokenizer-<kind>-<vocab>-<key>/."""
  # key identifies the corpus ('' = hash the documents, then a list); total_chars, their approximate size, lets
  # SentencePiece sample evenly over all of them (0 = from the start).
  if kind not in TRAINED_KINDS:
    raise DataError(f"data.tokenizer={kind!r} is not trained on the corpus: use one of {TRAINED_KINDS}, or load "
                    "a tokenizer with data.tokenizer_path.")
  if not key:
    documents = list(documents)
    key, total_chars = corpus_sha256(documents)[:12], sum(map(len, documents))
  size = 0 if kind == "char" else vocab_size  # a char vocabulary is whatever the corpus holds
  directory = os.path.join(cache_dir, f"tokenizer-{kind}-{size}-{key}")
  if paths.path(os.path.join(directory, _META)).exists():
    return load_tokenizer(directory)
  start = time.time()
  if kind == "char":
    tok = CharTokenizer.train(documents)
  else:
    tok = SentencePieceTokenizer.train(documents, kind, size, total_chars)
  logging.info("Trained a %s tokenizer (%d tokens) in %.1f s; caching it in %s.", kind, tok.vocab_size,
               time.time() - start, directory)
  if paths.is_remote(cache_dir):  # object stores rename by copying: written in place, _META (last) marks it done
    tok.save(directory)
    return tok
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-tokenizer-")
  tok.save(tmp)
  try:
    os.rename(tmp, directory)  # atomic: a half-written tokenizer is never found in the cache
  except OSError:  # another process cached one first; use it so that all processes agree
    shutil.rmtree(tmp)
    return load_tokenizer(directory)
  return tok
