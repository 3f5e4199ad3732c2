"""Every shipped config's train, fine-tune and decode steps lowered for TPU and CUDA on this CPU (`jax.export`).

For TPU, `model.attention='auto'` resolves as on a TPU, to Pallas splash, which must appear as its Mosaic custom
call (`tpu_custom_call`), not as interpret-mode HLO; for CUDA, 'xla' attention (cuDNN lowers only on a GPU: jax
reads its version while tracing). Models keep each config's width, heads, head size, context and vocabulary, in
bfloat16, with one layer: every layer lowers the same (stacked under scan or unrolled). Fine-tuning configs run
on the base their docstring names; a batch that a mesh's data-parallel degree does not divide is rounded up.
"""

import dataclasses
import pathlib
import runpy

import jax
import numpy as np
import pytest
from flax import nnx

from gptjax import config as config_lib, generate, plan, sharding, train
from gptjax.finetune import tasks
from gptjax.model import GPTConfig

CONFIG_DIR = pathlib.Path(__file__).parents[1] / "configs"
# gpt2.py (small by default) lowers under the names of its four sizes, configs/gpt2_SIZE.py.
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "gpt2")
# The base model a fine-tuning config's checkpoint.init_from (or its docstring: hf:gpt2) names.
FINETUNE_BASES = {"sst2": "task_pretrain", "conll2003_ner": "task_pretrain", "sft": "gpt2_small"}
PRETRAINING = [name for name in CONFIGS if name not in FINETUNE_BASES]
MESHES = [(1, 8, 1), (2, 2, 2)]
PLATFORMS = ["tpu", "cuda"]
LABELS = {"classify": 2, "ner": 9, "sft": 0}  # SST-2's labels, CoNLL-2003's BIO tags; SFT has no head
ROW_KEYS = {"lengths"}  # batch arrays with one value per row; the rest are [B, T] (classify's labels: per row)


