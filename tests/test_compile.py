"""Every shipped config's train, fine-tune and decode steps built for the hardware we do not have.

TPU: compiled by the real TPU compiler (libtpu in compile-only mode, gptjax.tpu) for Colab's single v5e chip and for
a v5p-16 slice (8 chips) with FSDP over all of them, on meshes of the slices' own devices, the way a run builds them:
`model.attention='auto'` resolves (and probes splash) through `GPTConfig.for_device`, and splash must be in the
compiled program as Mosaic kernels (`tpu_custom_call`). Skipped, with the fix, when libtpu is not installed.
CUDA: lowered (`jax.export`) on 8 fake CPU devices with 'xla' attention (cuDNN lowers only on a GPU: jax reads its
version while tracing).

Models keep each config's width, heads, head size, context and vocabulary, in bfloat16, with one layer (the layers are
identical; a scanned stack stays a scan of one), and a batch of one row per data-parallel shard without accumulation
(neither changes the program's structure). The Colab notebook's TPU runs compile at full size (GPT-2 small with its
scan over 12 layers and 64 accumulation steps) and must fit a v5e chip. Fine-tuning configs run on the base their
docstring names.
"""

import dataclasses
import pathlib
import runpy

import jax
import numpy as np
import pytest
from flax import nnx

from gptjax import attention, config as config_lib, generate, plan, quantize, sharding, tpu, train
from gptjax.finetune import tasks
from gptjax.model import GPTConfig

CONFIG_DIR = pathlib.Path(__file__).parents[1] / "configs"
# gpt2.py (small by default) is built under the names of its four sizes, configs/gpt2_SIZE.py.
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("gpt2", "gpt2_small_fineweb"))
# The base model a fine-tuning config's checkpoint.init_from (or its docstring: hf:gpt2) names.
FINETUNE_BASES = {"sst2": "task_pretrain", "conll2003_ner": "task_pretrain", "sft": "gpt2_small"}
PRETRAINING = [name for name in CONFIGS if name not in FINETUNE_BASES]
BASES = sorted(set(PRETRAINING) | set(FINETUNE_BASES.values()))
# target -> (data, fsdp, tensor): TPU slices by accelerator type (v5p-16: FSDP over its 8 chips), CUDA on 8 fake CPU
# devices (data x fsdp x tensor).
TARGETS = {"v5e-1": (1, 1, 1), "v5p-16": (1, 8, 1), "cuda-3d": (2, 2, 2)}
# configs/gpt2_small_fineweb.py is GPT-2 small's model and step (another corpus, warm-up and evaluation): it compiles
# once, on the v5e-8 host it is planned for, instead of repeating gpt2_small's programs.
RECIPES = {"gpt2_small_fineweb": ("v5e-8", (1, 8, 1))}
LABELS = {"classify": 2, "ner": 9, "sft": 0}  # SST-2's labels, CoNLL-2003's BIO tags; SFT has no head
ROW_KEYS = {"lengths"}  # batch arrays with one value per row; the rest are [B, T] (classify's labels: per row)


def _is_tpu(target: str) -> bool:
  return not target.startswith("cuda")


def _devices(target: str):
  if not _is_tpu(target):
    return jax.devices()[:8]
  if not tpu.available():
    pytest.skip(f"libtpu is not installed: {tpu.EXTRA} brings the TPU compiler")
  return tpu.devices(target)


def _config(name: str, target: str):
  """The shipped config `name` with its depth reduced, in bfloat16, on the target's mesh."""
  config = runpy.run_path(str(CONFIG_DIR / f"{name}.py"))["get_config"]()
  config.model.update(n_layer=1, dtype="bfloat16",
                      attention="auto" if _is_tpu(target) else "xla")
  config.mesh.update(dict(zip(config_lib.MESH_AXES, _degrees(target))))
  if config.data.tokenizer == "char":
    config.data.vocab_size = 65  # tinyshakespeare's characters
  # One micro-batch of one row per data-parallel shard: the batch size does not change the program's structure, and
  # the accumulation loop is compiled at full size by the notebook test below.
  config.train.update(batch_size=_degrees(target)[0] * _degrees(target)[1], micro_batch_size=0)
  return config


