"""Memory planning from XLA's own numbers: compile the train step ahead of time and read its memory use.

`fit_micro_batch` picks the largest micro-batch whose compiled step fits the device, for
`train.micro_batch_size = -1` (the GPT-2 configs' default): the same config then runs on a 24 GB CPU and an
80 GB GPU without editing. As a command, it plans a launch on fake CPU devices before any accelerator is paid for:

  python -m gptjax.plan --config=configs/gpt2_xl.py --devices=64 --mesh=1,64,1 --hbm_gib=16

When the step exceeds --hbm_gib it is compiled again with remat and bfloat16 activations (`variants`), and the
state per device is worked out for every FSDP degree (`suggest`).

With --platform it checks instead that the train step lowers for a TPU or an NVIDIA GPU (`check_lowering`, via
`jax.export`), with the attention kernel `model.attention` picks there, and reports the kernel as lowered:

  python -m gptjax.plan --config=configs/gpt2_xl.py --devices=8 --mesh=1,8,1 --platform=tpu
"""

import dataclasses
import json
import os
import re

import jax
import numpy as np
from absl import logging

from gptjax import attention, config as config_lib, sharding, train

HEADROOM = 0.85  # of device memory: XLA's estimate excludes allocator fragmentation and the input pipeline


def device_memory_bytes() -> int:
  """Memory of one local device: its HBM limit, or this host's RAM shared by its CPU devices."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def abstract_batch(config, mesh, micro: int = 0) -> jax.ShapeDtypeStruct:
  """The train step's batch [accum, micro * dp, T+1] of tokens, placed as the loop places it (micro-batch: the
  config's by default, 0 = no accumulation)."""
  dp = config_lib.data_parallel_degree(config, mesh.size)
  micro = micro or config.train.micro_batch_size or config.train.batch_size // dp
  return jax.ShapeDtypeStruct((config.train.batch_size // (micro * dp), micro * dp, config.model.block_size + 1),
                              np.int32, sharding=sharding.batch_sharding(mesh, config.mesh.rules, 3, 1))


def step_memory_bytes(config, graphdef, abstract_state, shardings, mesh, tx, micro: int) -> int:
  """Per-device bytes of one compiled train step with this micro-batch (temporaries + arguments)."""
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  analysis = step.lower(abstract_state, abstract_batch(config, mesh, micro)).compile().memory_analysis()
  return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes)


