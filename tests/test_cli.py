"""Every command-line tool reports an error the user can fix as one `error: ...` line with exit status 2, in a
subprocess as a user runs it; --verbosity=1 brings the traceback back. A second Ctrl-C ends a run at once."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN = ["gptjax.main", "--config=configs/quickstart.py"]
SST2 = ["gptjax.main", "--config=configs/sst2.py:{tmp}/sst2"]  # a task config on 8 rows
NOT_A_RUN = "is neither a run directory (no checkpoints/ inside) nor an exported model"


def _run(*command: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command, message", [
    (MAIN + ["--config.model.dropout=2"], "model.dropout=2.0 must be in [0, 1)"),  # a bad config value
    (MAIN + ["--config.mesh.tensor=3"], "are not divisible by the fixed degrees' product 3"),  # a mesh that does not fit
    (MAIN + ["--config.data.path={tmp}/missing.txt"], "data.path='{tmp}/missing.txt' does not exist"),
    (["gptjax.prepare", "--config=configs/quickstart.py", "--config.data.path={tmp}/missing.txt"], "does not exist"),
    (["gptjax.sample", "--workdir={tmp}"], NOT_A_RUN),
    (["gptjax.sample", "--workdir={tmp}/corrupt"], "checkpoint {tmp}/corrupt/checkpoints/5 cannot be read"),
    (["gptjax.evaluate", "--workdir={tmp}", "--data={tmp}/missing.txt"], NOT_A_RUN),
    (["gptjax.export", "--workdir={tmp}", "--out={tmp}/export"], NOT_A_RUN),
    (["gptjax.hf", "export", "--workdir={tmp}", "--out={tmp}/hf"], NOT_A_RUN),
    (["gptjax.plan", "--config=configs/quickstart.py", "--devices=8", "--mesh=3,1,1"], "needs 3 devices but 8"),
    (["gptjax.plot", "--workdir={tmp}"], "metrics.jsonl does not exist"),
    # Task, LoRA and AdaLoRA settings, refused before the base (runs/task_pretrain, absent) is loaded.
    (SST2 + ["--config.task.eval_batch_size=0"], "task.eval_batch_size=0 must be a positive multiple"),
    (SST2 + ["--config.lora.rank=4", "--config.lora.targets=qkv,bogus"], "lora.targets='qkv,bogus': ['bogus']"),
    (SST2 + ["--config.lora.rank=12", "--config.lora.method=adalora", "--config.lora.tfinal=999999"],
     "lora.tinit=0 + lora.tfinal=999999 leave no rank-pruning phase in this run's 2 steps"),
    (SST2 + ["--config.model.n_layer=3"], "model.n_layer=3: fine-tuning does not use it"),
    (SST2 + ["--config.train.micro_batch_size=-1"], "train.micro_batch_size=-1 (search the largest that fits) is "
                                                   "for pretraining"),
])
def test_a_user_error_is_one_line_and_exit_status_2(tmp_path, command, message):
  (tmp_path / "corrupt" / "checkpoints" / "5").mkdir(parents=True)  # a step directory with nothing readable in it
  (tmp_path / "sst2").mkdir()
  for name in ("train.tsv", "dev.tsv"):
    (tmp_path / "sst2" / name).write_text("sentence\tlabel\n" + "a fine film\t1\nawful\t0\n" * 4)
  command = [arg.format(tmp=tmp_path) for arg in command]
  if command[0] in ("gptjax.main", "gptjax.prepare"):
    command.append(f"--workdir={tmp_path / 'run'}")
  result = _run(*command)
  lines = result.stderr.splitlines()
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  # Library warnings (absl/Orbax lines) may come before it; the error is the one last line.
  assert lines[-1].startswith("error: ") and message.format(tmp=tmp_path) in lines[-1], result.stderr[-3000:]
  assert sum(line.startswith("error: ") for line in lines) == 1


def test_verbosity_1_shows_the_traceback_of_a_user_error(tmp_path):
  result = _run(*MAIN, f"--workdir={tmp_path}", "--config.mesh.tensor=3", "--verbosity=1")
  assert result.returncode not in (0, 2)
  assert "Traceback" in result.stderr and "ConfigError: mesh" in result.stderr, result.stderr[-3000:]
  assert "\nerror: " not in result.stderr


CTRL_C_TWICE = """
import os, signal, time
import jax, jax.numpy as jnp
from gptjax import cli, loop

def main(argv):
  step = jax.jit(lambda x: jax.lax.fori_loop(0, 10**6, lambda i, x: jnp.tanh(x @ x), x))
  with loop.StopFlag() as stop:
    in_flight = step(jnp.ones((256, 256)))  # a step that would run for hours
    stop.busy_until = time.perf_counter() + 3600  # as the loop sets it from its estimate
    os.kill(os.getpid(), signal.SIGINT)  # stop after the step...
    os.kill(os.getpid(), signal.SIGINT)  # ...no: now
    in_flight.block_until_ready()

cli.run(main)
"""


def test_ctrl_c_says_how_long_the_step_needs_and_twice_aborts_at_once():
  # An ordinary exit would wait for the step in flight: the timeout would end the test.
  result = subprocess.run([sys.executable, "-c", CTRL_C_TWICE], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 130, result.stderr[-3000:]
  assert re.search(r"SIGINT received: stopping after the steps already started, which need about (59m\d\ds|1h00m) "
                   r"more, then saving a checkpoint\. Ctrl-C again aborts at once", result.stderr), result.stderr
  assert "Traceback" not in result.stderr and result.stderr.splitlines()[-1] == "aborted by Ctrl-C", result.stderr
