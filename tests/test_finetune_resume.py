"""Fine-tuning runs through the one training loop: a LoRA NER run killed (SIGKILL) and resumed on 2, 1, 2 and 4
processes gives the same per-step losses as 1 process x 8 devices that never stopped."""

import json
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from gptjax import checkpoint
from gptjax.data.tokenizer import CharTokenizer
from gptjax.model import GPT, GPTConfig
from tests.helpers import tiny_config
from tests.test_checkpoint import _losses
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


def _launch(flags, workdir, count: int, devices: int, output=subprocess.PIPE) -> list[subprocess.Popen]:
  """`count` processes of `devices` devices each on 127.0.0.1 (one: no coordinator)."""
  port = _free_port()
  distributed = lambda i: ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
                            f"--process_id={i}"] if count > 1 else [])
  return [subprocess.Popen(_command(flags, workdir) + distributed(i), cwd=ROOT, env=_env(devices),
                           stdout=output, stderr=output, text=True) for i in range(count)]


@pytest.mark.slow
def test_a_fine_tune_killed_and_resumed_on_2_1_2_4_processes_equals_one_uninterrupted_process(tmp_path):
  # One workdir: 2 processes x 4 devices, 1 x 8, 2 x 4, each SIGKILLed mid-run, then 4 x 2 to the end, dropout on
  # (the config's 0.1): every layout builds the same global batches, and the adapters, optimizer and data position
  # come back, so the steps equal one process with 8 devices that never stopped.
  flags = _task(tmp_path) + ["--config.task.epochs=2", "--config.checkpoint.every_steps=3"]  # 16 steps
  reference = _launch(flags, tmp_path / "one", 1, 8)[0]
  _, err = reference.communicate(timeout=600)
  assert reference.returncode == 0, err[-3000:]
  checkpoints = lambda: sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  for count in (2, 1, 2):
    last = checkpoints()[-1] if (tmp_path / "run" / "checkpoints").exists() else 0
    killed = _launch(flags, tmp_path / "run", count, 8 // count, output=subprocess.DEVNULL)  # nobody reads pipes
    deadline = time.time() + 300
    while killed[0].poll() is None and time.time() < deadline and not (
        (tmp_path / "run" / "checkpoints").exists() and checkpoints() and checkpoints()[-1] > last):
      time.sleep(0.1)  # until its first checkpoint is complete
    for p in killed:
      p.send_signal(signal.SIGKILL)
      p.wait()
    assert last < checkpoints()[-1] < 16, checkpoints()  # killed mid-run, after a checkpoint of its own
  resumed = _launch(flags, tmp_path / "run", 4, 2)
  outputs = [p.communicate(timeout=600) for p in resumed]
  assert all(p.returncode == 0 for p in resumed), outputs[0][1][-3000:]
  assert "resumed from" in outputs[0][0]
  one, run = _losses(tmp_path / "one"), _losses(tmp_path / "run")
  assert sorted(one) == sorted(run) == list(range(1, 17))
  np.testing.assert_allclose([run[s] for s in sorted(run)], [one[s] for s in sorted(one)], rtol=2e-6)
  report_one, report_run = _report(tmp_path / "one"), _report(tmp_path / "run")
  assert report_run["sentences"] == report_one["sentences"] == 16
  assert abs(report_run["token_accuracy"] - report_one["token_accuracy"]) < 1e-6