def _config(name: str, mesh, platform: str):
  """The shipped config `name` with one layer in bfloat16, on `mesh`, with the attention each platform checks."""
  config = runpy.run_path(str(CONFIG_DIR / f"{name}.py"))["get_config"]()
  config.model.update(n_layer=1, dtype="bfloat16", attention="auto" if platform == "tpu" else "xla")
  config.mesh.update(dict(zip(config_lib.MESH_AXES, mesh)))
  if config.data.tokenizer == "char":
    config.data.vocab_size = 65  # tinyshakespeare's characters
  if config.train.micro_batch_size == -1:
    config.train.micro_batch_size = 1  # what `python -m gptjax.plan` assumes; fitted to memory on the device
  dp = mesh[0] * mesh[1] * max(config.train.micro_batch_size, 1)
  config.train.batch_size = -(-config.train.batch_size // dp) * dp
  return config


def _model(config, platform: str, **changes) -> GPTConfig:
  vocab = config_lib.check_vocab(config, config.data.vocab_size)
  return dataclasses.replace(GPTConfig.from_config(config.model, vocab), platform=platform, **changes)


def _placed(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _lower(name: str, what: str, platform: str, mesh, step, *args, **kwargs) -> str:
  """The attention kernel as lowered; a failure names the config."""
  try:
    exported = jax.export.export(step, platforms=[platform])(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # any failure: report which config it was
    pytest.fail(f"configs/{name}.py: the {what} does not lower for {platform} on mesh {mesh}: "
                f"{type(e).__name__}: {e}")
  return plan.attention_as_lowered(exported)


def _check_kernel(name: str, what: str, platform: str, lowered: str) -> None:
  if platform == "tpu":
    assert "tpu_custom_call" in lowered, f"configs/{name}.py: the {what} for tpu holds {lowered}, not splash"
  else:
    assert lowered.startswith("XLA ops"), f"configs/{name}.py: the {what} for {platform} holds {lowered}"


@pytest.mark.parametrize("mesh", MESHES, ids=str)
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", PRETRAINING)
def test_train_step_lowers(name, platform, mesh):
  config = _config(name, mesh, platform)
  report = plan.check_lowering(config, jax.devices()[:8], platform)
  assert report["ok"], f"configs/{name}.py: the train step does not lower for {platform} on mesh {mesh}: " \
                       f"{report['error']}"
  assert report["attention"] == ("auto -> pallas" if platform == "tpu" else "xla -> xla")
  _check_kernel(name, "train step", platform, report["lowered"])


@pytest.mark.parametrize("mesh", MESHES, ids=str)
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", sorted(FINETUNE_BASES))
def test_finetune_step_lowers(name, platform, mesh):
  config = _config(name, mesh, platform)
  base = _config(FINETUNE_BASES[name], mesh, platform)
  model_cfg = _model(base, platform)
  device_mesh = sharding.make_mesh(config, jax.devices()[:8])
  task = tasks.make_task(config.task)
  graphdef, abstract = train.abstract_model(model_cfg)
  head = jax.eval_shape(lambda: task.init_head(model_cfg.n_embd, LABELS[config.task.kind], jax.random.key(0), None))
  trainable = {"base": nnx.to_pure_dict(abstract), "head": head}
  trainable_shardings = {"base": sharding.state_shardings(abstract, base.mesh.rules, device_mesh),
                         "head": jax.tree.map(lambda _: sharding.replicated(device_mesh), head)}
  tx = train.make_optimizer(config)
  replicated = sharding.replicated(device_mesh)
  shardings = {"step": replicated, "skipped": replicated, "params": trainable_shardings,
               "opt_state": train.optimizer_shardings(tx, trainable, trainable_shardings, device_mesh)}
  state = _placed(jax.eval_shape(lambda t: train.new_state(t, tx), trainable), shardings)
  B, T = config.train.batch_size, config.task.max_len or model_cfg.block_size
  row_keys = ROW_KEYS | ({"labels"} if config.task.kind == "classify" else set())
  # The loop's batch: [accum, B, ...], rows split over the batch axes.
  placement = sharding.batch_sharding(device_mesh, config.mesh.rules, 2, 1)
  batch = {k: jax.ShapeDtypeStruct((1, B) if k in row_keys else (1, B, T), np.int32, sharding=placement)
           for k in task.batch_keys}
  objective = lambda p, frozen, b, key: task.loss(nnx.merge(graphdef, p["base"]), p["head"], b, key)[0]
  step = train.make_train_step(graphdef, tx, config, shardings, device_mesh, objective)
  lowered = _lower(name, "fine-tune step", platform, mesh, step, state, batch)
  _check_kernel(name, "fine-tune step", platform, lowered)


@pytest.mark.parametrize("mesh", MESHES, ids=str)
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", CONFIGS)
def test_decode_steps_lower(name, platform, mesh):
  """Prefill and the decode loop, with the unstacked layers `generate.stream` decodes with, as the loop samples."""
  config = _config(FINETUNE_BASES.get(name, name), mesh, platform)
  model_cfg = _model(config, platform, scan_layers=False)
  device_mesh = sharding.make_mesh(config, jax.devices()[:8])
  graphdef, abstract = train.abstract_model(model_cfg)
  params = _placed(nnx.to_pure_dict(abstract), sharding.state_shardings(abstract, config.mesh.rules, device_mesh))
  B = mesh[0] * mesh[1]
  prompt_len = generate.bucket(1, model_cfg.block_size)  # a short prompt, as the loop's samples
  cache_len = generate.bucket(prompt_len + config.log.sample_tokens, 2 * model_cfg.block_size)
  placement = generate.cache_sharding(device_mesh, config.mesh.rules, B, model_cfg.n_head, cache_len,
                                      model_cfg.head_dim)
  rows = lambda dtype: jax.ShapeDtypeStruct((B,), dtype)
  args = (params, jax.ShapeDtypeStruct((B, prompt_len), np.int32), rows(np.int32),
          jax.eval_shape(lambda: jax.random.split(jax.random.key(0), B)), rows(bool), 0)
  statics = dict(graphdef=graphdef, cache_len=cache_len, placement=placement)
  prefill, decode = generate._prefill, generate._decode  # pylint: disable=protected-access  # what stream runs
  _lower(name, "prefill", platform, mesh, prefill, *args, **statics)
  state = jax.eval_shape(lambda *a: prefill(*a, **statics), *args)
  _lower(name, "decode loop", platform, mesh, decode, params, state, np.int32(1), graphdef=graphdef,
         sampling=generate.Sampling(temperature=0.8, top_k=200, top_p=0.95))
