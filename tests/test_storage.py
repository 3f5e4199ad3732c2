"""Runs on gs:// storage, with Google Cloud Storage faked by a local emulator (gcp-storage-emulator, in memory, on
127.0.0.1) that the real clients talk HTTP to: gcsfs behind etils.epath (STORAGE_EMULATOR_HOST) for gptjax's own
files, and TensorStore's gcs driver (TENSORSTORE_GCS_HTTP_URL) for the arrays Orbax writes. Nothing else is faked.
The emulator ignores GCS's preconditions, which Orbax's OCDBT commits rely on; `_honour_preconditions` adds them.

Each command runs in a subprocess, in an empty working directory, with $HOME, $TMPDIR and $GPTJAX_CACHE in folders of
the test: afterwards the working directory, $HOME and $TMPDIR are still empty and the cache holds only copies of
token shards, so every file went to the bucket.
"""

import functools
import http
import json
import logging
import os
import pathlib
import re
import signal
import socket
import socketserver
import subprocess
import sys
import time

import pytest

from gptjax import paths
from test_main import TINY

gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "bucket"


def _honour_preconditions(server_module, objects, not_found):
  """Makes the emulator's object requests honour ifGenerationMatch / ifGenerationNotMatch and answer with an
  x-goog-generation header, as GCS does: TensorStore writes OCDBT manifests with conditional writes."""

  def generation(storage, bucket, name):
    try:
      return storage.get_file_obj(bucket, name)["generation"]
    except not_found:
      return "0"  # GCS's generation of an object that does not exist

  def wrap(handler):
    @functools.wraps(handler)
    def wrapped(request, response, storage, *args, **kwargs):
      bucket = request.params["bucket_name"]
      name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
      if name is not None:
        current = generation(storage, bucket, name)
        if request.query.get("ifGenerationMatch", [current])[0] != current:
          response.status = http.HTTPStatus.PRECONDITION_FAILED
          return
        if request.query.get("ifGenerationNotMatch", [None])[0] == current:
          response.status = http.HTTPStatus.NOT_MODIFIED
          return
      handler(request, response, storage, *args, **kwargs)
      if name is not None and response.status in (http.HTTPStatus.OK, http.HTTPStatus.PARTIAL_CONTENT):
        response["x-goog-generation"] = generation(storage, bucket, name)
    return wrapped

  for _, methods in server_module.HANDLERS:
    for method, handler in methods.items():
      if handler in (objects.insert, objects.get, objects.download, objects.delete):
        methods[method] = wrap(handler)


FAULTS = {}  # object name prefix -> the HTTP status the emulator answers its reads with (a failing or denied read)


def _inject_faults(server_module, objects):
  """Makes the emulator answer reads of objects under a FAULTS prefix with that prefix's status."""

  def wrap(handler):
    @functools.wraps(handler)
    def wrapped(request, response, storage, *args, **kwargs):
      name = request.params.get("object_id") or ""
      status = next((code for prefix, code in FAULTS.items() if name.startswith(prefix)), None)
      if status is None:
        return handler(request, response, storage, *args, **kwargs)
      response.status = status
    return wrapped

  for _, methods in server_module.HANDLERS:
    for method, handler in methods.items():
      if getattr(handler, "__wrapped__", handler) in (objects.get, objects.download):  # also under preconditions
        methods[method] = wrap(handler)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def store():
  """The emulator's URL and a gcsfs client of it that never answers from a stale listing."""
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # it logs every 404 (= "no such file")
  from gcp_storage_emulator import exceptions  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  _honour_preconditions(emulator, objects, exceptions.NotFound)
  _inject_faults(emulator, objects)
  url = f"http://127.0.0.1:{_free_port()}"
  server = emulator.create_server("127.0.0.1", int(url.rsplit(":", 1)[1]), in_memory=True, default_bucket=BUCKET)
  with pytest.MonkeyPatch.context() as mp:
    # A client that hangs up before the answer is sent (a killed run) is no error of the test: no traceback.
    mp.setattr(socketserver.BaseServer, "handle_error", lambda self, request, client_address: None)
    server.start()
    mp.setenv("STORAGE_EMULATOR_HOST", url)  # read by gcsfs on every request
    # gcsfs's core class: its default one asks the emulator for the bucket's layout over gRPC, and waits a minute.
    yield url, gcsfs.core.GCSFileSystem(token="anon", skip_instance_cache=True, use_listings_cache=False)
  server.stop()


@pytest.fixture
def sandbox(tmp_path):
  """(cwd, env) of a subprocess whose stray files would show: an empty cwd, $HOME and $TMPDIR of its own."""
  for name in ("cwd", "home", "tmp", "cache"):
    (tmp_path / name).mkdir()
  env = dict(os.environ, HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"),
             GPTJAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_APPLICATION_CREDENTIALS"):
    env.pop(name, None)
  return tmp_path, env


def _gs_env(env, url):
  return dict(env, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)


def _run(args, tmp_path, env, timeout=300):
  result = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path / "cwd", env=env, capture_output=True,
                          text=True, timeout=timeout)
  _assert_nothing_local(tmp_path)
  return result


