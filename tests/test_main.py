"""`python -m gptjax.main` end to end in a subprocess: metrics, checkpoint, samples, clean stop on SIGINT; what a
stop signal and an overlong run print."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gptjax import loop, metrics
from tests.conftest import TEST_DEVICES
from tests.helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.model.n_layer=1", "--config.model.n_head=2", "--config.model.n_embd=32",
        "--config.model.block_size=32", "--config.data.vocab_size=300", "--config.train.batch_size=8",
        "--config.train.eval_every=10", "--config.train.eval_batches=2", "--config.log.every_steps=5",
        "--config.log.sample_tokens=10", "--config.train.warmup_steps=5"]


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / "corpus.txt"
  lines = [f"The {a} {b} jumps over the {c} dog number {i}.\n" for i, (a, b, c) in enumerate(
      zip(["quick", "slow", "red", "lazy"] * 200, ["brown", "grey", "fox", "cat"] * 200, ["sleepy", "happy"] * 400))]
  path.write_text("".join(lines))
  return path


def _main(workdir, corpus, *extra):
  return [sys.executable, "-m", "gptjax.main", "--config=configs/quickstart.py", f"--workdir={workdir}",
          f"--config.data.path={corpus}", *TINY, *extra]


@pytest.mark.slow
def test_main_trains_logs_checkpoints_and_samples(tmp_path, corpus):
  workdir = tmp_path / "run"
  result = subprocess.run(_main(workdir, corpus, "--config.train.steps=30"), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"devices: {TEST_DEVICES} x cpu" in result.stdout and "FLOPs/token" in result.stdout
  # No TPU here: libtpu (installed with the dev extra) is told so, and says nothing.
  assert "host bounds" not in result.stderr and "INVALID_ARGUMENT" not in result.stderr, result.stderr[:2000]
  assert "---- sample 0 ----" in result.stdout
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train_loss" in r]
  assert {"step", "train_loss", "tokens_per_sec", "mfu", "grad_norm", "learning_rate"} <= set(train_rows[-1])
  assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
  assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
  assert (workdir / "checkpoints" / "30").is_dir()
  assert list((workdir / "tensorboard").iterdir())
  assert (workdir / "checkpoints" / "30" / "tokenizer").is_dir()


@pytest.mark.slow
def test_sigint_stops_cleanly_with_a_checkpoint(tmp_path, corpus):
  workdir = tmp_path / "run"
  process = subprocess.Popen(_main(workdir, corpus, "--config.train.steps=100000"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.time() < deadline:
    time.sleep(0.5)
  process.send_signal(signal.SIGINT)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  assert "stopped by SIGINT" in stdout
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 100000


def test_a_stop_signal_says_how_long_the_started_steps_need_and_how_to_abort(caplog):
  assert "need about" not in loop.stop_message("SIGTERM", None)  # before the loop has dispatched a step
  assert "need about" not in loop.stop_message("SIGTERM", 0.2)  # short steps: no figure
  with loop.StopFlag() as stop:
    stop.busy_until = time.perf_counter() + 7200  # the loop's guess: two hours of steps still running
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.reason == "SIGINT"
    message = caplog.records[-1].getMessage()
    assert re.search(r"stopping after the steps already started, which need about (1h59m|2h00m) more, then saving "
                     r"a checkpoint\. Ctrl-C again aborts at once, without a checkpoint\.", message), message
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


def test_an_estimate_over_a_day_prints_one_warning_with_the_alternatives(tmp_path, corpus, capsys, monkeypatch):
  assert loop.long_run_warning(step_seconds=0.5, steps=1000, devices="1 x cpu") is None
  # The peak FLOP/s of a slow machine: two tiny steps are estimated at days.
  monkeypatch.setattr(metrics, "peak_flops_per_device", lambda: (1.0, "test"))
  config = tiny_config(steps=2, mesh=(-1, 1, 1), eval_every=0, eval_batches=1)
  config.data.update(path=str(corpus), vocab_size=300)
  config.log.update(samples=0, tensorboard=False)
  loop.run(config, str(tmp_path))
  err = capsys.readouterr().err
  assert err.count("WARNING: this run would take about") == 1, err
  for alternative in ("--config=configs/quickstart.py", "accelerator", "--config.train.steps=N"):
    assert alternative in err


@pytest.mark.slow
def test_spikes_in_a_row_stop_the_run_with_one_line_and_the_last_good_state(tmp_path, corpus):
  # A learning rate of 3 makes the loss climb: the window fills with the first steps, then each step is a spike.
  spiking = ["--config.train.learning_rate=3", "--config.train.warmup_steps=0", "--config.train.grad_clip=0",
             "--config.train.spike_skip=2", "--config.train.spike_window=3", "--config.train.spike_max_in_row=3",
             "--config.log.every_steps=1", "--config.train.steps=30", "--config.log.samples=0"]
  result = subprocess.run(_main(tmp_path / "run", corpus, *spiking), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert re.match(r"error: 3 loss spikes in a row by step (\d+) .*saved in .*checkpoints/\1\. Lower", last), last
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  skipped = [r["spike_skipped_steps"] for r in rows if "train_loss" in r]
  assert skipped[:3] == [0, 0, 0] and skipped[-1] == 2  # the window's 3 steps, then spikes (the 3rd stops it)
  # Stopped at the first check after the third spike (every step is logged); the unit test in test_train.py
  # shows that skipped steps leave the state exactly as it was.
  stopped_at = int(re.search(r"by step (\d+)", last).group(1))
  assert stopped_at == len(skipped) + 1


@pytest.mark.slow
def test_z_loss_adds_its_term_to_the_training_loss(tmp_path, corpus):
  first = {}
  for z in (0.0, 1e-3):
    result = subprocess.run(_main(tmp_path / str(z), corpus, "--config.train.steps=1", "--config.log.samples=0",
                                  f"--config.train.z_loss={z}", "--config.train.eval_every=0"),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / str(z) / "metrics.jsonl").read_text().splitlines()]
    first[z] = next(r["train_loss"] for r in rows if "train_loss" in r)
  # At GPT-2's initialisation the logits are near 0, so log(Z) is near log(vocab): 384 (300 padded to 128s).
  expected = 1e-3 * np.log(384) ** 2
  assert 0.9 * expected < first[1e-3] - first[0.0] < 1.1 * expected, first