def _degrees(target: str) -> tuple[int, int, int]:
  return dict([*TARGETS.items(), *RECIPES.values()])[target]


def _model(config, mesh, target: str) -> GPTConfig:
  """The model as a run on `mesh` builds it; for CUDA, the platform set by hand (the mesh is of CPU devices)."""
  model_cfg = GPTConfig.from_config(config.model, config_lib.check_vocab(config, config.data.vocab_size))
  if _is_tpu(target):
    return model_cfg.for_device(mesh, rules=config.mesh.rules)
  return dataclasses.replace(model_cfg, platform="cuda")


def _placed(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _build(name: str, what: str, target: str, step, *args, **kwargs) -> str:
  """The program's text, compiled for a TPU target or lowered for CUDA; a failure names the config."""
  try:
    if _is_tpu(target):
      return step.lower(*args, **kwargs).compile().as_text()
    return jax.export.export(step, platforms=["cuda"])(*args, **kwargs).mlir_module()
  except Exception as e:  # pylint: disable=broad-except  # any failure: report which config it was
    pytest.fail(f"configs/{name}.py: the {what} does not {'compile' if _is_tpu(target) else 'lower'} for "
                f"{target} (mesh {_degrees(target)}): {type(e).__name__}: {str(e)[:2000]}")


def _check_attention(name: str, what: str, target: str, model_cfg: GPTConfig, program: str) -> None:
  """Splash as Mosaic kernels on TPU ('auto' picks it and it compiles for every shipped shape); XLA ops on CUDA."""
  if _is_tpu(target):
    assert model_cfg.attention == "pallas", f"configs/{name}.py: 'auto' fell back to {model_cfg.attention} on {target}"
    assert "tpu_custom_call" in program, f"configs/{name}.py: the {what} for {target} holds no splash kernel"
  else:
    assert "__cudnn$fmha" not in program and "tpu_custom_call" not in program


# On the v5p-16 FSDP slice GPT-2 small and XL bracket medium and large: the same program (head size 64 in all four)
# at widths between theirs, each a 45-60 s compile in CI; on v5e-1 medium and XL bracket large, and GPT-2 small
# compiles at its real micro-batch (below: the bytes it moves are held). Every size lowers for CUDA.
TRAIN = [(name, target) for name in PRETRAINING for target in TARGETS
         if not (target == "v5p-16" and name in ("gpt2_medium", "gpt2_large"))
         and (name, target) not in (("gpt2_small", "v5e-1"), ("gpt2_large", "v5e-1"))]
# The bytes GPT-2 small's train step moves per token on Colab's v5e chip (bfloat16, micro-batch 8 x 1024, 64 of them
# per 0.5M-token step), as `python -m gptjax.plan --tpu=v5e-1` measures it (plan.step_bytes_accessed, libtpu
# 0.0.42.1): 7.77 MB before the loss and splash's projections were rewritten for bytes, 6.70 MB after
# (benchmarks/RESULTS.md, "The TPU step's bytes per token").
SMALL_V5E_BYTES_PER_TOKEN = 6.70e6


TRAIN += [(name, target) for name, (target, _) in RECIPES.items()]


@pytest.mark.parametrize("name, target", TRAIN, ids=[f"{n}-{t}" for n, t in TRAIN])
def test_train_step_builds(name, target):
  config = _config(name, target)
  mesh = sharding.make_mesh(config, _devices(target))
  model_cfg = _model(config, mesh, target)
  tx = train.make_optimizer(config)
  graphdef, abstract, shardings = train.abstract_state(config, model_cfg, mesh, tx)
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  program = _build(name, "train step", target, step, _placed(abstract, shardings), plan.abstract_batch(config, mesh))
  _check_attention(name, "train step", target, model_cfg, program)


def test_gpt2_small_on_v5e_moves_no_more_bytes_per_token_than_measured():
  """The TPU step's cost as the TPU compiler states it, held: a change that makes the step move more bytes fails."""
  devices = _devices("v5e-1")
  config = config_lib.gpt2_config("small")
  config.model.dtype = "bfloat16"
  config.train.micro_batch_size = 8
  programs = {}
  moved = plan.step_bytes_accessed(config, devices, {"micro_batch": 8, "accumulation": 64}, programs)
  per_token = moved / (config.train.batch_size * config.model.block_size)
  assert per_token <= 1.01 * SMALL_V5E_BYTES_PER_TOKEN, (
      f"GPT-2 small's step on v5e-1 now moves {per_token / 1e6:.3f} MB per token, more than the "
      f"{SMALL_V5E_BYTES_PER_TOKEN / 1e6:.3f} MB measured: see `python -m gptjax.plan --config=configs/gpt2_small.py "
      "--tpu=v5e-1 --config.model.dtype=bfloat16 --anatomy` for where the bytes go")
  assert "tpu_custom_call" in programs["one"].as_text()  # splash, as a run on the chip uses it


def _finetune_step(config, model_cfg: GPTConfig, mesh):
  """The fine-tuning job's train step for a task config on `model_cfg`'s base, with abstract state and batch."""
  task = tasks.make_task(config.task)
  graphdef, abstract = train.abstract_model(model_cfg)
  head = jax.eval_shape(lambda: task.init_head(model_cfg.n_embd, LABELS[config.task.kind], jax.random.key(0), None))
  trainable = {"base": nnx.to_pure_dict(abstract), "head": head}
  trainable_shardings = {"base": sharding.state_shardings(abstract, config.mesh.rules, mesh),
                         "head": jax.tree.map(lambda _: sharding.replicated(mesh), head)}
  tx = train.make_optimizer(config)
  replicated = sharding.replicated(mesh)
  shardings = {"step": replicated, "skipped": replicated, "params": trainable_shardings,
               "opt_state": train.optimizer_shardings(tx, trainable, trainable_shardings, mesh)}
  state = _placed(jax.eval_shape(lambda t: train.new_state(t, tx), trainable), shardings)
  B, T = config.train.batch_size, config.task.max_len or model_cfg.block_size
  row_keys = ROW_KEYS | ({"labels"} if config.task.kind == "classify" else set())
  # The loop's batch: [accum, B, ...], rows split over the batch axes.
  placement = sharding.batch_sharding(mesh, config.mesh.rules, 2, 1)
  batch = {k: jax.ShapeDtypeStruct((1, B) if k in row_keys else (1, B, T), np.int32, sharding=placement)
           for k in task.batch_keys}
  objective = lambda p, frozen, b, key: task.loss(nnx.merge(graphdef, p["base"]), p["head"], b, key)[0]
  return train.make_train_step(graphdef, tx, config, shardings, mesh, objective), state, batch


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(FINETUNE_BASES))
def test_finetune_step_builds(name, target):
  config = _config(name, target)
  mesh = sharding.make_mesh(config, _devices(target))
  model_cfg = _model(_config(FINETUNE_BASES[name], target), mesh, target)
  step, state, batch = _finetune_step(config, model_cfg, mesh)
  program = _build(name, "fine-tune step", target, step, state, batch)
  _check_attention(name, "fine-tune step", target, model_cfg, program)


