"""Two real processes on 127.0.0.1 with 4 fake CPU devices each train, checkpoint and resume exactly like one
process with 8 devices (jax.distributed + gloo collectives, each process feeding its own slice of the batch)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from gptjax import loader

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["--config=configs/quickstart.py", "--config.model.n_layer=1", "--config.model.n_head=2",
         "--config.model.n_embd=32", "--config.model.block_size=16", "--config.data.vocab_size=300",
         "--config.train.batch_size=8", "--config.train.eval_every=0", "--config.log.every_steps=1",
         "--config.log.samples=0", "--config.checkpoint.every_steps=4", "--config.train.steps=12"]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, corpus, steps):
  port = _free_port()
  processes = [subprocess.Popen(
      [sys.executable, "-m", "gptjax.main", *FLAGS, f"--workdir={workdir}", f"--config.data.path={corpus}",
       f"--config.train.steps={steps}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs[0][0]


def _rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train_loss"] for r in _rows(workdir) if "train_loss" in r}


@pytest.mark.slow
def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
  corpus = tmp_path / "corpus.txt"
  rng = np.random.RandomState(0)
  words = "the quick brown fox jumps over a lazy dog while cats sleep on warm mats".split()
  corpus.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(3000)))
  single = subprocess.run([sys.executable, "-m", "gptjax.main", *FLAGS, f"--workdir={tmp_path / 'one'}",
                           f"--config.data.path={corpus}"], cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  _two_processes(tmp_path / "two", corpus, steps=8)  # stops at 8 with checkpoints at 4 and 8 ...
  assert "resumed from" in _two_processes(tmp_path / "two", corpus, steps=12)  # ... and resumes to 12
  one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert sorted(one) == sorted(two) == list(range(1, 13))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], atol=2e-6)
  # The bookkeeping counts each token once: every process's rows of a global batch of 8 x 16 tokens.
  summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")]
  for summary in summaries:
    assert summary["tokens_seen"] == 12 * 8 * 16 and summary["tokens_per_step"] == 8 * 16, summary
    np.testing.assert_allclose(summary["tokens_per_sec"], 8 * 16 / summary["median_step_seconds"])
  final_one = loader.load_model(str(tmp_path / "one")).params
  final_two = loader.load_model(str(tmp_path / "two")).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), final_two, final_one)


def test_a_stop_asked_on_one_process_stops_all_at_a_sync_point(monkeypatch):
  from gptjax import loop
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  calls = []

  def allgather(local):  # this process has no stop request; the other one has
    calls.append(int(local))
    return np.array([int(local), 1])

  monkeypatch.setattr(loop.multihost_utils, "process_allgather", allgather)
  flag = loop.StopFlag()
  assert not flag.should_stop(at_sync_point=False) and calls == []  # no collective between sync points
  assert flag.should_stop(at_sync_point=True) and calls == [0]
  assert flag.reason == "another process's stop"


def test_an_error_on_process_0_ends_the_job_at_once(tmp_path):
  # Process 0 prepares the data and finds none, while process 1 waits for it at a collective it will never finish.
  port = _free_port()
  processes = [subprocess.Popen(
      [sys.executable, "-m", "gptjax.main", *FLAGS, f"--workdir={tmp_path}", f"--config.data.path={tmp_path}/none",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=_env(4),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  # Well within jax.distributed's 5-minute shutdown barrier, which an ordinary exit would wait at.
  errors = [p.communicate(timeout=120)[1] for p in processes]
  assert processes[0].returncode == 2, errors[0][-3000:]
  assert errors[0].splitlines()[-1].startswith(f"error: data.path='{tmp_path}/none' does not exist"), errors[0][-3000:]
  assert processes[1].returncode != 0  # ended by JAX's runtime: "another task died; see the other task logs"
