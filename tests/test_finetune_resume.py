"""Fine-tuning runs through the one training loop: a LoRA NER run killed mid-epoch (SIGKILL) and rerun gives the
same per-step losses as an uninterrupted run, and 2 processes x 4 CPU devices equal 1 process x 8 devices."""

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
def test_two_processes_fine_tune_like_one_process_with_eight_devices(tmp_path):
  # Without dropout (the config's 0.1): its masks are drawn per process, so they differ between the two layouts.
  flags = _task(tmp_path) + ["--config.task.epochs=1", "--config.task.dropout=0.0"]
  single = subprocess.run(_command(flags, tmp_path / "one"), cwd=ROOT, env=_env(8), capture_output=True,
                          text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  processes = [subprocess.Popen(
      _command(flags, tmp_path / "two") + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                           f"--process_id={i}"],
      cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in processes:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert sorted(one) == sorted(two) == list(range(1, 9))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], atol=2e-6)
  report_one, report_two = _report(tmp_path / "one"), _report(tmp_path / "two")
  assert report_two["sentences"] == report_one["sentences"] == 16
  assert abs(report_two["token_accuracy"] - report_one["token_accuracy"]) < 0.01
