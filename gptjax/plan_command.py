"""`python -m gptjax.plan`: the planner's command line and its printed report (the planner itself: gptjax/plan.py).
"""

import json
import os

import jax

from gptjax import anatomy as anatomy_lib, config as config_lib, plan as planner, tpu

_CONFIG = None  # --config, defined by `main`


def print_tpu_plan(plan: dict, libtpu_version: str) -> None:
  """The TPU plan for a person, each figure with its source; the last line is the plan as one JSON object."""
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  chip = plan["chip"]
  hbm = chip["hbm_bytes"]
  print(f"--tpu={plan['tpu']}: {plan['chips']} x TPU {chip['generation']} (topology {plan['topology']}); per chip "
        f"{chip['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {gib(hbm)} HBM usable, {chip['hbm_bytes_per_s'] / 1e9:.0f} "
        f"GB/s (gptjax.tpu.CHIPS); compiled by the TPU compiler (libtpu {libtpu_version}, compile-only)")
  print(f"mesh {plan['mesh']} | model.dtype={plan['dtype']} model.remat={plan['remat']} | model.attention: "
        f"{plan['attention']}" + (f" ({plan['mosaic_kernels']} Mosaic kernels in the step)"
                                  if plan.get("mosaic_kernels") else ""))
  if plan["attention"].startswith("auto -> xla"):
    print("  note: splash attention does not compile for these shapes (the warning above says why): a run with "
          "model.attention='auto' falls back to 'xla' attention, as this plan did.")
  how = ("train.micro_batch_size=-1: the largest that fits, searched on the TPU compiler's memory"
         if plan["searched_micro_batch"] else "the config's train.micro_batch_size, or 1 for -1 when nothing fits")
  print(f"micro-batch {plan['micro_batch']} per data-parallel shard x {plan['accumulation']} accumulation steps "
        f"({how})")
  state = plan["params_bytes"] + plan["optimizer_bytes"]
  print(f"per chip, state (exact, from the shardings): parameters {gib(plan['params_bytes'])} + optimizer "
        f"{gib(plan['optimizer_bytes'])} = {gib(state)}")
  if plan.get("state_exceeds_chip"):
    print(f"DOES NOT FIT: the parameters and optimizer state alone take {gib(state)} per chip, more than "
          f"{planner.HEADROOM:.0%} of the {gib(hbm)} HBM of one {chip['generation']} chip; no micro-batch or remat "
          "can fix that.")
    if plan["fsdp_needed"]:
      n = plan["fsdp_needed"]["fsdp"]
      print(f"  it needs FSDP over at least {n} chips ({gib(plan['fsdp_needed']['state_bytes'])} of state per chip, "
            f"half the HBM left for activations): plan it with --tpu={chip['generation']}-"
            f"{n * 2 if chip['counts_cores'] else n} --config.mesh.data=1 --config.mesh.fsdp=-1")
  if plan["compiled"]:
    print(f"per chip (TPU compiler's memory_analysis): arguments {gib(plan['argument_bytes'])} | temporaries "
          f"{gib(plan['temp_bytes'])} | outputs {gib(plan['output_bytes'])} (the state is updated in place) | code "
          f"{gib(plan['code_bytes'])} | total {gib(plan['total_bytes'])} of {gib(hbm)} HBM "
          f"({plan['total_bytes'] / hbm:.0%}){': fits' if plan['fits'] else ''}")
    print(f"collectives in the compiled step: {plan['collectives']}")
  else:
    print(f"the TPU compiler refuses the step: {plan['compiler_error']}")
  print(f"model FLOPs per step: {plan['model_flops_per_step']:.3g} (6 x parameters + attention per token, "
        f"gptjax.model.flops_per_token; the compiler counts splash's FLOPs as 0)")
  if "step_time_bound_s" in plan:
    print(f"roofline: compute {plan['roofline_compute_s']:.3f} s (model FLOPs at peak) | memory "
          f"{plan['roofline_memory_s']:.3f} s (the compiler's bytes accessed at HBM bandwidth: "
          f"{plan['bytes_per_token'] / 1e6:.2f} MB per token) -> step >= "
          f"{plan['step_time_bound_s']:.3f} s, MFU <= {plan['mfu_ceiling']:.0%}")
  for row in plan.get("variants", []):
    if "total_bytes" in row:
      print(f"  with model.dtype={row['dtype']} model.remat={row['remat']}: total {gib(row['total_bytes'])} per chip "
            f"(TPU compiler): {'fits' if row['fits'] else 'does not fit'}; micro-batch up to "
            f"~{row['max_micro_batch']}")
    else:
      print(f"  with model.dtype={row['dtype']} model.remat={row['remat']}: still refused: {row['compiler_error']}")
  if "anatomy" in plan:
    anatomy_lib.print_anatomy(plan["anatomy"])
  print(json.dumps(plan))


