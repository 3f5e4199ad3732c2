"""The micro-batch planner picks the largest micro-batch whose compiled step fits the device memory."""

import pytest

from gptjax import config as config_lib, plan, sharding, train
from gptjax.model import GPTConfig
from tests.helpers import tiny_config


def test_fit_micro_batch_follows_compiled_memory(monkeypatch):
  config = tiny_config(batch_size=32, micro_batch_size=-1, mesh=(2, 1, 1), block_size=64)
  mesh = sharding.make_mesh(config, sharding.jax.devices()[:2])
  tx = train.make_optimizer(config)
  args = (config, *train.abstract_state(config, GPTConfig.from_config(config.model, 128), mesh, tx), mesh, tx)
  sizes = {m: plan.step_memory_bytes(*args, m) for m in (4, 8)}
  assert sizes[8] > sizes[4]
  # Room for a little more than the micro-batch-4 step: 4 is chosen, not 8 or 16.
  room = sizes[4] + (sizes[8] - sizes[4]) // 2
  monkeypatch.setattr(plan, "device_memory_bytes", lambda: int(room / plan.HEADROOM))
  assert plan.fit_micro_batch(*args) == 4
  monkeypatch.setattr(plan, "device_memory_bytes", lambda: 10**12)
  assert plan.fit_micro_batch(*args) == 16  # the whole per-shard batch: no accumulation
  monkeypatch.setattr(plan, "device_memory_bytes", lambda: 1000)
  with pytest.raises(config_lib.ConfigError, match="even a micro-batch of 1 sequence"):
    plan.fit_micro_batch(*args)