def _assert_nothing_local(tmp_path):
  for name in ("cwd", "home", "tmp"):
    assert not list((tmp_path / name).iterdir()), f"written to ${name.upper()}: {list((tmp_path / name).rglob('*'))}"
  cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
  assert all(p.parent == tmp_path / "cache" / "remote" and p.suffix == ".bin" for p in cached), cached


def _main(*flags):
  return ["gptjax.main", f"--config={ROOT / 'configs' / 'quickstart.py'}", *TINY, *flags]


def test_remote_files_appear_whole_or_not_at_all(store, tmp_path, monkeypatch):
  monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path))
  unit = f"gs://{BUCKET}/unit"
  paths.write_json(f"{unit}/a.json", {"v": 1})
  with pytest.raises(KeyError):
    with paths.atomic_write(f"{unit}/a.json") as f:
      f.write('{"v": 2')
      raise KeyError("interrupted")
  assert paths.read_json(f"{unit}/a.json") == {"v": 1}  # the old object, never a part of the new one
  for line in (b"1\n", b"2\n"):  # each writer uploads what the one before it did, and its own
    log = paths.open_append(f"{unit}/log.jsonl")
    log.write(line)
    log.close()
  assert paths.path(f"{unit}/log.jsonl").read_bytes() == b"1\n2\n"
  assert paths.glob_files(f"{unit}/*.json") == [f"{unit}/a.json"]
  assert paths.files_under(unit) == [f"{unit}/a.json", f"{unit}/log.jsonl"]
  copy = pathlib.Path(paths.local_copy(f"{unit}/log.jsonl"))
  assert copy.parent == tmp_path / "remote" and copy.read_bytes() == b"1\n2\n"