def fit_micro_batch(config, graphdef, abstract_state, shardings, mesh, tx) -> int:
  """The largest micro-batch (per data-parallel shard, dividing the batch) whose step fits in device memory."""
  dp = config_lib.data_parallel_degree(config, mesh.size)
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


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a sharded tree (the shard of every leaf)."""
  return sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
             for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)))


def analyze(config, devices) -> dict:
  """Per-device memory (parameters, optimizer, step temporaries), FLOPs and collectives of the compiled step."""
  from gptjax.model import GPTConfig, count_params, flops_per_token
  mesh = sharding.make_mesh(config, devices)
  model_cfg = GPTConfig.from_config(config.model, config_lib.check_vocab(config, config.data.vocab_size))
  tx = train.make_optimizer(config)
  graphdef, abstract, shardings = train.abstract_state(config, model_cfg, mesh, tx)
  batch = abstract_batch(config, mesh)
  accum, micro = batch.shape[0], batch.shape[1] // (config_lib.data_parallel_degree(config, mesh.size))
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  compiled = step.lower(abstract, batch).compile()
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  n_params = count_params(abstract["params"], exclude_position=True)
  return dict(
      mesh=dict(mesh.shape), micro_batch=micro, accumulation=accum,
      params_bytes=_per_device_bytes(abstract["params"], shardings["params"]),
      optimizer_bytes=_per_device_bytes(abstract["opt_state"], shardings["opt_state"]),
      temp_bytes=int(memory.temp_size_in_bytes), total_bytes=int(memory.temp_size_in_bytes +
                                                                 memory.argument_size_in_bytes),
      model_flops_per_step=flops_per_token(model_cfg, n_params, model_cfg.block_size) * config.train.batch_size *
      model_cfg.block_size,
      collectives={op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in COLLECTIVES})


def lower(step, platform: str, *args) -> jax.export.Exported:
  """A jitted `step` lowered for `platform` ('tpu', 'cuda', 'cpu') on this machine, for abstract `args`."""
  return jax.export.export(step, platforms=[platform])(*args)


def attention_as_lowered(exported: jax.export.Exported) -> str:
  """Which attention kernel a lowered program holds, read from its custom calls."""
  text = exported.mlir_module()
  if "tpu_custom_call" in text:
    return "pallas splash (Mosaic tpu_custom_call)"
  if "__cudnn$fmha" in text:
    return "cudnn (cuDNN fused-attention custom call)"
  return "XLA ops (no fused-attention custom call)"


def check_lowering(config, devices, platform: str) -> dict:
  """The train step lowered for `platform` with the attention kernel `model.attention` picks there.

  Returns {'platform', 'mesh', 'attention' (config -> kernel), 'ok', and 'lowered' (the kernel as lowered) or
  'error'}; 'note' when the kernel cannot be lowered on this machine and its fallback was lowered instead.
  """
  from gptjax.model import GPTConfig
  mesh = sharding.make_mesh(config, devices)
  model_cfg = GPTConfig.from_config(config.model, config_lib.check_vocab(config, config.data.vocab_size))
  report = dict(platform=platform, mesh=dict(mesh.shape), attention=model_cfg.attention)
  try:
    kernel = attention.resolve(model_cfg.attention, model_cfg.dtype, platform)
    if kernel == "cudnn" and attention.device_platform() != "gpu":
      # jax reads the installed cuDNN's version while tracing: no cuDNN kernel without a GPU.
      report["note"] = ("cudnn lowers only on a machine with cuDNN (a GPU); lowered 'xla' instead, the kernel "
                        "'auto' falls back to when cuDNN does not compile on the device")
      kernel = "xla"
    report["attention"] += f" -> {kernel}"
    model_cfg = dataclasses.replace(model_cfg, attention=kernel, platform=platform)
    tx = train.make_optimizer(config)
    graphdef, abstract, shardings = train.abstract_state(config, model_cfg, mesh, tx)
    placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    exported = lower(train.make_train_step(graphdef, tx, config, shardings, mesh), platform, placed,
                     abstract_batch(config, mesh))
  except Exception as e:  # the point is to report whatever the lowering raises
    return dict(report, ok=False, error=f"{type(e).__name__}: {e}")
  return dict(report, ok=True, lowered=attention_as_lowered(exported))


def _max_micro_batch(plan: dict, hbm_bytes: int, state_bytes: float | None = None) -> int:
  """The largest micro-batch that fits beside `state_bytes` (default: the plan's state), linear in sequences."""
  plan_state = plan["params_bytes"] + plan["optimizer_bytes"]
  per_sequence = max(1, (plan["total_bytes"] - plan_state) / plan["micro_batch"])
  state_bytes = plan_state if state_bytes is None else state_bytes
  return max(int((HEADROOM * hbm_bytes - state_bytes) // per_sequence), 0)


def suggest(config, plan: dict, n_devices: int, hbm_bytes: int) -> list[dict]:
  """For each FSDP degree: the state per device as the rules place it, and the largest micro-batch that fits.

  The state is exact (shardings on a mesh of that shape); the micro-batch is a linear estimate from the plan's
  bytes per sequence. `replicated` marks degrees that some sharded dimension is not divisible by (e.g. GPT-2 XL's
  embed=1600 by 256): those dimensions stay whole on every device.
  """
  from gptjax.model import GPTConfig
  model_cfg = GPTConfig.from_config(config.model, config_lib.check_vocab(config, config.data.vocab_size))
  tx = train.make_optimizer(config)
  tensor = plan["mesh"]["tensor"]
  rows, fsdp = [], 1
  while fsdp * tensor <= n_devices:
    if n_devices % (fsdp * tensor) == 0:
      mesh = jax.sharding.AbstractMesh((n_devices // (fsdp * tensor), fsdp, tensor), config_lib.MESH_AXES,
                                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
      _, abstract, shardings = train.abstract_state(config, model_cfg, mesh, tx)
      state = {k: abstract[k] for k in ("params", "opt_state")}
      per_device = _per_device_bytes(state, {k: shardings[k] for k in state})
      whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
      rows.append(dict(fsdp=fsdp, state_gib=per_device / 2**30, replicated=per_device > 1.25 * whole / (fsdp * tensor),
                       max_micro_batch=_max_micro_batch(plan, hbm_bytes, per_device)))
    fsdp *= 2
  return rows


def variants(config, devices, plan: dict, hbm_bytes: int) -> list[dict]:
  """When `plan` exceeds the HBM: the step compiled again with bf16 activations and/or remat, measured.

  Each row is one (model.dtype, model.remat) other than the config's, on the same mesh and micro-batch, with
  XLA's temporaries and total per device, whether it fits, and the micro-batch that would (linear estimate).
  """
  if plan["total_bytes"] <= HEADROOM * hbm_bytes:
    return []
  m = config.model
  dtypes = [m.dtype] + [d for d in ("bfloat16",) if d != m.dtype]
  remats = [m.remat] + [r for r in ("dots", "full") if r != m.remat]
  rows = []
  for dtype in dtypes:
    for remat in remats:
      if (dtype, remat) == (m.dtype, m.remat):
        continue
      variant = config.copy_and_resolve_references()
      variant.model.update(dtype=dtype, remat=remat)
      measured = analyze(variant, devices)
      rows.append(dict(dtype=dtype, remat=remat, temp_bytes=measured["temp_bytes"],
                       total_bytes=measured["total_bytes"], fits=measured["total_bytes"] <= HEADROOM * hbm_bytes,
                       max_micro_batch=_max_micro_batch(measured, hbm_bytes)))
  return rows


def _main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={f.devices}").strip()
  config = _CONFIG.value
  if f.mesh:
    config.mesh.update(dict(zip(config_lib.MESH_AXES, (int(d) for d in f.mesh.split(",")))))
  if config.train.micro_batch_size == -1:
    config.train.micro_batch_size = f.micro_batch
  config_lib.validate(config, f.devices)
  if f.platform:
    report = check_lowering(config, jax.devices()[:f.devices], f.platform)
    print(f"train step for {f.platform} on mesh {report['mesh']}, model.attention: {report['attention']}: " +
          (f"lowered; attention as lowered: {report['lowered']}" if report["ok"] else f"FAILED: {report['error']}"))
    if "note" in report:
      print(f"note: {report['note']}")
    print(json.dumps(report))
    raise SystemExit(0 if report["ok"] else 1)
  plan = analyze(config, jax.devices()[:f.devices])
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
  if plan["total_bytes"] > HEADROOM * hbm:
    print(f"WARNING: {gib(plan['total_bytes'])} per device exceeds {HEADROOM:.0%} of {gib(hbm)}: raise mesh.fsdp, "
          "lower train.micro_batch_size, set model.dtype='bfloat16' or model.remat (see the suggestions below).")
  print("suggestions (state as the rules place it; micro-batch a linear estimate from this compile):")
  for row in suggest(config, plan, f.devices, hbm):
    print(f"  fsdp={row['fsdp']:<4d} state {row['state_gib']:.2f} GiB/device, micro-batch up to "
          f"{row['max_micro_batch']}" + (" (a sharded dimension is not divisible by this degree: replicated)"
                                         if row["replicated"] else ""))
  if f.variants:
    plan["variants"] = variants(config, jax.devices()[:f.devices], plan, hbm)
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


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags
  from gptjax import cli
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt2_xl.py.")
  flags.DEFINE_integer("devices", 8, "Devices to plan for (fake CPU devices stand in for them).")
  flags.DEFINE_string("mesh", "", "data,fsdp,tensor degrees (default: the config's).")
  flags.DEFINE_integer("micro_batch", 1, "Micro-batch per data-parallel shard when the config says -1 (auto).")
  flags.DEFINE_float("hbm_gib", 16.0, "Memory of one device in GiB (TPU v5e: 16, v5p: 95, H100: 80).")
  flags.DEFINE_enum("platform", None, ["tpu", "cuda", "cpu"], "Instead of the memory plan: lower the train step "
                    "for this platform (jax.export, no device needed) and report the attention kernel as lowered.")
  flags.DEFINE_bool("variants", True, "When the plan exceeds hbm_gib, also compile it with bfloat16 activations "
                    "and remat (one compile each) and report their measured memory.")
  flags.mark_flag_as_required("config")
  cli.run(_main)