def _main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  jax.config.update("jax_platforms", "cpu")  # fake CPU devices, or a TPU slice's compile-only devices (--tpu)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={f.devices}").strip()
  config = _CONFIG.value
  if f.mesh:
    config.mesh.update(dict(zip(config_lib.MESH_AXES, (int(d) for d in f.mesh.split(",")))))
  if f.tpu:
    slice_ = tpu.parse(f.tpu)
    tpu.devices(slice_)  # a missing libtpu is one error line before any work
    config_lib.validate(config, slice_.chips)
    print_tpu_plan(planner.plan_tpu(config, slice_, anatomy=f.anatomy), tpu.libtpu_version())
    return
  if f.anatomy:
    raise config_lib.ConfigError("--anatomy reads the TPU compiler's numbers: give it with --tpu=TYPE (e.g. v5e-1).")
  if config.train.micro_batch_size == -1:
    config.train.micro_batch_size = f.micro_batch
  config_lib.validate(config, f.devices)
  if f.platform:
    report = planner.check_lowering(config, jax.devices()[:f.devices], f.platform)
    print(f"train step for {f.platform} on mesh {report['mesh']}, model.attention: {report['attention']}: " +
          (f"lowered; attention as lowered: {report['lowered']}" if report["ok"] else f"FAILED: {report['error']}"))
    if "note" in report:
      print(f"note: {report['note']}")
    print(json.dumps(report))
    raise SystemExit(0 if report["ok"] else 1)
  plan = planner.analyze(config, jax.devices()[:f.devices])
  hbm = int(f.hbm_gib * 2**30)
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  print(f"mesh {plan['mesh']} on {f.devices} devices | micro-batch {plan['micro_batch']} x "
        f"{plan['accumulation']} accumulation steps")
  print(f"per device: params {gib(plan['params_bytes'])} | optimizer {gib(plan['optimizer_bytes'])} | "
        f"step temporaries (activations, gradients) {gib(plan['temp_bytes'])} | total {gib(plan['total_bytes'])} "
        f"of {gib(hbm)} HBM")
  # XLA's cost_analysis counts a loop body once (scan over layers and micro-batches): model FLOPs instead.
  print(f"model FLOPs per step: {plan['model_flops_per_step']:.3g} ({plan['model_flops_per_step'] / f.devices:.3g} "
        f"per device) | collectives in the compiled step: {plan['collectives']}")
  if plan["total_bytes"] > planner.HEADROOM * hbm:
    print(f"WARNING: {gib(plan['total_bytes'])} per device exceeds {planner.HEADROOM:.0%} of {gib(hbm)}: raise "
          "mesh.fsdp, lower train.micro_batch_size, set model.dtype='bfloat16' or model.remat (see the suggestions "
          "below).")
  print("suggestions (state as the rules place it; micro-batch a linear estimate from this compile):")
  for row in planner.suggest(config, plan, f.devices, hbm):
    print(f"  fsdp={row['fsdp']:<4d} state {row['state_gib']:.2f} GiB/device, micro-batch up to "
          f"{row['max_micro_batch']}" + (" (a sharded dimension is not divisible by this degree: replicated)"
                                         if row["replicated"] else ""))
  if f.variants:
    plan["variants"] = planner.variants(config, jax.devices()[:f.devices], plan, hbm)
  if plan.get("variants"):
    print(f"measured variants (compiled on this mesh at micro-batch {plan['micro_batch']}):")
    for row in plan["variants"]:
      print(f"  model.dtype={row['dtype']:<8s} model.remat={row['remat']:<4s} temporaries "
            f"{gib(row['temp_bytes'])} | total {gib(row['total_bytes'])} | "
            f"{'fits' if row['fits'] else 'does not fit'}; micro-batch up to {row['max_micro_batch']}")
    if any(row["dtype"] == "bfloat16" for row in plan["variants"]):
      print("  note: XLA:CPU, which compiles this plan, computes bfloat16 elementwise ops in float32 and keeps those "
            "results for the backward pass, so the bfloat16 rows show little saving here; the remat rows hold.")
  print(json.dumps(plan))


def main() -> None:
  """Defines the command's flags and runs it."""
  global _CONFIG  # pylint: disable=global-statement
  from absl import flags
  from ml_collections import config_flags
  from gptjax import cli
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt2_xl.py.")
  flags.DEFINE_integer("devices", 8, "Devices to plan for (fake CPU devices stand in for them).")
  flags.DEFINE_string("mesh", "", "data,fsdp,tensor degrees (default: the config's).")
  flags.DEFINE_integer("micro_batch", 1, "Micro-batch per data-parallel shard when the config says -1 (auto).")
  flags.DEFINE_float("hbm_gib", 16.0, "Memory of one device in GiB (TPU v5e: 16, v5p: 95, H100: 80).")
  flags.DEFINE_string("tpu", None, "Plan for this Cloud TPU accelerator type (v5e-1, v5litepod-8, v5p-64, v6e-16, "
                      "v4-32, ...) with the real TPU compiler (libtpu, compile-only: no TPU needed) instead of fake "
                      "CPU devices; --devices and --hbm_gib then come from the type.")
  flags.DEFINE_enum("platform", None, ["tpu", "cuda", "cpu"], "Instead of the memory plan: lower the train step "
                    "for this platform (jax.export, no device needed) and report the attention kernel as lowered.")
  flags.DEFINE_bool("anatomy", False, "With --tpu: also the step's bytes and FLOPs per token by part (embedding, "
                    "attention, MLP, layer norms, LM head + loss, optimizer, ...) against each part's floor, and its "
                    "costliest instructions with their gptjax source lines (gptjax.anatomy).")
  flags.DEFINE_bool("variants", True, "When the plan exceeds hbm_gib, also compile it with bfloat16 activations "
                    "and remat (one compile each) and report their measured memory.")
  flags.mark_flag_as_required("config")
  cli.run(_main)
