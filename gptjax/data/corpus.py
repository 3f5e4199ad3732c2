"""Where training text comes from: files, directories, globs, or the built-in offline corpus."""

import ast
import glob
import hashlib
import os
import sysconfig
import warnings

from absl import logging

# Docstrings shorter than this are mostly one-line summaries: too little running text to learn from.
_MIN_DOCSTRING_CHARS = 200
# Stdlib folders that are tests, demos, or third-party packages rather than documented modules.
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages",
                        "__pycache__"})
_TEXT_SUFFIXES = (".txt", ".md")


class DataError(ValueError):
  """Missing, empty or unusable data; the message names the path or value and the fix."""


def builtin_documents() -> list[str]:
  """Python's own documentation: pydoc topics plus stdlib docstrings, parsed (never imported) from source."""
  from pydoc_data import topics  # plain data (safe to import), loaded only when the corpus is wanted
  docs = [topics.topics[name] for name in sorted(topics.topics)]
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for folder, subdirs, names in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]
    paths += [os.path.join(folder, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
  for path in sorted(paths):
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


def _read_text(path: str) -> str:
  """A file's text as UTF-8, undecodable bytes replaced by U+FFFD (with a warning)."""
  with open(path, "rb") as f:
    raw = f.read()
  text = raw.decode("utf-8", errors="replace")
  replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
  if replaced:
    logging.warning("%s is not valid UTF-8: replaced %d undecodable byte sequences with U+FFFD.", path, replaced)
  return text


def read_documents(path: str) -> list[str]:
  """Documents (one per file) from a file, a directory of *.txt/*.md, a glob, or '' for the built-in corpus."""
  if not path:
    return builtin_documents()
  if os.path.isfile(path):
    files = [path]
  elif os.path.isdir(path):
    files = sorted(p for p in glob.glob(os.path.join(glob.escape(path), "**", "*"), recursive=True)
                   if p.endswith(_TEXT_SUFFIXES) and os.path.isfile(p))
    if not files:
      raise DataError(f"data.path={path!r} is a directory without *.txt or *.md files; put the text there or "
                      "point data.path at a file or glob.")
  elif glob.has_magic(path):
    files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if not files:
      raise DataError(f"data.path={path!r} matches no files; check the pattern (use '**' to search subfolders).")
  else:
    raise DataError(f"data.path={path!r} does not exist; give a file, a directory, a glob, or '' for the "
                    "built-in corpus.")
  docs = [text for text in map(_read_text, files) if text]
  if not docs:
    raise DataError(f"data.path={path!r}: all {len(files)} files are empty; add text to them.")
  return docs


def corpus_sha256(documents: list[str]) -> str:
  """Hex SHA-256 of the documents and their boundaries: the cache key for tokenizers and token files."""
  h = hashlib.sha256()
  for doc in documents:
    data = doc.encode("utf-8", errors="surrogatepass")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.hexdigest()
