"""Memory planning from the compiler's own numbers: compile the train step ahead of time and read its memory use.

`fit_micro_batch` picks the largest micro-batch whose compiled step fits the device, for
`train.micro_batch_size = -1` (the GPT-2 configs' default): the same config then runs on a 24 GB CPU and an
80 GB GPU without editing. As a command, it plans a launch before any accelerator is paid for. For a Cloud TPU
slice, with the real TPU compiler (libtpu compile-only, on any machine; `plan_tpu`):

  python -m gptjax.plan --config=configs/gpt2_small.py --tpu=v5e-1 --config.model.dtype=bfloat16

per-chip memory against the chip's HBM, the micro-batch a run would search, collectives, a roofline bound on the
step time, and, when it does not fit, the FSDP degree that holds the state or the remat that fits. With --anatomy,
where the step's bytes go: per part of the model against its floor, and the costliest instructions (gptjax.anatomy). On fake CPU
devices with XLA:CPU (any device count, e.g. for GPUs):

  python -m gptjax.plan --config=configs/gpt2_xl.py --devices=64 --mesh=1,64,1 --hbm_gib=16

When the step exceeds --hbm_gib it is compiled again with remat and bfloat16 activations (`variants`), and the
state per device is worked out for every FSDP degree (`suggest`).

With --platform it checks instead that the train step lowers for a TPU or an NVIDIA GPU (`check_lowering`, via
`jax.export`), with the attention kernel `model.attention` picks there, and reports the kernel as lowered:

  python -m gptjax.plan --config=configs/gpt2_xl.py --devices=8 --mesh=1,8,1 --platform=cuda
"""

import dataclasses
import os
import re

import jax
import numpy as np
import optax
from absl import logging

from gptjax import anatomy as anatomy_lib, attention, config as config_lib, sharding, train

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


def out_of_memory(error: Exception) -> bool:
  """Whether a compile failed because the program does not fit in device memory (the TPU compiler's verdict)."""
  return "RESOURCE_EXHAUSTED" in str(error)


def step_memory_bytes(config, graphdef, abstract_state, shardings, mesh, tx, micro: int) -> float:
  """Per-device bytes of one compiled train step with this micro-batch (temporaries + arguments); infinite when
  the compiler (TPU) refuses it as larger than the device's memory."""
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  try:
    analysis = step.lower(abstract_state, abstract_batch(config, mesh, micro)).compile().memory_analysis()
  except Exception as e:  # pylint: disable=broad-except  # only an out-of-memory verdict is an answer here
    if out_of_memory(e):
      return float("inf")
    raise
  return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes)


def fit_micro_batch(config, graphdef, abstract_state, shardings, mesh, tx, memory_bytes: int = 0) -> int:
  """The largest micro-batch (per data-parallel shard, dividing the batch) whose step fits in device memory
  (`memory_bytes` per device; default: this process's device).

  Memory grows ~linearly with the micro-batch: each compile's bytes predict the largest candidate that fits, which
  is compiled next (bisecting when the compiler only says "out of memory"), until neighbours fit and do not.
  """
  dp = config_lib.data_parallel_degree(config, mesh.size)
  per_shard = config.train.batch_size // dp
  candidates = [m for m in range(1, per_shard + 1) if per_shard % m == 0]
  budget = HEADROOM * (memory_bytes or device_memory_bytes())
  fixed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)) // max(1, mesh.size)
  lo, hi, best, guess = 0, len(candidates) - 1, None, (len(candidates) - 1) // 2
  while lo <= hi:
    used = step_memory_bytes(config, graphdef, abstract_state, shardings, mesh, tx, candidates[guess])
    if used <= budget:
      best, lo = guess, guess + 1
    else:
      hi = guess - 1
    if used == float("inf"):
      guess = (lo + hi) // 2
    else:
      per_sequence = max(1.0, (used - fixed) / candidates[guess])
      predicted = max([i for i, m in enumerate(candidates) if fixed + per_sequence * m <= budget], default=0)
      guess = min(max(predicted, lo), hi)
  if best is None:
    raise config_lib.ConfigError(
        f"even a micro-batch of 1 sequence does not fit in the {budget / 2**30:.1f} GiB per device that are usable "
        f"({HEADROOM:.0%} of the device's memory); set model.remat='full', raise mesh.fsdp, or use bigger devices.")
  micro = candidates[best]
  logging.info("micro-batch %d: fits in %.1f GiB", micro, budget / 2**30)
  return micro


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a sharded tree (the shard of every leaf)."""
  return sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
             for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)))


def _model_config(config, mesh):
  """The model as a run on `mesh` builds it: 'auto' attention resolved (and probed) for the mesh's devices."""
  from gptjax.model import GPTConfig
  vocab = config_lib.check_vocab(config, config.data.vocab_size)
  return GPTConfig.from_config(config.model, vocab).for_device(mesh, rules=config.mesh.rules)


