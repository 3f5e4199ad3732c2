"""The README's "which config for which hardware" TPU rows, from the TPU compiler (libtpu, compile-only, any machine).

  python -m benchmarks.tpu_plans [--sizes=small,medium,large,xl] [--tpus=v5e-1,v5e-8,v5p-8,v5p-64,v6e-8]

For each GPT-2 size and accelerator type: the config's train step in bfloat16 with FSDP over every chip
(mesh.data=1, mesh.fsdp=-1), planned by `gptjax.plan.plan_tpu` exactly as `python -m gptjax.plan --tpu=TYPE` plans
it: the micro-batch searched as `train.micro_batch_size=-1` searches it at start-up, on the compiler's memory; when no
micro-batch fits, the same with model.remat='dots', then 'full'. Prints one Markdown row per cell as it goes (memory
per chip and the step-time bound are the compiler's; the compute bound is model FLOPs at the chip's peak) and, last,
every plan as JSON.
"""

import json
import platform
import time

from absl import app, flags
from absl import logging

from gptjax import config as config_lib, plan, tpu

SIZES = flags.DEFINE_list("sizes", ["small", "medium", "large", "xl"], "GPT-2 sizes.")
TPUS = flags.DEFINE_list("tpus", ["v5e-1", "v5e-8", "v5p-8", "v5p-64", "v6e-8"], "Accelerator types.")


def plan_cell(size: str, accelerator: str) -> dict:
  """The first of remat none, dots, full whose step fits, planned for `accelerator` (or the last one tried)."""
  slice_ = tpu.parse(accelerator)
  for remat in ("none", "dots", "full"):
    config = config_lib.gpt2_config(size)
    config.model.update(dtype="bfloat16", remat=remat)
    config.mesh.update(data=1, fsdp=-1)
    result = plan.plan_tpu(config, slice_)
    if result["fits"] or result.get("state_exceeds_chip"):
      break
  return result


def row(size: str, result: dict, seconds: float) -> str:
  gib = lambda b: f"{b / 2**30:.1f}"
  if result.get("state_exceeds_chip"):
    needed = result["fsdp_needed"]["fsdp"] if result["fsdp_needed"] else "?"
    verdict = f"no: state {gib(result['params_bytes'] + result['optimizer_bytes'])} GiB/chip; FSDP >= {needed} chips"
    return f"| {size} | {result['tpu']} | {verdict} | | | | | | {seconds:.0f} s |"
  if not result["fits"]:
    return f"| {size} | {result['tpu']} | no, even with remat=full at micro-batch 1 | | | | | | {seconds:.0f} s |"
  bound = "compute-bound" if result["mfu_ceiling"] >= 1 else f"memory-bound: MFU <= {result['mfu_ceiling']:.0%}"
  return (f"| {size} | {result['tpu']} | yes | {result['micro_batch']} x {result['accumulation']} | "
          f"{result['remat']} | {gib(result['total_bytes'])} of {gib(result['chip']['hbm_bytes'])} | "
          f"{result['bytes_per_token'] / 1e6:.2f} MB | {result['step_time_bound_s']:.2f} s ({bound}) | {seconds:.0f} s |")


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")
  print(f"TPU compiler: libtpu {tpu.libtpu_version()} (compile-only) on {platform.processor() or platform.machine()}")
  print("| GPT-2 | TPU | fits | micro-batch x accumulation | remat | HBM per chip (GiB) | bytes per token | step >= | "
        "plan took |")
  print("|---|---|---|---|---|---|---|---|---|")
  results = []
  for size in SIZES.value:
    for accelerator in TPUS.value:
      start = time.perf_counter()
      result = plan_cell(size, accelerator)
      print(row(size, result, time.perf_counter() - start), flush=True)
      results.append(dict(size=size, **result))
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
