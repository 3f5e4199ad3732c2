"""Where training text comes from: text, JSONL and Parquet files (a file, a directory or a glob), a Hugging Face
dataset, or the built-in offline corpus; and which files are existing token files (nanoGPT, llm.c) instead."""

import ast
import dataclasses
import functools
import glob
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from typing import Iterator

from absl import logging

from gptjax import paths
from gptjax.errors import UserError

# How data.path is read ('auto' = by each file's suffix); Hugging Face datasets are named by the 'hf:' prefix.
FORMATS = ("auto", "text", "jsonl", "parquet", "nanogpt", "llmc")
# Formats that hold token ids already: read as they are, never re-tokenised.
TOKEN_FORMATS = ("nanogpt", "llmc")
# What a directory contributes for each format; with 'auto', a file's suffix picks its format.
SUFFIXES = {"text": (".txt", ".md"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "nanogpt": (".bin",),
            "llmc": (".bin",)}
# llm.c's token shards start with a header of 256 int32: this magic, a version (1: uint16 tokens, 2: uint32),
# the token count.
LLMC_MAGIC = 20240520
HF_PREFIX = "hf:"
# Docstrings shorter than this are mostly one-line summaries: too little running text to learn from.
_MIN_DOCSTRING_CHARS = 200
# Stdlib folders that are tests, demos, or third-party packages rather than documented modules.
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages",
                        "__pycache__"})
_HASH_BLOCK = 1 << 20


class DataError(UserError, ValueError):
  """Missing, empty or unusable data; the message names the path or value and the fix."""


def _stdlib_files() -> list[str]:
  """The stdlib modules whose docstrings make the built-in corpus."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for folder, subdirs, names in os.walk(root):  # this Python's own files: always local
    subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]
    files += [os.path.join(folder, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
  return sorted(files)


def builtin_documents() -> list[str]:
  """Python's own documentation: pydoc topics plus stdlib docstrings, parsed (never imported) from source."""
  from pydoc_data import topics  # plain data (safe to import), loaded only when the corpus is wanted
  docs = [topics.topics[name] for name in sorted(topics.topics)]
  for path in _stdlib_files():
    with open(path, "rb") as f:
      source = f.read()
    try:
      with warnings.catch_warnings():  # old escape sequences in some modules warn on parse
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # distro-patched or templated files that are not this Python's syntax
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
          docs.append(doc)
  return list(dict.fromkeys(docs))  # drops repeats (inherited or copied docstrings), keeps the order


def corpus_sha256(documents: list[str]) -> str:
  """Hex SHA-256 of the documents and their boundaries."""
  h = hashlib.sha256()
  for doc in documents:
    data = doc.encode("utf-8", errors="surrogatepass")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.hexdigest()