def test_a_workdir_whose_storage_cannot_be_served_stops_at_once(store, sandbox):
  tmp_path, env = sandbox
  hidden = tmp_path / "hidden" / "gcsfs"
  hidden.mkdir(parents=True)
  (hidden / "__init__.py").write_text("raise ImportError('gcsfs is hidden by the test')\n")
  cases = [  # (environment, what the one error says)
      (dict(env, PYTHONPATH=f"{hidden.parent}{os.pathsep}{ROOT}"), "gs:// paths need gcsfs: pip install 'gptjax[gcs]'"),
      (_gs_env(env, store[0]), "bucket gs://no-such-bucket does not exist"),
  ]
  for case_env, message in cases:
    result = _run(_main("--workdir=gs://no-such-bucket/x"), tmp_path, case_env, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
  result = _run(_main("--workdir=ftp://host/x"), tmp_path, env, timeout=120)
  assert result.returncode != 0 and "ftp:// is not a storage gptjax can use" in result.stderr, result.stderr


def test_a_workdir_on_an_unreachable_store_stops_within_seconds(sandbox):
  tmp_path, env = sandbox
  closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens: every request is refused, and gcsfs retries
  result = _run(_main("--workdir=gs://no-such-bucket/x"), tmp_path, _gs_env(env, closed), timeout=120)
  assert result.returncode != 0
  assert f"gs://no-such-bucket did not answer within {paths.PROBE_SECONDS} s" in result.stderr, result.stderr[-3000:]


def _committed_steps(fs, directory):
  """Checkpoint steps Orbax finished (on GCS it marks each with commit_success.txt)."""
  return sorted(int(m.group(1)) for p in fs.find(f"{BUCKET}/{directory}")
                if (m := re.fullmatch(rf"{BUCKET}/{directory}/(\d+)/commit_success.txt", p)))


@pytest.mark.slow
def test_a_whole_run_on_gcs(store, sandbox, corpus):
  url, fs = store
  tmp_path, env = sandbox
  env = _gs_env(env, url)
  run, ckpt = f"gs://{BUCKET}/run", "run/checkpoints"
  fs.put_file(str(corpus), f"{BUCKET}/corpus.txt")
  data = f"--config.data.path=gs://{BUCKET}/corpus.txt"

  result = _run(["gptjax.prepare", *_main(f"--workdir={run}", data)[1:]], tmp_path, env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{run}/data/tokens-" in result.stdout

  # Training, killed (SIGKILL: no handler runs) once a checkpoint is committed, then resumed.
  log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would block the run's logging, then the run
  with open(log, "w") as out:
    process = subprocess.Popen([sys.executable, "-m", *_main(f"--workdir={run}", data, "--config.train.steps=100000",
                                                             "--config.checkpoint.every_steps=10")],
                               cwd=tmp_path / "cwd", env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + 300
      while not _committed_steps(fs, ckpt) and process.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    finally:
      process.send_signal(signal.SIGKILL)
      process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
  _assert_nothing_local(tmp_path)
  killed_at = _committed_steps(fs, ckpt)[-1]
  steps = killed_at + 10
  result = _run(_main(f"--workdir={run}", data, f"--config.train.steps={steps}", "--config.checkpoint.every_steps=10",
                      f"--config.log.profile_steps={killed_at + 2}:{killed_at + 2}"), tmp_path, env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from {run}/checkpoints/{killed_at}" in result.stdout
  assert _committed_steps(fs, ckpt)[-1] == steps
  summary = json.loads(fs.cat(f"{BUCKET}/run/summary.json"))
  assert summary["step"] == steps and summary["checkpoint"] == f"{run}/checkpoints/{steps}"
  rows = [json.loads(line) for line in fs.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
  assert rows[-1]["step"] == steps and "final_val_loss" in rows[-1]
  assert fs.find(f"{BUCKET}/run/tensorboard") and fs.find(f"{BUCKET}/run/profile")

  result = _run(["gptjax.sample", f"--workdir={run}", "--prompt=The", "--max_new_tokens=4"], tmp_path, env)
  assert result.returncode == 0 and result.stdout.startswith("The"), result.stderr[-3000:]
  result = _run(["gptjax.evaluate", f"--workdir={run}", f"--data=gs://{BUCKET}/corpus.txt"], tmp_path, env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.splitlines()[-1])["bytes"] == corpus.stat().st_size  # the text, read from GCS
  result = _run(["gptjax.export", f"--workdir={run}", f"--out=gs://{BUCKET}/export"], tmp_path, env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(fs.cat(f"{BUCKET}/export/export.json"))["step"] == steps

  # A LoRA classifier fine-tuned from the export, its data and its outputs on the bucket too.
  rows = "".join(f"the {w} dog\t{'q' if w in ('quick', 'slow') else 'c'}\n" for w in ["quick", "slow", "red", "a"] * 8)
  fs.pipe_file(f"{BUCKET}/cls/train.tsv", ("sentence\tlabel\n" + rows).encode())
  fs.pipe_file(f"{BUCKET}/cls/dev.tsv", ("sentence\tlabel\n" + rows).encode())
  result = _run(["gptjax.main", f"--config={ROOT / 'configs' / 'sst2.py'}:gs://{BUCKET}/cls",
                 f"--workdir=gs://{BUCKET}/ft", f"--config.checkpoint.init_from=gs://{BUCKET}/export",
                 "--config.task.max_len=16", "--config.train.batch_size=8", "--config.task.eval_batch_size=8", "--config.lora.rank=2",
                 "--config.train.warmup_steps=1", "--config.log.every_steps=2"], tmp_path, env)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(fs.cat(f"{BUCKET}/ft/eval/report.json"))
  assert report["labels"] == ["c", "q"]
  assert {"task.json"} <= {p.rsplit("/", 1)[1] for p in fs.find(f"{BUCKET}/ft/finetuned")}
  assert fs.exists(f"{BUCKET}/ft/merged/export.json") and fs.exists(f"{BUCKET}/ft/summary.json")
  assert list((tmp_path / "cache" / "remote").iterdir())  # the token shards were read from local copies


def test_a_failing_or_denied_read_stops_the_run_and_changes_no_checkpoint(store, corpus, monkeypatch):
  """A checkpoint the storage fails to serve (503, after the clients' retries) or refuses (403) is not "corrupt":
  the run stops with one error and every checkpoint stays, the newest to resume once storage answers again."""
  from gptjax import loop  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=import-outside-toplevel
  from tests.helpers import quick_run_config  # pylint: disable=import-outside-toplevel
  url, fs = store
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
  # TensorStore retries a 503 for many minutes by default (as it should for a real hiccup); here, a few tries.
  retries = {"gcs_request_retries": {"max_retries": 2, "initial_delay": "10ms", "max_delay": "20ms"}}
  monkeypatch.setattr(tensorstore_utils, "_DEFAULT_OCDBT_TS_CONTEXT",
                      {**tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT, **retries})  # pylint: disable=protected-access
  run, checkpoints = f"gs://{BUCKET}/faults", "faults/checkpoints"
  loop.run(quick_run_config(corpus, steps=8), run)
  assert _committed_steps(fs, checkpoints) == [4, 8]
  for status in (http.HTTPStatus.SERVICE_UNAVAILABLE, http.HTTPStatus.FORBIDDEN):
    FAULTS[f"{checkpoints}/8/state/"] = status
    try:
      with pytest.raises(paths.StorageError, match=f"checkpoint {run}/checkpoints/8 could not be read from its "
                                                   "storage .*nothing was changed"):
        loop.run(quick_run_config(corpus, steps=12), run)
    finally:
      FAULTS.clear()
    assert _committed_steps(fs, checkpoints) == [4, 8] and not fs.glob(f"{BUCKET}/{checkpoints}/corrupt-*"), status