def analyze(config, devices) -> dict:
  """Per-device memory (parameters, optimizer, step temporaries), FLOPs and collectives of the compiled step.

  On a TPU slice's compile-only devices (gptjax.tpu) these are the TPU compiler's numbers; a step it refuses as
  larger than the chip's memory comes back with compiled=False and the compiler's message.
  """
  from gptjax.model import count_params, flops_per_token
  mesh = sharding.make_mesh(config, devices)
  model_cfg = _model_config(config, mesh)
  built = train.build_step(config, model_cfg, mesh)
  abstract, shardings = built.abstract, built.shardings
  batch = abstract_batch(config, mesh)
  accum, micro = batch.shape[0], batch.shape[1] // (config_lib.data_parallel_degree(config, mesh.size))
  n_params = count_params(abstract["params"], exclude_position=True)
  report = dict(
      mesh=dict(mesh.shape), micro_batch=micro, accumulation=accum, dtype=config.model.dtype,
      remat=config.model.remat, attention=f"{config.model.attention} -> {model_cfg.attention}",
      params_bytes=_per_device_bytes(abstract["params"], shardings["params"]),
      optimizer_bytes=_per_device_bytes(abstract["opt_state"], shardings["opt_state"]),
      model_flops_per_step=flops_per_token(model_cfg, n_params, model_cfg.block_size) * config.train.batch_size *
      model_cfg.block_size)
  try:
    compiled = built.step.lower(abstract, batch).compile()
  except Exception as e:  # pylint: disable=broad-except  # only an out-of-memory verdict is an answer here
    if not out_of_memory(e):
      raise
    return dict(report, compiled=False, compiler_error=str(e).strip().splitlines()[0])
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  cost = compiled.cost_analysis() or {}
  outputs = int(memory.output_size_in_bytes - memory.alias_size_in_bytes)  # donated state is written in place
  return dict(
      report, compiled=True, temp_bytes=int(memory.temp_size_in_bytes),
      argument_bytes=int(memory.argument_size_in_bytes), output_bytes=outputs,
      code_bytes=int(memory.generated_code_size_in_bytes),
      total_bytes=int(memory.temp_size_in_bytes + memory.argument_size_in_bytes + outputs),
      collectives={op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in COLLECTIVES},
      mosaic_kernels=hlo.count('custom_call_target="tpu_custom_call"'),
      compiler_flops=float(cost.get("flops", 0.0)), compiler_optimal_seconds=float(cost.get("optimal_seconds", 0.0)))


def lower(step, platform: str, *args) -> jax.export.Exported:
  """A jitted `step` lowered for `platform` ('tpu', 'cuda', 'cpu') on this machine, for abstract `args`."""
  return jax.export.export(step, platforms=[platform])(*args)


def attention_as_lowered(exported: jax.export.Exported) -> str:
  """Which attention kernel a lowered program holds, read from its custom calls."""
  text = exported.mlir_module()
  return next((k.lowered_as for k in config_lib.ATTENTION_KERNELS.values() if k.custom_call and k.custom_call in text),
              "XLA ops (no fused-attention custom call)")


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
    built = train.build_step(config, model_cfg, mesh)
    placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), built.abstract,
                          built.shardings)
    exported = lower(built.step, platform, placed, abstract_batch(config, mesh))
  except Exception as e:  # the point is to report whatever the lowering raises
    return dict(report, ok=False, error=f"{type(e).__name__}: {e}")
  return dict(report, ok=True, lowered=attention_as_lowered(exported))