def _decode(raw: bytes, where: str, counts: dict) -> str:
  """UTF-8 text of raw; undecodable bytes become U+FFFD and are counted per file in counts[where]."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    text = raw.decode("utf-8", errors="replace")
    counts[where] = counts.get(where, 0) + text.count("\ufffd") - raw.count("\ufffd".encode())
    return text


def _warn_replaced(counts: dict) -> None:
  for path, n in counts.items():
    logging.warning("%s is not valid UTF-8: replaced %d undecodable byte sequences with U+FFFD.", path, n)


def _text_field(record, field: str, where: str) -> str:
  """record[field] as a string, or a DataError naming where the record is and the fix."""
  if not isinstance(record, dict) or field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: the record has no {field!r} field (it has {keys}); set data.text_field to the "
                    "field that holds the text, or fix the record.")
  text = record[field]
  if not isinstance(text, str):
    raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not text; fix the record or set "
                    "data.text_field to a text field.")
  return text


def _text_documents(path: str, field: str) -> Iterator[tuple[str, int]]:
  """The file as one document."""
  del field
  raw = paths.path(path).read_bytes()
  counts = {}
  text = _decode(raw, path, counts)
  _warn_replaced(counts)
  yield text, len(raw)


def _jsonl_documents(path: str, field: str) -> Iterator[tuple[str, int]]:
  """One document per line: the `field` of each JSON object (blank lines are skipped)."""
  counts = {}
  with paths.path(path).open("rb") as f:
    for line_no, raw in enumerate(f, 1):
      if not raw.strip():
        yield "", len(raw)
        continue
      where = f"{path}:{line_no}"
      try:
        record = json.loads(_decode(raw, path, counts))
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg}); JSON Lines needs one object per line: fix the line, or "
                        "set data.format='text' to read the file as plain text.") from e
      yield _text_field(record, field, where), len(raw)
  _warn_replaced(counts)


def _import_parquet(path: str):
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError(f"{path} is Parquet, which needs pyarrow: pip install 'gptjax[parquet]'.") from e
  return pq


def _parquet_documents(path: str, field: str) -> Iterator[tuple[str, int]]:
  """One document per row: the `field` column, read in batches (the file's bytes are shared out over rows)."""
  with paths.path(path).open("rb") as f:
    parquet = _import_parquet(path).ParquetFile(f)
    if field not in parquet.schema_arrow.names:
      raise DataError(f"{path} has no column {field!r} (it has {parquet.schema_arrow.names}); set data.text_field "
                      "to the column that holds the text.")
    rows, size, row = parquet.metadata.num_rows, paths.size(path), 0
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
      for text in batch.column(0).to_pylist():
        if not isinstance(text, str):
          raise DataError(f"{path}: row {row} of column {field!r} is {type(text).__name__}, not text; drop or fix "
                          "the row, or set data.text_field to a text column.")
        row += 1
        yield text, size * row // rows - size * (row - 1) // rows


def parse_hf(spec: str, setting: str = "data.path") -> tuple[str, str | None, str]:
  """(name, config, split) of 'hf:NAME[:CONFIG][@SPLIT]' (split 'train' by default); `setting` is the config field
  that holds `spec`, for errors."""
  rest, _, split = spec[len(HF_PREFIX):].partition("@")
  name, _, config = rest.partition(":")
  if not name:
    raise DataError(f"{setting}={spec!r}: name a dataset, as in 'hf:roneneldan/TinyStories' or "
                    "'hf:allenai/c4:en@validation'.")
  return name, config or None, split or "train"


def load_hf(spec: str, setting: str = "data.path", streaming: bool = True):
  """The split of the Hugging Face dataset `spec` names, from `datasets` (imported only here: it is optional)."""
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError(f"{setting}={spec!r} needs the Hugging Face datasets package (and network access): "
                    "pip install datasets.") from e
  name, config, split = parse_hf(spec, setting)
  try:
    return datasets.load_dataset(name, config, split=split, streaming=streaming)
  except Exception as e:  # pylint: disable=broad-except  # datasets' errors are many; each gets the same fix
    raise DataError(f"{setting}={spec!r}: the Hugging Face dataset {name!r} (config {config}, split {split!r}) "
                    f"does not load ({type(e).__name__}: {str(e).strip()[:300]}); check the name, config and split "
                    f"on https://huggingface.co/datasets/{name}, and the network.") from e


def _hf_documents(spec: str, field: str) -> Iterator[tuple[str, int]]:
  """The `field` of each record of a Hugging Face dataset, streamed (nothing is downloaded whole)."""
  for i, record in enumerate(load_hf(spec)):
    text = _text_field(record, field, f"{spec} record {i}")
    yield text, len(text)


def _builtin(spec: str, field: str) -> Iterator[tuple[str, int]]:
  del spec, field
  for doc in builtin_documents():
    yield doc, len(doc)


_READERS = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents, "hf": _hf_documents,
            "builtin": _builtin}


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A corpus as a data path names it: its files, each with its format, not yet read."""
  # The data path as given ('' = the built-in corpus, 'hf:...' = a Hugging Face dataset).
  path: str
  # (file, format) pairs; the built-in corpus and a Hugging Face dataset are one pseudo-file each.
  files: tuple[tuple[str, str], ...]
  # JSONL field / Parquet column / dataset field that holds the text.
  text_field: str = "text"
  # Read at most this many documents (0 = all).
  max_documents: int = 0

  @property
  def is_tokens(self) -> bool:
    """Whether the files are token files (read as they are) rather than documents."""
    return self.files[0][1] in TOKEN_FORMATS

  @property
  def size_bytes(self) -> int:
    """Bytes of all files (0 if unknown: a dataset streamed from the Hub, or the built-in corpus)."""
    return sum(paths.size(f) for f, fmt in self.files if fmt not in ("hf", "builtin"))

  def documents(self) -> Iterator[tuple[str, int]]:
    """(text, bytes of the source it stands for) of every non-empty document, in a fixed order."""
    if self.is_tokens:
      raise DataError(f"data.path={self.path!r} holds token files ({self.files[0][0]}), not text; they are read "
                      "as they are.")
    count = pending = 0
    for file, fmt in self.files:
      for text, n_bytes in _READERS[fmt](file, self.text_field):
        pending += n_bytes  # the bytes of skipped empty documents count towards the next one
        if text:
          yield text, pending
          pending = 0
          count += 1
          if count == self.max_documents:
            return
    if not count:
      raise DataError(f"data.path={self.path!r}: its {len(self.files)} file(s) hold no text (empty files, blank "
                      "lines or empty fields); add text or point data.path elsewhere.")

  @functools.cached_property
  def _scan(self) -> tuple[str, int | None]:
    """(fingerprint, number of documents or None if unknown), from one pass over the files' bytes."""
    h = hashlib.sha256(repr((self.text_field, self.max_documents)).encode())
    docs = 0
    for file, fmt in self.files:
      h.update(f"\0{fmt}\0".encode())
      if fmt == "hf":  # a dataset is known by its name
        h.update(file.encode())
        docs = None
      elif fmt in TOKEN_FORMATS:  # read in place, never hashed whole: path, size and time tell a change
        h.update(repr(paths.stamp(file)).encode())
        docs = None
      elif fmt == "builtin":  # cheaper than parsing the stdlib: it changes only with the Python installation
        h.update(sys.version.encode())
        for path in _stdlib_files():
          stat = os.stat(path)
          h.update(repr((path, stat.st_size, stat.st_mtime_ns)).encode())
        docs = None
      else:
        with paths.path(file).open("rb") as f:
          if fmt == "jsonl":
            for line in f:
              h.update(line)
              docs += bool(line.strip())
          else:
            while block := f.read(_HASH_BLOCK):
              h.update(block)
            if fmt == "parquet":
              docs += _import_parquet(file).ParquetFile(f).metadata.num_rows
            else:
              docs += f.tell() > 0
        h.update(paths.size(file).to_bytes(8, "little"))
    if docs is not None and self.max_documents:
      docs = min(docs, self.max_documents)
    return h.hexdigest(), docs

  @property
  def fingerprint(self) -> str:
    """Hex SHA-256 of the contents (of path, size and time for token files) and of how they are read."""
    return self._scan[0]

  @property
  def num_documents(self) -> int | None:
    """Documents in the corpus (lines of JSONL, rows of Parquet), or None for token files and streams."""
    return self._scan[1]