def _notebook_configs():
  from tests.test_notebook import notebook_tpu_configs  # pylint: disable=import-outside-toplevel
  return {name: config.copy_and_resolve_references() for name, config in notebook_tpu_configs().items()}


# SST-2's run is left out: the same model and settings as CoNLL-2003's at rows of 64 tokens instead of 256, it needs
# less of everything (its fine-tune step compiles for v5e-1 in test_finetune_step_builds).
@pytest.mark.parametrize("name", ["gpt2_small_web", "conll2003_gpt2"])
def test_notebook_tpu_runs_compile_and_fit_a_v5e_chip(name):
  """The Colab notebook's TPU runs, at full size, as their cells launch them (their Hub data cannot be reached here):
  pretraining GPT-2 small, and fine-tuning hf:gpt2 (GPT-2 small's shape; the run's dtype and remat) on CoNLL-2003 at
  the task's longest rows. Each must compile for Colab's v5e-1 and fit its HBM."""
  config = _notebook_configs()[name]
  devices = _devices("v5e-1")
  hbm = tpu.CHIPS["v5e"].hbm_bytes
  if "task" not in config:
    result = plan.analyze(config, devices)
    assert result["attention"] == "auto -> pallas" and result["mosaic_kernels"] > 0, result
    assert result["compiled"] and result["total_bytes"] <= hbm, result
    return
  base = config_lib.gpt2_config("small")
  base.model.update(dtype=config.model.dtype, remat=config.model.remat)
  mesh = sharding.make_mesh(config, devices)
  model_cfg = GPTConfig.from_config(base.model, 50304).for_device(mesh, rules=config.mesh.rules)  # hf:gpt2's vocab
  step, state, batch = _finetune_step(config, model_cfg, mesh)
  try:
    memory = step.lower(state, batch).compile().memory_analysis()
  except Exception as e:  # pylint: disable=broad-except  # any failure: report which run it was
    pytest.fail(f"the notebook's {name} run does not compile for v5e-1: {str(e)[:2000]}")
  total = memory.argument_size_in_bytes + memory.temp_size_in_bytes
  assert total <= hbm, f"the notebook's {name} run needs {total / 2**30:.2f} GiB of v5e-1's {hbm / 2**30:.2f}"


