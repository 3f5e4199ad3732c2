"""One storage layer: every file gptjax reads or writes goes through here, so any user path may be a URL.

Paths are `etils.epath` paths: local ones are served by the os, gs:// (and s3://, az://) ones by fsspec (gcsfs,
s3fs, adlfs). Orbax is handed URLs as they are (`absolute`). A URL that cannot be served (no such scheme, its
package missing, its bucket absent or unreachable) stops at its first use with one StorageError naming the fix,
before any work is done, and never becomes a local folder named after it (os.makedirs('gs://b/x') makes ./gs:/b/x).

Object stores have no directories, no appends and no atomic renames (a rename copies, then deletes), so there:
- `makedirs` does nothing (`check` has made sure the bucket exists);
- `atomic_write` stages the new contents in an unnamed local temporary file and uploads them as the object when
  complete: GCS, S3 and Azure publish an upload only once it has finished, so readers, and a writer killed at any
  point, leave the old object or the whole new one (locally: a temporary name beside it, renamed over it);
- `open_append` uploads the whole object again on flush, at most every UPLOAD_SECONDS, and on close: a killed
  process loses at most that much of an appended log (metrics.jsonl, TensorBoard events);
- `local_copy` gives files that are read at random offsets (memory-mapped token shards) as local copies under
  `cache_dir()`: each is downloaded once, named by its URL, size and modification time, and kept (never evicted;
  delete the folder to free the space).
"""

import contextlib
import functools
import glob
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time

from etils import epath

from gptjax.errors import UserError

# The schemes served, with the package that serves each (fsspec's backends behind epath).
BACKENDS = {"gs": "gcsfs: pip install 'gptjax[gcs]'", "s3": "s3fs: pip install s3fs", "az": "adlfs: pip install adlfs"}
# How long the first use of a bucket may take to answer before the run stops (no network, a firewall).
PROBE_SECONDS = 10
# The least time between two uploads of a file opened with open_append (each upload rewrites the whole object).
UPLOAD_SECONDS = 30
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)")


class StorageError(UserError, RuntimeError):
  """A path whose storage cannot be used; the message names the path and the fix."""


def is_remote(p) -> bool:
  """Whether `p` is a URL (scheme://...) rather than a local path."""
  return _URL.match(os.fspath(p)) is not None


def check(p) -> None:
  """Raises StorageError unless `p` is local or a URL whose bucket answers (checked once per bucket)."""
  match = _URL.match(os.fspath(p))
  if match:
    _check_bucket(*match.groups())


@functools.cache
def _check_bucket(scheme: str, bucket: str) -> None:
  root = f"{scheme}://{bucket}"
  if scheme not in BACKENDS:
    raise StorageError(f"{root}: {scheme}:// is not a storage gptjax can use; use a local path or one of "
                       f"{', '.join(s + '://' for s in BACKENDS)}.")
  if not bucket:
    raise StorageError(f"{root}: the URL names no bucket; write {scheme}://<bucket>/<path>.")
  outcome = {}

  def probe():
    try:
      outcome["exists"] = epath.Path(root).exists()
    except BaseException as e:  # pylint: disable=broad-except  # reported below, whatever the backend raised
      outcome["error"] = e
  # In a thread: clients retry a host they cannot reach for a minute or more (gcsfs: 6 times with backoff).
  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(PROBE_SECONDS)
  error = outcome.get("error")
  if isinstance(error, ImportError):
    raise StorageError(f"{root}: {scheme}:// paths need {BACKENDS[scheme]} ({error}).") from error
  if thread.is_alive():
    raise StorageError(f"{root} did not answer within {PROBE_SECONDS} s: check the network connection (no "
                       "network, or a firewall?) and the credentials, or use a local path.")
  if error is not None:
    raise StorageError(f"{root} cannot be used ({type(error).__name__}: {str(error).strip()[:300]}): check the "
                       "credentials (gs://: gcloud auth application-default login) and the network.") from error
  if not outcome["exists"]:
    raise StorageError(f"bucket {root} does not exist (or these credentials cannot see it): create it, or fix the "
                       "URL.")


def path(p) -> epath.Path:
  """`p` as an epath.Path, after `check`: a local path, or a URL whose storage can be used."""
  check(p)
  return epath.Path(p)


def absolute(p) -> str:
  """A URL as it is, a local path made absolute: what Orbax and the run records want."""
  return os.fspath(p) if is_remote(p) else os.path.abspath(p)


def join(*parts) -> str:
  """os.path.join for paths that may be URLs: a URL, like an absolute path, drops the parts before it."""
  start = max((i for i, part in enumerate(parts) if is_remote(part)), default=0)
  return os.path.join(*parts[start:])


def relative(p, start) -> str:
  """os.path.relpath for paths that may be URLs; `p` as it is when it is on another storage than `start`."""
  p, start = os.fspath(p), os.fspath(start)
  p_url, start_url = _URL.match(p), _URL.match(start)
  if not p_url and not start_url:
    return os.path.relpath(p, start)
  if not (p_url and start_url and p_url.groups() == start_url.groups()):
    return p
  return posixpath.relpath(p[p_url.end():] or "/", start[start_url.end():] or "/")


