"""Real processes on 127.0.0.1 with fake CPU devices (jax.distributed + gloo collectives, each process feeding its
own rows of the batch) train, checkpoint and resume on another number of processes exactly like one process with 8
devices."""

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
         "--config.log.samples=0", "--config.checkpoint.every_steps=4", "--config.train.decay_steps=16",
         # Dropout on: the masks are the same only if every process count builds the same global batch.
         "--config.model.dropout=0.1"]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _processes(workdir, corpus, steps, count: int = 2, devices: int = 4):
  """`count` processes of `devices` devices each train to `steps`; process 0's stdout."""
  port = _free_port()
  distributed = lambda i: ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
                            f"--process_id={i}"] if count > 1 else [])
  processes = [subprocess.Popen(
      [sys.executable, "-m", "gptjax.main", *FLAGS, f"--workdir={workdir}", f"--config.data.path={corpus}",
       f"--config.train.steps={steps}", *distributed(i)], cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(count)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs[0][0]


def _rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train_loss"] for r in _rows(workdir) if "train_loss" in r}


@pytest.mark.slow
def test_resumes_on_any_number_of_processes_like_one_uninterrupted_process(tmp_path):
  # One workdir through 2 processes x 4 devices (steps 1-4), 1 x 8 (5-8), 2 x 4 (9-12), 4 x 2 (13-16): the same
  # global mesh each time, and the same global batches, so the same losses as one process that never stopped.
  corpus = tmp_path / "corpus.txt"
  rng = np.random.RandomState(0)
  words = "the quick brown fox jumps over a lazy dog while cats sleep on warm mats".split()
  corpus.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(3000)))
  _processes(tmp_path / "one", corpus, steps=16, count=1, devices=8)
  _processes(tmp_path / "run", corpus, steps=4)
  for steps, count in ((8, 1), (12, 2), (16, 4)):
    assert f"resumed from {tmp_path / 'run'}/checkpoints/{steps - 4}" in _processes(
        tmp_path / "run", corpus, steps=steps, count=count, devices=8 // count)
  one, run = _losses(tmp_path / "one"), _losses(tmp_path / "run")
  assert sorted(one) == sorted(run) == list(range(1, 17))
  np.testing.assert_allclose([run[s] for s in sorted(run)], [one[s] for s in sorted(one)], rtol=2e-6)
  # The bookkeeping counts each token once: every process's rows of a global batch of 8 x 16 tokens.
  summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "run")]
  for summary in summaries:
    assert summary["tokens_seen"] == 16 * 8 * 16 and summary["tokens_per_step"] == 8 * 16, summary
    np.testing.assert_allclose(summary["tokens_per_sec"], 8 * 16 / summary["median_step_seconds"])
  final_one = loader.load_model(str(tmp_path / "one")).params
  final_run = loader.load_model(str(tmp_path / "run")).params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), final_run, final_one)


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
