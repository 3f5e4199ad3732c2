"""Fine-tuning runs through the one training loop: a LoRA NER run killed mid-epoch (SIGKILL) and rerun gives the
same per-step losses as an uninterrupted run, and a run resumed on 2, 1 and 4 processes equals 1 process x 8
devices."""

import json
import pathlib
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from gptjax import checkpoint
from gptjax.data.tokenizer import CharTokenizer
from gptjax.model import GPT, GPTConfig
from tests.helpers import tiny_config
from tests.test_checkpoint import _losses, _wait_for_step
from tests.test_multiprocess import _env, _free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = ["Paris", "London", "the", "went", "to", "John", "Mary", "city", "big", "saw", "."]
TAGS = {"Paris": "B-LOC", "London": "B-LOC", "John": "B-PER", "Mary": "B-PER"}


def _task(tmp_path) -> list[str]:
  """CoNLL train (64 sentences: 8 steps of 8 per epoch) and dev files, a random tiny base; the run's flags."""
  data = tmp_path / "data"
  data.mkdir()
  rnd = random.Random(0)
  for name, n in (("train.txt", 64), ("dev.txt", 16)):
    sentences = [rnd.choices(WORDS, k=6) for _ in range(n)]
    (data / name).write_text("".join("".join(f"{w} {TAGS.get(w, 'O')}\n" for w in s) + "\n" for s in sentences))
  tokenizer = CharTokenizer.train([" ".join(WORDS)])
  base_config = tiny_config(block_size=64)
  params = nnx.to_pure_dict(nnx.state(GPT(GPTConfig.from_config(base_config.model, -(-tokenizer.vocab_size // 8) * 8), nnx.Rngs(0))))
  base = checkpoint.write_export(str(tmp_path / "base"), params, base_config, tokenizer, step=0)
  return [f"--config=configs/conll2003_ner.py:{data}", f"--config.checkpoint.init_from={base}",
          "--config.train.batch_size=8", "--config.task.epochs=3", "--config.task.eval_batch_size=8",
          "--config.train.warmup_steps=3", "--config.train.learning_rate=3e-3", "--config.checkpoint.every_steps=5",
          "--config.log.every_steps=1", "--config.log.tensorboard=False", "--config.task.export_merged=False",
          "--config.lora.rank=4"]


def _command(flags, workdir):
  return [sys.executable, "-m", "gptjax.main", *flags, f"--workdir={workdir}"]


def _report(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "eval" / "report.json").read_text())


@pytest.mark.slow
def test_killed_fine_tune_resumes_to_the_same_losses(tmp_path):
  flags = _task(tmp_path)
  reference = subprocess.run(_command(flags, tmp_path / "ref"), cwd=ROOT, capture_output=True, text=True)
  assert reference.returncode == 0, reference.stderr[-3000:]
  killed = subprocess.Popen(_command(flags, tmp_path / "run"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  _wait_for_step(tmp_path / "run", 12, killed)  # mid-epoch 2 (steps 9-16), after the checkpoints at 5 and 10
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < 24 and saved[-1] % 8, saved  # killed mid-run, last checkpoint mid-epoch
  resumed = subprocess.run(_command(flags, tmp_path / "run"), cwd=ROOT, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout
  # Bitwise: the adapters, optimizer and the epoch's shuffle position all came back.
  assert _losses(tmp_path / "run") == _losses(tmp_path / "ref") and len(_losses(tmp_path / "ref")) == 24
  assert _report(tmp_path / "run") == _report(tmp_path / "ref")


@pytest.mark.slow
def test_fine_tune_resumes_on_any_number_of_processes_like_one_process(tmp_path):
  # One workdir through 2 processes x 4 devices (steps 1-4), 1 x 8 (5-8), 4 x 2 (9-12), dropout on: every layout
  # builds the same global batches, so the steps equal one process with 8 devices that never stopped. (1 -> 2 and
  # 2 -> 4 are pretraining's test, tests/test_multiprocess.py: the same data stream.)
  flags = _task(tmp_path) + ["--config.task.epochs=0", "--config.checkpoint.every_steps=4",
                             "--config.train.decay_steps=12"]

  def run(workdir, steps, count, devices):
    port = _free_port()
    distributed = lambda i: ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
                              f"--process_id={i}"] if count > 1 else [])
    processes = [subprocess.Popen(_command(flags + [f"--config.train.steps={steps}"], workdir) + distributed(i),
                                  cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for i in range(count)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs):
      assert p.returncode == 0, err[-3000:]
    return outputs[0][0]

  run(tmp_path / "one", 12, 1, 8)
  run(tmp_path / "run", 4, 2, 4)
  for steps, count in ((8, 1), (12, 4)):
    assert "resumed from" in run(tmp_path / "run", steps, count, 8 // count)
  one, resumed = _losses(tmp_path / "one"), _losses(tmp_path / "run")
  assert sorted(one) == sorted(resumed) == list(range(1, 13))
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [one[s] for s in sorted(one)], rtol=2e-6)
  report_one, report_run = _report(tmp_path / "one"), _report(tmp_path / "run")
  assert report_run["sentences"] == report_one["sentences"] == 16
  assert abs(report_run["token_accuracy"] - report_one["token_accuracy"]) < 1e-6
