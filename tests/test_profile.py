"""The profiler switch (log.profile_steps) and the end-of-run summary of `loop.run`."""

import gzip
import json

import numpy as np
import pytest

from gptjax import config as config_lib, loop
from tests.helpers import tiny_config


@pytest.mark.devices(8)
@pytest.mark.slow
def test_profiled_run_writes_a_trace_and_a_summary(tmp_path, corpus, capsys):
  config = tiny_config(steps=6, batch_size=8, mesh=(4, 2, 1), eval_every=0, eval_batches=2)
  config.data.update(path=str(corpus), vocab_size=300)
  config.log.update(profile_steps="3:4", samples=0, tensorboard=False, every_steps=2)
  info = loop.run(config, str(tmp_path))

  traces = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
  # The trace holds steps 3 and 4 (both included), each executed once on device 0.
  events = json.load(gzip.open(next(traces[0].parent.glob("*.trace.json.gz"))))["traceEvents"]
  assert sorted(e["args"]["step_num"] for e in events if e.get("name") == "train") == ["3", "4"]
  assert sum("[0] CommonPjRtLoadedExecutable::Execute" in e.get("name", "") for e in events) == 2
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary == info.summary
  assert summary["step"] == summary["steps_run"] == 6
  assert summary["tokens_seen"] == 6 * 8 * 16  # steps x batch x context
  assert summary["checkpoint"].endswith("checkpoints/6")
  assert 0 < summary["median_step_seconds"] < summary["wall_seconds"]
  np.testing.assert_allclose(summary["tokens_per_sec"], 8 * 16 / summary["median_step_seconds"])
  assert 0 < summary["mfu"] < 1
  assert summary["peak_device_memory_bytes"] is None  # CPU devices report no memory statistics
  assert summary["train_loss"] == info.train_loss and summary["final_val_loss"] == info.final_val_loss
  out = capsys.readouterr().out
  assert "done: step 6 (6 this run, 768 tokens seen)" in out and "summary.json" in out

  # A resumed run counts the tokens of the whole training but the steps of this run.
  config.train.steps = 8
  config.log.profile_steps = ""
  summary = loop.run(config, str(tmp_path)).summary
  assert (summary["step"], summary["steps_run"], summary["tokens_seen"]) == (8, 2, 8 * 8 * 16)


@pytest.mark.parametrize("value, message", [
    ("3", "log.profile_steps='3' is not two step numbers: use 'a:b'"),
    ("a:b", "is not two step numbers"),
    ("5:3", "1 <= a <= b"),
    ("0:2", "1 <= a <= b"),
    ("1:2:3", "is not two step numbers"),
    ("10:30", "ends after train.steps=20"),
])
def test_bad_profile_steps_are_rejected(value, message):
  config = tiny_config()
  config.log.profile_steps = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, 1)


def test_profile_steps_are_inclusive():
  config = tiny_config()
  config.log.profile_steps = "10:12"
  assert config_lib.profile_range(config) == (10, 12)
  config.log.profile_steps = ""
  assert config_lib.profile_range(config) is None
