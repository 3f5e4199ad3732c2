"""Model pieces against independent references: attention kernels, scan vs loop, remat, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import attention, config as config_lib, sharding, train
from gptjax.model import GPT, GPTConfig, count_params, flops_per_token
from tests.helpers import build, random_tokens, tiny_config


def _reference_attention(q, k, v):
  T, H = q.shape[1], q.shape[-1]
  scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)


# 'pallas' is the TPU splash kernel, here in Pallas interpret mode (CPU).
@pytest.mark.parametrize("implementation", ["xla", "causal_blocks", "pallas", "auto"])
@pytest.mark.parametrize("T", [7, 128, 300])
def test_attention_kernels_equal_the_reference(implementation, T):
  q, k, v = jax.random.normal(jax.random.key(T), (3, 2, T, 3, 16))
  np.testing.assert_allclose(attention.causal_attention(q, k, v, implementation), _reference_attention(q, k, v),
                             atol=2e-5)


def test_auto_attention_per_platform_and_pallas_off_tpu_fails_clearly(monkeypatch):
  for platform, dtype, expected in [("tpu", jnp.float32, "pallas"), ("gpu", jnp.bfloat16, "cudnn"),
                                    ("cuda", jnp.float16, "cudnn"), ("gpu", jnp.float32, "causal_blocks"),
                                    ("cpu", jnp.bfloat16, "causal_blocks")]:
    assert attention.resolve("auto", dtype, platform) == expected
    # Without a platform: the one this process computes on.
    monkeypatch.setattr(attention, "device_platform", lambda: platform)
    assert attention.resolve("auto", dtype) == expected
  with pytest.raises(config_lib.ConfigError, match="model.attention='pallas' is a TPU kernel and the platform is "
                     "'cuda': set model.attention"):
    attention.resolve("pallas", jnp.bfloat16, "cuda")


@pytest.mark.devices(8)
def test_pallas_attention_on_a_mesh_equals_the_default():
  """Under a (data, fsdp, tensor) mesh the kernel runs per device in shard_map over batch rows and heads."""
  tokens = random_tokens((1, 8, 17))

  def one_step(attention_kind, mesh):
    config = tiny_config(mesh=mesh)
    config.model.attention = attention_kind
    graphdef, state, shardings, mesh, tx = build(config)
    step = train.make_train_step(graphdef, tx, config, shardings, mesh)
    state, metrics = step(state, sharding.global_batch(tokens, sharding.batch_sharding(mesh, 3, 1), batch_dim=1))
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
                                     dict(attention="causal_blocks"), dict(attention="pallas")])
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


def _reference_cross_entropy(h, wte, targets):
  import optax
  logits = jnp.einsum("btd,vd->btv", h.astype(jnp.float32), wte)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_fused_cross_entropy_and_its_gradients_equal_the_reference(dtype, atol):
  from gptjax import losses
  h = jax.random.normal(jax.random.key(0), (2, 5, 16)).astype(dtype)
  wte = jax.random.normal(jax.random.key(1), (40, 16)) * 0.5
  targets = jax.random.randint(jax.random.key(2), (2, 5), 0, 40)
  loss, (dh, dwte) = jax.value_and_grad(losses.lm_cross_entropy, argnums=(0, 1))(h, wte, targets)
  ref, (ref_dh, ref_dwte) = jax.value_and_grad(_reference_cross_entropy, argnums=(0, 1))(
      h.astype(jnp.float32), wte, targets)
  np.testing.assert_allclose(loss, ref, rtol=atol)
  assert dh.dtype == dtype and dwte.dtype == jnp.float32
  np.testing.assert_allclose(dh.astype(jnp.float32), ref_dh, atol=atol * 0.1)
  np.testing.assert_allclose(dwte, ref_dwte, atol=atol * 0.1)
