"""What dropout costs a train step, per random-bit generator: CPU step time side by side, and the TPU compiler's
bytes and FLOPs of the same step.

  python -m benchmarks.dropout_cost --config=configs/task_pretrain.py --steps=10 [--tpu=v5e-1]

Variants: no dropout; dropout with train.dropout_rng = threefry (JAX's default), rbg, unsafe_rbg. The timed steps
alternate between the variants (round robin) so a machine's drift hits them alike; medians are printed.
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import median, report
from gptjax import config as config_lib, sharding, train
from gptjax.model import GPTConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/task_pretrain.py", "Model config (its dropout is used).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant (after a compile + warm-up step).")
_TPU = flags.DEFINE_string("tpu", "", "Also compile each variant for this TPU (e.g. v5e-1): bytes and FLOPs.")

VARIANTS = {"no dropout": None, "threefry": "threefry", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}


def variant_config(base, rng):
  config = base.copy_and_resolve_references()
  if rng is None:
    config.model.dropout = 0.0
  else:
    config.train.dropout_rng = rng
  return config


def make_step(config, vocab, mesh):
  model_cfg = GPTConfig.from_config(config.model, vocab)
  built = train.build_step(config, model_cfg, mesh)
  return built.step, train.init_state(config, model_cfg, mesh, built.tx)[1]


def tpu_cost(config, tpu: str) -> dict:
  """The TPU compiler's bytes accessed and FLOPs of the variant's step on `tpu` (compile-only, loop-free so that
  every byte counts), the batch split over the slice's chips."""
  from gptjax import plan, tpu as tpu_lib  # pylint: disable=import-outside-toplevel
  devices = tpu_lib.devices(tpu)
  config = config.copy_and_resolve_references()
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(config, devices)
  micro = config.train.batch_size // config_lib.data_parallel_degree(config, len(devices))
  cost = plan.micro_step_program(config, mesh, micro, config.model.n_layer).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"bytes_accessed": cost.get("bytes accessed"), "flops": cost.get("flops")}


def main(_):
  base = _CONFIG.value
  vocab = -(-base.data.vocab_size // base.model.vocab_multiple) * base.model.vocab_multiple
  mesh = sharding.make_mesh(base)
  B, T = base.train.batch_size, base.model.block_size
  tokens = np.random.RandomState(0).randint(0, vocab, (1, B, T + 1)).astype(np.int32)
  tokens = sharding.global_batch(tokens, sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES, 3, 1), batch_dim=1)
  steps, states, times = {}, {}, {name: [] for name in VARIANTS}
  for name, rng in VARIANTS.items():
    steps[name], states[name] = make_step(variant_config(base, rng), vocab, mesh)
    states[name], metrics = steps[name](states[name], tokens)  # compile + warm-up
    jax.block_until_ready(metrics)
  for _ in range(_STEPS.value):
    for name in VARIANTS:
      start = time.perf_counter()
      states[name], metrics = steps[name](states[name], tokens)
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - start)
  base_time = median(times["no dropout"])
  results = {name: {"median_step_seconds": median(t), "vs_no_dropout": median(t) / base_time}
             for name, t in times.items()}
  if _TPU.value:
    for name, rng in VARIANTS.items():
      results[name]["tpu"] = tpu_cost(variant_config(base, rng), _TPU.value)
  rows = [(name, f"step {r['median_step_seconds']:.3f} s ({r['vs_no_dropout']:.2f}x no dropout)" + (
      f" | {_TPU.value}: {r['tpu']['bytes_accessed'] / 1e9:.3f} GB, {r['tpu']['flops'] / 1e9:.2f} GFLOP"
      if "tpu" in r else "")) for name, r in results.items()]
  shape = f"batch {B} x {T}, {base.model.n_layer} layers, width {base.model.n_embd}, dropout {base.model.dropout}"
  report([("step", shape)] + rows, {"config": shape, "results": results})


if __name__ == "__main__":
  app.run(main)
