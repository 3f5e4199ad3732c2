"""The training loop (gptjax/loop.py) as `python -m gptjax.main` runs it: the config's dropout is what trains, the
token bookkeeping, and a stop that saves before the final evaluation."""

import json
import os
import signal

import jax
import numpy as np
from flax import nnx

from gptjax import loop, pretrain
from gptjax.model import GPT, GPTConfig
from tests.helpers import quick_run_config, random_tokens


def _train_losses(workdir) -> list[float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["train_loss"] for r in rows if "train_loss" in r]


def _losses_of_a_run_with(tmp_path, corpus, steps: int, **model) -> list[float]:
  """The train loss of every step of a quick run with these model settings."""
  config = quick_run_config(corpus, steps=steps)
  config.model.update(model)
  config.log.every_steps = 1
  workdir = tmp_path / "_".join(f"{name}{value}" for name, value in model.items())
  loop.run(config, str(workdir))
  return _train_losses(workdir)


def test_the_configs_dropout_is_what_trains(tmp_path, corpus):
  runs = {dropout: _losses_of_a_run_with(tmp_path, corpus, 2, dropout=dropout) for dropout in (0.0, 0.3)}
  # Step 1 starts from the same parameters: only dropout can make its loss differ.
  assert len(runs[0.0]) == len(runs[0.3]) == 2
  assert all(abs(a - b) > 1e-4 for a, b in zip(runs[0.0], runs[0.3])), runs


def test_row_groups_train_the_same_model(tmp_path, corpus, capsys):
  """model.row_groups only changes how XLA may schedule the step: the run says so, and logs one group's losses."""
  runs = {}
  for groups in (1, 2):
    runs[groups] = _losses_of_a_run_with(tmp_path, corpus, 4, row_groups=groups)
    assert ("| row groups 2" in capsys.readouterr().out) == (groups == 2)
  assert len(runs[1]) == 4
  np.testing.assert_allclose(runs[2], runs[1], rtol=2e-5)


def test_dropout_0_is_bitwise_independent_of_the_dropout_key():
  cfg = GPTConfig(vocab_size=32, n_layer=2, n_head=4, n_embd=32, block_size=16, attention="xla", dropout=0.0)
  model = GPT(cfg, nnx.Rngs(0))
  tokens = random_tokens((2, 16), vocab=32)
  np.testing.assert_array_equal(model(tokens, jax.random.key(7)), model(tokens, None))


def test_tokens_seen_and_rates_count_each_token_once(tmp_path, corpus):
  info = loop.run(quick_run_config(corpus, steps=6), str(tmp_path))
  s = info.summary
  assert s["tokens_per_step"] == 8 * 16 and s["tokens_seen"] == 6 * 8 * 16  # batch x context
  np.testing.assert_allclose(s["tokens_per_sec"], 8 * 16 / s["median_step_seconds"])


def test_a_stop_saves_before_the_final_evaluation_and_a_second_signal_skips_it(tmp_path, corpus, monkeypatch):
  """SIGTERM at step 3: the checkpoint of the stop step exists when the final evaluation starts; a second SIGTERM
  (the grace period ending) cuts the evaluation short and the summary says so."""
  build_job, seen = pretrain.build, {}

  def build_with_signals(*args, **kwargs):
    job = build_job(*args, **kwargs)
    tokens, evaluate, steps = job.tokens, job.evaluate, []

    def signal_at_step_3(batch):  # called once per step, after the step is dispatched
      steps.append(1)
      if len(steps) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return tokens(batch)

    def final_evaluation_killed(params, final):
      if final:
        seen["checkpoints"] = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
        os.kill(os.getpid(), signal.SIGTERM)
      return evaluate(params, final)

    job.tokens, job.evaluate = signal_at_step_3, final_evaluation_killed
    return job

  monkeypatch.setattr(pretrain, "build", build_with_signals)
  info = loop.run(quick_run_config(corpus, steps=50, eval_every=2), str(tmp_path))
  assert info.stopped_by == "SIGTERM" and info.step == 3
  assert seen["checkpoints"][-1] == 3  # saved (and complete) before the evaluation began
  assert info.summary["final_evaluation"] == "skipped: SIGTERM received"
  assert json.loads((tmp_path / "summary.json").read_text())["checkpoint"].endswith("checkpoints/3")
  # The saved state resumes: the rerun trains on from step 3.
  monkeypatch.undo()
  again = loop.run(quick_run_config(corpus, steps=4), str(tmp_path))
  assert again.summary["steps_run"] == 1 and again.summary["final_evaluation"] == "done"