# GPT-2 small, medium and large decode on the FSDP slice as GPT-2 XL does, at smaller widths (the same program, one
# layer): XL stands for them there; on v5e-1 every base decodes.
DECODE = [(name, target) for name in BASES for target in TARGETS
          if not (target == "v5p-16" and name in ("gpt2_small", "gpt2_medium", "gpt2_large"))]


def _decode_programs(name: str, target: str, weights: str | None = None) -> tuple[str, str]:
  """Prefill and the decode loop as `generate.stream` runs them (unstacked layers, matrices stored as `weights`),
  for the loop's samples; their programs' text."""
  config = _config(name, target)
  mesh = sharding.make_mesh(config, _devices(target))
  model_cfg = dataclasses.replace(_model(config, mesh, target), scan_layers=False)
  graphdef, abstract = train.abstract_model(model_cfg)
  narrow = jax.eval_shape(lambda p: quantize.quantize(p, weights), nnx.to_pure_dict(abstract))

  def place(a, s):  # a narrow matrix keeps its float placement; an int8 scale is small and replicated
    if isinstance(a, quantize.Int8):
      return quantize.Int8(*_placed((a.q, a.scale), (s, sharding.replicated(mesh))))
    return _placed(a, s)
  params = jax.tree.map(place, narrow, sharding.state_shardings(abstract, config.mesh.rules, mesh),
                        is_leaf=lambda a: isinstance(a, quantize.Int8))
  B = TARGETS[target][0] * TARGETS[target][1]
  prompt_len = generate.bucket(1, model_cfg.block_size)  # a short prompt, as the loop's samples
  cache_len = generate.bucket(prompt_len + config.log.sample_tokens, 2 * model_cfg.block_size)
  placement = generate.cache_sharding(mesh, config.mesh.rules, B, model_cfg.n_head, cache_len, model_cfg.head_dim)
  rows = sharding.batch_sharding(mesh, config.mesh.rules, 1)
  row = lambda dtype: jax.ShapeDtypeStruct((B,), dtype, sharding=rows)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), B))
  prompt = jax.ShapeDtypeStruct((B, prompt_len), np.int32, sharding=sharding.batch_sharding(mesh, config.mesh.rules))
  args = (params, prompt, row(np.int32), jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=rows), row(bool), 0)
  statics = dict(graphdef=graphdef, cache_len=cache_len, placement=placement)
  prefill, decode = generate._prefill, generate._decode  # pylint: disable=protected-access  # what stream runs
  state = jax.eval_shape(lambda *a: prefill(*a, **statics), *args)
  return (_build(name, "prefill", target, prefill, *args, **statics),
          _build(name, "decode loop", target, decode, params, state, np.int32(1), graphdef=graphdef,
                 sampling=generate.Sampling(temperature=0.8, top_k=200, top_p=0.95),
                 widen_each_step=quantize.is_narrow(params)))


