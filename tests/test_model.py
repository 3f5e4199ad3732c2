"""Model pieces against independent references: scan vs loop, remat, FLOPs (kernels: test_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import config as config_lib, sharding, train
from gptjax.model import GPT, GPTConfig, count_params, flops_per_token
from tests.helpers import build, random_tokens, tiny_config


@pytest.mark.devices(8)
def test_pallas_attention_on_a_mesh_equals_the_default():
  """Under a (data, fsdp, tensor) mesh the kernel runs per device in shard_map over batch rows and heads."""
  tokens = random_tokens((1, 8, 17))

  def one_step(attention_kind, mesh):
    config = tiny_config(mesh=mesh)
    config.model.attention = attention_kind
    graphdef, state, shardings, mesh, tx = build(config)
    step = train.make_train_step(graphdef, tx, config, shardings, mesh)
    state, metrics = step(state, sharding.global_batch(tokens, sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES, 3, 1), batch_dim=1))
    return float(metrics["train_loss"]), jax.device_get(state["params"])

  loss, params = one_step("causal_blocks", (1, 1, 1))
  pallas_loss, pallas_params = one_step("pallas", (2, 2, 2))
  np.testing.assert_allclose(pallas_loss, loss, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), pallas_params, params)


def _model(**overrides):
  cfg = GPTConfig(vocab_size=96, n_layer=3, n_head=4, n_embd=32, block_size=64, **overrides)
  return GPT(cfg, nnx.Rngs(0))


def _loss_and_grads(model, tokens):
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  return jax.value_and_grad(train.loss_fn)(params, graphdef, tokens, None)


def _unstack(params, n_layer):
  """Scanned (stacked) block parameters -> the per-layer layout of scan_layers=False."""
  blocks = params.pop("blocks")
  params["blocks"] = {i: jax.tree.map(lambda x: x[i], blocks) for i in range(n_layer)}
  return params


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat="full"), dict(remat="dots"),
                                     dict(remat="qkv_fc"), dict(attention="causal_blocks"), dict(attention="pallas"),
                                     dict(attention="causal_blocks", remat="qkv_fc"), dict(row_groups=2)])
def test_switches_give_the_same_loss_and_gradients(variant):
  tokens = jnp.asarray(random_tokens((2, 65), vocab=96))
  loss, grads = _loss_and_grads(_model(), tokens)
  other = _model(**variant)
  if not variant.get("scan_layers", True):
    graphdef, _ = nnx.split(other)
    other = nnx.merge(graphdef, _unstack(nnx.to_pure_dict(nnx.state(_model())), 3))
    grads = _unstack(grads, 3)
  other_loss, other_grads = _loss_and_grads(other, tokens)
  np.testing.assert_allclose(other_loss, loss, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), other_grads, grads)


def test_splash_projects_adapted_qkv_and_output_straight_into_and_out_of_its_layout():
  """With splash (heads-major projections) the LoRA adapters on qkv and out give the loss and gradients of 'xla'."""
  adapters = dict(adapter="lora", adapter_rank=2, adapter_targets=("qkv", "out"))
  tokens = jnp.asarray(random_tokens((2, 65), vocab=96))
  graphdef, state = nnx.split(_model(**adapters))
  params = jax.tree_util.tree_map_with_path(  # adapters that change the output: B not zero
      lambda path, x: x + 0.01 if "adapter" in jax.tree_util.keystr(path) else x, nnx.to_pure_dict(state))
  results = []
  for kernel in ("xla", "pallas"):
    graphdef, _ = nnx.split(_model(attention=kernel, **adapters))
    results.append(jax.value_and_grad(train.loss_fn)(params, graphdef, tokens, None))
  (loss, grads), (pallas_loss, pallas_grads) = results
  np.testing.assert_allclose(pallas_loss, loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), pallas_grads, grads)


def test_row_groups_run_the_blocks_once_per_group_from_the_config():
  """model.row_groups reaches the model through GPTConfig.from_config: each group has its own chain of block
  matmuls (4 per layer: qkv, out, fc, proj); a batch the setting does not divide uses their common divisor."""
  config = tiny_config(n_layer=2, batch_size=6)
  config.model.scan_layers = False

  def matmuls(jaxpr) -> int:
    """Unbatched dot_generals (the projections; the attention's have batch dimensions), nested calls included."""
    count = 0
    for eqn in jaxpr.eqns:
      count += eqn.primitive.name == "dot_general" and not eqn.params["dimension_numbers"][1][0]
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", param)
        count += matmuls(inner) if hasattr(inner, "eqns") else 0
    return count

  def block_matmuls(row_groups, batch):
    config.model.row_groups = row_groups
    model = GPT(GPTConfig.from_config(config.model, 128), nnx.Rngs(0))
    return matmuls(jax.make_jaxpr(lambda tokens: model(tokens))(jnp.zeros((batch, 16), jnp.int32)).jaxpr)
  assert [block_matmuls(1, 6), block_matmuls(3, 6), block_matmuls(3, 4)] == [2 * 4, 3 * 2 * 4, 2 * 4]


def test_logits_are_the_tied_head_and_initial_loss_is_uniform():
  model = _model()
  tokens = random_tokens((2, 33), vocab=96)
  h = model(tokens[:, :-1])
  logits = model.logits(h)
  np.testing.assert_allclose(logits, h @ model.wte.embedding[...].T, atol=1e-5)
  loss, _ = _loss_and_grads(model, tokens)
  assert abs(float(loss) - np.log(96)) < 0.1  # small init: nearly uniform predictions


def test_gpt2_init_statistics():
  cfg = GPTConfig(vocab_size=512, n_layer=4, n_head=4, n_embd=128, block_size=64)
  params = nnx.to_pure_dict(nnx.state(GPT(cfg, nnx.Rngs(0))))
  np.testing.assert_allclose(np.std(params["wte"]["embedding"]), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.std(params["blocks"]["mlp"]["fc"]["kernel"]), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.std(params["blocks"]["mlp"]["proj"]["kernel"]), 0.02 / np.sqrt(8), rtol=0.05)
  np.testing.assert_allclose(np.std(params["blocks"]["attn"]["out_kernel"]), 0.02 / np.sqrt(8), rtol=0.05)
  assert not np.any(params["blocks"]["mlp"]["fc"]["bias"]) and np.all(params["ln_f"]["scale"] == 1)


def test_parameter_count_and_flops_of_gpt2_small():
  cfg = GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024)
  _, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))))
  assert count_params(abstract) == 124_439_808  # GPT-2 small as HF counts it (tied head)
  n = count_params(abstract, exclude_position=True)
  assert n == 124_439_808 - 1024 * 768
  assert flops_per_token(cfg, n, 1024) == 6 * n + 12 * 12 * 1024 * 768


def test_sequence_longer_than_context_is_rejected():
  with pytest.raises(ValueError, match="exceeds the model's block_size 64"):
    _model()(jnp.zeros((1, 65), jnp.int32))
