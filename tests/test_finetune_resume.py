"""Fine-tuning runs through the one training loop: a LoRA NER run on 2 processes killed mid-epoch (SIGKILL) and
resumed on 1 gives the same per-step losses as 1 process x 8 devices that never stopped."""

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


def _launch(flags, workdir, count: int, devices: int, output=subprocess.PIPE) -> list[subprocess.Popen]:
  """`count` processes of `devices` devices each on 127.0.0.1 (one: no coordinator)."""
  port = _free_port()
  distributed = lambda i: ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
                            f"--process_id={i}"] if count > 1 else [])
  return [subprocess.Popen(_command(flags, workdir) + distributed(i), cwd=ROOT, env=_env(devices),
                           stdout=output, stderr=output, text=True) for i in range(count)]


@pytest.mark.slow
def test_a_killed_fine_tune_resumes_on_another_process_count_like_one_uninterrupted_process(tmp_path):
  # 2 processes x 4 devices killed (SIGKILL) mid-epoch, resumed by 1 process x 8 devices, dropout on (the config's
  # 0.1): every layout builds the same global batches, and the adapters, optimizer and data position come back, so
  # the steps equal one process with 8 devices that never stopped. (1 -> 2 and 2 -> 4 processes: pretraining's
  # tests/test_multiprocess.py, the same data stream.)
  flags = _task(tmp_path) + ["--config.task.epochs=2"]  # 16 steps, checkpoints every 5
  reference = _launch(flags, tmp_path / "one", 1, 8)[0]
  _, err = reference.communicate(timeout=600)
  assert reference.returncode == 0, err[-3000:]
  killed = _launch(flags, tmp_path / "run", 2, 4, output=subprocess.DEVNULL)  # nobody reads their pipes
  _wait_for_step(tmp_path / "run", 7, killed[0])  # after the checkpoint at 5
  for p in killed:
    p.send_signal(signal.SIGKILL)
    p.wait()
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < 16 and saved[-1] % 8, saved  # killed mid-run, last checkpoint mid-epoch
  resumed = _launch(flags, tmp_path / "run", 1, 8)[0]
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0 and "resumed from" in out, err[-3000:]
  one, run = _losses(tmp_path / "one"), _losses(tmp_path / "run")
  assert sorted(one) == sorted(run) == list(range(1, 17))
  np.testing.assert_allclose([run[s] for s in sorted(run)], [one[s] for s in sorted(one)], rtol=2e-6)
  report_one, report_run = _report(tmp_path / "one"), _report(tmp_path / "run")
  assert report_run["sentences"] == report_one["sentences"] == 16
  assert abs(report_run["token_accuracy"] - report_one["token_accuracy"]) < 1e-6
