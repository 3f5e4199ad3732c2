"""Memory planning from XLA's own numbers: compile the train step ahead of time and read its memory use.

`fit_micro_batch` picks the largest micro-batch whose compiled step fits the device, for
`train.micro_batch_size = -1` (the GPT-2 configs' default): the same config then runs on a 24 GB CPU and an
80 GB GPU without editing.
"""

import os

import jax
import numpy as np
from absl import logging

from gptjax import config as config_lib, sharding, train

HEADROOM = 0.85  # of device memory: XLA's estimate excludes allocator fragmentation and the input pipeline


def device_memory_bytes() -> int:
  """Memory of one local device: its HBM limit, or this host's RAM shared by its CPU devices."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def step_memory_bytes(config, graphdef, abstract_state, shardings, mesh, tx, micro: int) -> int:
  """Per-device bytes of one compiled train step with this micro-batch (temporaries + arguments)."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  accum = config.train.batch_size // (micro * dp)
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  batch = jax.ShapeDtypeStruct((accum, micro * dp, config.model.block_size + 1), np.int32,
                               sharding=sharding.batch_sharding(mesh, 3, 1))
  analysis = step.lower(abstract_state, batch).compile().memory_analysis()
  return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes)


def fit_micro_batch(config, graphdef, abstract_state, shardings, mesh, tx) -> int:
  """The largest micro-batch (per data-parallel shard, dividing the batch) whose step fits in device memory."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  per_shard = config.train.batch_size // dp
  candidates = [m for m in range(per_shard, 0, -1) if per_shard % m == 0]
  budget = HEADROOM * device_memory_bytes()
  # Memory grows ~linearly with the micro-batch: measure at one size, guess, then confirm by compiling.
  probe = candidates[min(len(candidates) - 1, len(candidates) // 2)]
  probe_bytes = step_memory_bytes(config, graphdef, abstract_state, shardings, mesh, tx, probe)
  fixed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)) // max(1, mesh.size)
  per_sequence = max(1, (probe_bytes - fixed) / probe)
  for micro in candidates:
    if fixed + per_sequence * micro > budget:
      continue
    used = step_memory_bytes(config, graphdef, abstract_state, shardings, mesh, tx, micro)
    if used <= budget:
      logging.info("micro-batch %d: %.1f GiB of %.1f GiB", micro, used / 2**30, budget / 2**30)
      return micro
  raise config_lib.ConfigError(
      f"even a micro-batch of 1 sequence needs ~{(fixed + per_sequence) / 2**30:.1f} GiB per device but "
      f"{budget / 2**30:.1f} GiB are usable; set model.remat='full', raise mesh.fsdp, or use bigger devices.")