def _file_format(path: str, fmt: str) -> str:
  """The format of one file: `fmt`, or for 'auto' the one its suffix (and llm.c's magic number) names."""
  if fmt != "auto":
    return fmt
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".bin":
    with paths.path(path).open("rb") as f:
      return "llmc" if int.from_bytes(f.read(4), "little") == LLMC_MAGIC else "nanogpt"
  return next((name for name, suffixes in SUFFIXES.items() if suffix in suffixes), "text")


def open_corpus(path: str, fmt: str = "auto", text_field: str = "text", max_documents: int = 0) -> Corpus:
  """The corpus at a file, directory, glob, 'hf:NAME[:CONFIG][@SPLIT]' or '' (built-in), read as `fmt`."""
  if fmt not in FORMATS:
    raise DataError(f"data.format={fmt!r}: use one of {FORMATS}.")
  if not path or path.startswith(HF_PREFIX):
    if fmt != "auto":
      raise DataError(f"data.format={fmt!r} does not apply to data.path={path!r}; set data.format='auto'.")
    return Corpus(path, ((path, "hf" if path else "builtin"),), text_field, max_documents)
  suffixes = tuple(s for name, ss in SUFFIXES.items() if fmt in ("auto", name) for s in ss)
  if paths.is_file(path):
    files = [path]
  elif paths.is_dir(path):
    files = [p for p in paths.files_under(path) if p.lower().endswith(suffixes)]
    if not files:
      raise DataError(f"data.path={path!r} is a directory without {'/'.join('*' + s for s in suffixes)} files; "
                      "put the data there, point data.path at a file or glob, or set data.format.")
  elif glob.has_magic(path):
    files = paths.glob_files(path)
    if not files:
      raise DataError(f"data.path={path!r} matches no files; check the pattern (use '**' to search subfolders).")
  else:
    raise DataError(f"data.path={path!r} does not exist; give a file, a directory, a glob, 'hf:NAME' or '' for "
                    "the built-in corpus.")
  typed = tuple((f, _file_format(f, fmt)) for f in files)
  kinds = {fmt in TOKEN_FORMATS for _, fmt in typed}
  if len(kinds) > 1:
    token_file = next(f for f, fm in typed if fm in TOKEN_FORMATS)
    text_file = next(f for f, fm in typed if fm not in TOKEN_FORMATS)
    raise DataError(f"data.path={path!r} mixes token files ({token_file}) with documents ({text_file}); give "
                    "them separate paths (a data.mixture can combine them) or set data.format.")
  if all(paths.size(f) == 0 for f in files):
    which = f"{files[0]} is" if len(files) == 1 else f"all {len(files)} files ({files[0]}, ...) are"
    raise DataError(f"data.path={path!r}: {which} empty; add data, or point data.path elsewhere.")
  return Corpus(path, typed, text_field, max_documents)