def makedirs(p) -> None:
  """Creates the local directory `p` and its parents; nothing on object stores, which have no directories."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)
  else:
    check(p)


def size(p) -> int:
  """Bytes in the file `p` (FileNotFoundError when there is none)."""
  if is_remote(p):
    return path(p).stat().length
  return os.path.getsize(p)


def stamp(p) -> tuple:
  """(absolute path, size, modification time): what tells that a file changed without reading it."""
  if is_remote(p):
    info = path(p).stat()
    return p, info.length, info.mtime
  info = os.stat(p)
  return os.path.abspath(p), info.st_size, info.st_mtime_ns


def open_text(p, newline: str | None = None):
  """File `p` opened for reading UTF-8 text, as open(p, encoding='utf-8', newline=newline) does locally."""
  if not is_remote(p):
    return open(p, encoding="utf-8", newline=newline)
  return io.TextIOWrapper(path(p).open("rb"), encoding="utf-8", newline=newline)


def read_json(p):
  """The JSON value in file `p`."""
  return json.loads(path(p).read_bytes())


def write_json(p, obj, indent: int | None = 1) -> None:
  """Writes obj as JSON to `p` with `atomic_write`."""
  with atomic_write(p) as f:
    json.dump(obj, f, indent=indent)


@contextlib.contextmanager
def atomic_write(p, mode: str = "w"):
  """Opens `p` for writing ('w' or 'wb'): readers see the old file or the whole new one, never a part of it.

  Local: the data goes to a temporary name beside `p`, renamed over it when the block ends without an error.
  Remote: the data is staged in an unnamed local temporary file and uploaded as `p` when the block ends without
  an error (object stores publish an upload only once it is complete).
  """
  p = os.fspath(p)
  if is_remote(p):
    target = path(p)
    with tempfile.TemporaryFile() as staged:
      f = staged if "b" in mode else io.TextIOWrapper(staged, encoding="utf-8")
      yield f
      f.flush()
      staged.seek(0)
      with target.open("wb") as out:
        shutil.copyfileobj(staged, out, 1 << 24)
    return
  directory = os.path.dirname(p) or "."
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(p)}")
  try:
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
    os.replace(tmp, p)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class _Uploader:
  """A binary file opened for appending on an object store: the whole object is uploaded again on flush (at most
  every UPLOAD_SECONDS) and on close."""

  def __init__(self, p: str):
    self.target = path(p)
    self.buffer = io.BytesIO(self.target.read_bytes() if self.target.exists() else b"")
    self.buffer.seek(0, io.SEEK_END)
    self.uploaded = -float("inf")
    self.closed = False

  def write(self, data: bytes) -> int:
    return self.buffer.write(data)

  def flush(self, force: bool = False) -> None:
    if force or time.monotonic() - self.uploaded >= UPLOAD_SECONDS:
      with atomic_write(self.target, "wb") as f:
        f.write(self.buffer.getvalue())
      self.uploaded = time.monotonic()

  def close(self) -> None:
    if not self.closed:
      self.flush(force=True)
      self.closed = True


def open_append(p):
  """`p` opened for appending bytes (created if missing); on object stores an uploader (see the module doc)."""
  if is_remote(p):
    return _Uploader(os.fspath(p))
  makedirs(os.path.dirname(p) or ".")
  return open(p, "ab")


def rmtree(p) -> None:
  """Deletes the directory `p` and everything in it, if it exists."""
  target = path(p)
  if target.exists():
    target.rmtree()


def _fs(p):
  """(fsspec filesystem, path without scheme) of a URL: for listings that epath lacks (recursive globs)."""
  import fsspec  # pylint: disable=import-outside-toplevel  # only for URLs
  check(p)
  return fsspec.core.url_to_fs(os.fspath(p))


def glob_files(pattern: str) -> list[str]:
  """The files (not directories) matching `pattern`, sorted; '**' matches any number of folders."""
  if not is_remote(pattern):
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  scheme = _URL.match(pattern).group(1)
  fs, stripped = _fs(pattern)
  found = fs.glob(stripped, detail=True)
  return sorted(f"{scheme}://{name}" for name, info in found.items() if info["type"] == "file")


def files_under(directory: str) -> list[str]:
  """Every file under `directory`, in its subfolders too, sorted."""
  if not is_remote(directory):
    return glob_files(os.path.join(glob.escape(directory), "**", "*"))
  scheme = _URL.match(directory).group(1)
  fs, stripped = _fs(directory)
  return sorted(f"{scheme}://{name}" for name in fs.find(stripped))


def is_file(p) -> bool:
  """Whether `p` is an existing file."""
  return os.path.isfile(p) if not is_remote(p) else path(p).is_file()


def is_dir(p) -> bool:
  """Whether `p` is an existing directory (on object stores: a prefix that holds objects)."""
  return os.path.isdir(p) if not is_remote(p) else path(p).is_dir()


def cache_dir() -> str:
  """Where local copies of remote files live: $GPTJAX_CACHE, else ~/.cache/gptjax."""
  return os.environ.get("GPTJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gptjax")


def local_copy(p) -> str:
  """`p` itself when local; for a URL, a local copy under cache_dir()/remote, downloaded on first use."""
  p = os.fspath(p)
  if not is_remote(p):
    return p
  key = hashlib.sha256(repr(stamp(p)).encode()).hexdigest()[:16]
  local = os.path.join(cache_dir(), "remote", f"{key}-{os.path.basename(p)}")
  if not os.path.exists(local):  # named by URL, size and time: a file found under its name is complete
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    try:
      with path(p).open("rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
      os.replace(tmp, local)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return local


def upload_dir(local: str, target: str) -> None:
  """Copies the files under the local directory `local` to the directory `target` (any storage)."""
  for file in files_under(local):
    with open(file, "rb") as src, atomic_write(os.path.join(target, os.path.relpath(file, local)), "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