@pytest.mark.parametrize("name, target", DECODE, ids=[f"{n}-{t}" for n, t in DECODE])
def test_decode_steps_build(name, target):
  _decode_programs(name, target)


# One chip and the sharded CUDA mesh (int8 on the v5p-16 FSDP slice compiled too, 8 s, when this was written).
@pytest.mark.parametrize("target", ["v5e-1", "cuda-3d"])
@pytest.mark.parametrize("weights", quantize.WEIGHTS)
def test_narrow_weight_decoding_builds(weights, target):
  """bfloat16 and int8 weights (`sample --weights`), widened inside each decode step as TPU and GPU run them."""
  program = _decode_programs("quickstart", target, weights)[1]
  if not _is_tpu(target):
    assert ("i8" if weights == "int8" else "bf16") in program


@pytest.mark.parametrize("head_dim", [32, 48, 64, 80])
def test_splash_compiles_for_lengths_its_blocks_do_not_divide(head_dim):
  """Splash's blocks must divide the sequence (raw splash at 200: 'q_block_size=128 should divide q_seq_len=200'):
  the kernel pads to a multiple of 128 and picks the largest block that divides, decided before any compile, so
  every length compiles, forward and backward, on a v5e chip."""
  mesh = sharding.make_mesh(_config("quickstart", "v5e-1"), _devices("v5e-1"))
  probe = attention._compile_probe  # pylint: disable=protected-access  # what attention.choose compiles
  for T in (64, 200, 1000):
    probe("pallas", jax.ShapeDtypeStruct((1, T, 4, head_dim), jax.numpy.bfloat16), mesh, config_lib.DEFAULT_RULES,
          "tpu")


@pytest.mark.parametrize("target", ["v5e-1", "v5p-16"])
def test_harness_scoring_builds(target):
  """lm-evaluation-harness scoring of GPT-2 small (one layer): whole rows, and K endings after a shared context
  from a KV cache, sharded as `gptjax.harness.GptjaxLM` runs them (its generation is the decode loop above)."""
  harness = pytest.importorskip("gptjax.harness")
  config = _config("gpt2_small", target)
  mesh = sharding.make_mesh(config, _devices(target))
  model_cfg = _model(config, mesh, target)
  graphdef, abstract = train.abstract_model(model_cfg)
  params = _placed(nnx.to_pure_dict(abstract), sharding.state_shardings(abstract, config.mesh.rules, mesh))
  rows = 2 * _degrees(target)[1]
  array = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(
      mesh, config.mesh.rules, len(shape)))
  statics = dict(graphdef=graphdef, vocab=50257, mesh=mesh, rules=config.mesh.rules)
  _build("gpt2_small", "harness scoring", target, harness._score, params, array((rows, 1024), np.int32),
         *(array((rows, 64), dtype) for dtype in (np.int32, np.int32, bool)), **statics)
  _build("gpt2_small", "harness shared-context scoring", target, harness._score_shared, params,
         array((rows, 96), np.int32), array((rows,), np.int32), *(array((rows, 4, 32), d) for d in (np.int32, bool)),
         **statics)