def _max_micro_batch(plan: dict, hbm_bytes: int, state: float | None = None) -> int:
  """The largest micro-batch that fits beside `state` bytes (default: the plan's state), linear in sequences."""
  plan_state = plan["params_bytes"] + plan["optimizer_bytes"]
  per_sequence = max(1, (plan["total_bytes"] - plan_state) / plan["micro_batch"])
  state = plan_state if state is None else state
  return max(int((HEADROOM * hbm_bytes - state) // per_sequence), 0)


def suggest(config, plan: dict, n_devices: int, hbm_bytes: int) -> list[dict]:
  """For each FSDP degree: the state per device as the rules place it, and the largest micro-batch that fits.

  The state is exact (shardings on a mesh of that shape); the micro-batch is a linear estimate from the plan's
  bytes per sequence. `replicated` marks degrees that some sharded dimension is not divisible by (e.g. GPT-2 XL's
  embed=1600 by 256): those dimensions stay whole on every device.
  """
  return [dict(fsdp=row["fsdp"], state_gib=row["state_bytes"] / 2**30, replicated=row["replicated"],
               max_micro_batch=_max_micro_batch(plan, hbm_bytes, row["state_bytes"]))
          for row in state_rows(config, n_devices, plan["mesh"]["tensor"])]


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
      if not measured["compiled"]:  # the TPU compiler refused it: larger than the chip
        rows.append(dict(dtype=dtype, remat=remat, fits=False, max_micro_batch=0,
                         compiler_error=measured["compiler_error"]))
        continue
      rows.append(dict(dtype=dtype, remat=remat, temp_bytes=measured["temp_bytes"],
                       total_bytes=measured["total_bytes"], fits=measured["total_bytes"] <= HEADROOM * hbm_bytes,
                       max_micro_batch=_max_micro_batch(measured, hbm_bytes)))
  return rows


def micro_step_program(config, mesh, micro: int, n_layer: int):
  """The train step compiled without loops (one micro-batch of `micro` sequences per data-parallel shard, layers
  unrolled, `n_layer` of them): XLA's cost analysis counts a loop body once, so only such a program's `bytes
  accessed` is every byte it moves."""
  small = config.copy_and_resolve_references()
  small.model.update(n_layer=n_layer, scan_layers=False)
  small.train.update(batch_size=micro * config_lib.data_parallel_degree(config, mesh.size), micro_batch_size=0)
  built = train.build_step(small, _model_config(small, mesh), mesh)
  return built.step.lower(built.abstract, abstract_batch(small, mesh)).compile()


def update_program(config, mesh):
  """The optimizer update alone at full depth (parameters, moments and gradients in, updated state out)."""
  built = train.build_step(config, _model_config(config, mesh), mesh)
  tx, abstract, shardings = built.tx, built.abstract, built.shardings

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  params, opt_state = abstract["params"], abstract["opt_state"]
  return jax.jit(update, in_shardings=(shardings["params"], shardings["opt_state"], shardings["params"]),
                 out_shardings=(shardings["params"], shardings["opt_state"]), donate_argnums=(0, 1)).lower(
                     params, opt_state, params).compile()


def step_bytes_accessed(config, devices, plan: dict, programs: dict | None = None) -> float:
  """HBM bytes one device moves in a train step, from the compiler's cost analysis.

  The analysis counts a loop body once (the scan over layers, the accumulation loop), so it is read off loop-free
  programs: the step without accumulation at the plan's micro-batch with its layers unrolled, compiled at 1 and 2
  layers and extrapolated to n_layer (the layers are identical), times the micro-batches, with the optimizer
  update (compiled on its own at full depth) counted once. `programs` ({'one', 'two', 'update'}), if given,
  receives the compiled programs.
  """
  mesh = sharding.make_mesh(config, devices)
  programs = {} if programs is None else programs
  programs.update(one=micro_step_program(config, mesh, plan["micro_batch"], 1),
                  two=micro_step_program(config, mesh, plan["micro_batch"], 2), update=update_program(config, mesh))
  one, two, update_bytes = (anatomy_lib.bytes_accessed(programs[k]) for k in ("one", "two", "update"))
  micro_step = one + (config.model.n_layer - 1) * (two - one) - update_bytes
  return plan["accumulation"] * micro_step + update_bytes


def state_bytes(config, mesh_shape) -> tuple[int, bool]:
  """Parameters + optimizer state one device holds on a (data, fsdp, tensor) mesh as the rules place them, and
  whether some sharded dimension is not divisible by its degree (it then stays whole on every device)."""
  from gptjax.model import GPTConfig
  model_cfg = GPTConfig.from_config(config.model, config_lib.check_vocab(config, config.data.vocab_size))
  tx = train.make_optimizer(config)
  mesh = jax.sharding.AbstractMesh(tuple(mesh_shape), config_lib.MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * 3)
  _, abstract, shardings = train.abstract_state(config, model_cfg, mesh, tx)
  state = {k: abstract[k] for k in ("params", "opt_state")}
  per_device = _per_device_bytes(state, {k: shardings[k] for k in state})
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  return per_device, per_device > 1.25 * whole / (mesh_shape[1] * mesh_shape[2])


def state_rows(config, n_devices: int, tensor: int = 1) -> list[dict]:
  """`state_bytes` for each FSDP degree (powers of two, times `tensor`, dividing `n_devices`)."""
  rows = []
  for fsdp in (2**k for k in range(int(np.log2(n_devices // tensor)) + 1)):
    if n_devices % (fsdp * tensor) == 0:
      per_device, replicated = state_bytes(config, (n_devices // (fsdp * tensor), fsdp, tensor))
      rows.append(dict(fsdp=fsdp, state_bytes=per_device, replicated=replicated))
  return rows


def plan_tpu(config, slice_, anatomy: bool = False) -> dict:
  """The run's train step compiled by the TPU compiler for the slice `slice_` (gptjax.tpu.Slice): per-chip memory,
  the micro-batch (train.micro_batch_size=-1 searched as the run searches it), collectives, a roofline estimate of
  the step time; when it does not fit, the state per chip, the FSDP degree that holds it, and remat variants.
  With `anatomy`, a step that fits also gets its bytes and FLOPs per token by part (gptjax.anatomy)."""
  from gptjax import tpu
  chip, hbm = slice_.chip, slice_.chip.hbm_bytes
  devices = tpu.devices(slice_)
  config = config.copy_and_resolve_references()
  report = dict(tpu=slice_.accelerator, topology=slice_.topology, chips=slice_.chips,
                chip=dataclasses.asdict(chip), searched_micro_batch=config.train.micro_batch_size == -1)
  mesh = sharding.make_mesh(config, devices)
  if state_bytes(config, mesh.devices.shape)[0] > HEADROOM * hbm:  # no micro-batch or remat helps: split the state
    # Half the chip for the state leaves the other half for a micro-batch's activations.
    rows = ((2**k, *state_bytes(config, (1, 2**k, 1))) for k in range(13))
    needed = next((dict(fsdp=fsdp, state_bytes=per_chip) for fsdp, per_chip, replicated in rows
                   if not replicated and per_chip <= HEADROOM * hbm / 2), None)
    config.train.micro_batch_size = max(config.train.micro_batch_size, 1)
    return dict(report, **analyze(config, devices), searched_micro_batch=False, fits=False, state_exceeds_chip=True,
                fsdp_needed=needed)
  if config.train.micro_batch_size == -1:
    built = train.build_step(config, _model_config(config, mesh), mesh)
    try:
      config.train.micro_batch_size = fit_micro_batch(config, built.graphdef, built.abstract, built.shardings, mesh,
                                                      built.tx, hbm)
    except config_lib.ConfigError:
      config.train.micro_batch_size = 1  # reported below as not fitting, with the remat variants that would
  plan = dict(report, **analyze(config, devices))
  plan["fits"] = plan["compiled"] and plan["total_bytes"] <= hbm
  if plan["fits"]:
    compute = plan["model_flops_per_step"] / (slice_.chips * chip.bf16_flops)
    programs = {}
    moved = step_bytes_accessed(config, devices, plan, programs)
    memory = moved / chip.hbm_bytes_per_s
    # Per token of a data-parallel shard (the tokens one chip's step processes, shared by its tensor-parallel peers).
    plan["bytes_per_token"] = moved / (config.train.batch_size * config.model.block_size /
                                       (plan["mesh"]["data"] * plan["mesh"]["fsdp"]))
    if anatomy:
      plan["anatomy"] = anatomy_lib.step_anatomy(_model_config(config, mesh), plan, programs)
    plan.update(roofline_compute_s=compute, roofline_memory_s=memory, step_time_bound_s=max(compute, memory),
                mfu_ceiling=compute / max(compute, memory))
  else:
    plan["variants"] = variants(config, devices, dict(plan, total_bytes=float("inf")), hbm)
  return plan


if __name__ == "__main__":
  from gptjax import plan_command  # pylint: disable=import-outside-toplevel  # the command line and its report
  plan_command.main()
