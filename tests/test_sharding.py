"""Sharded forward, gradients and train steps on 8 fake CPU devices equal the single-device results."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gptjax import config as config_lib, sharding, train
from tests.helpers import build, random_tokens, tiny_config

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (4, 1, 2)]


def _forward_and_grads(graphdef, params, tokens, mesh):
  tokens = sharding.global_batch(tokens, sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES))
  h = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens[:, :-1])
  loss, grads = jax.jit(jax.value_and_grad(train.loss_fn), static_argnums=1)(params, graphdef, tokens, None)
  return jax.device_get((h, loss, grads))


@pytest.fixture(scope="module")
def reference():
  config = tiny_config()
  graphdef, state, _, mesh, tx = build(config)
  tokens = random_tokens((8, 17))
  h, loss, grads = _forward_and_grads(graphdef, state["params"], tokens, mesh)
  step = train.make_train_step(graphdef, tx, config, build(config)[2], mesh)
  after, metrics = step(build(config)[1], tokens[None])
  return dict(params=jax.device_get(state["params"]), tokens=tokens, h=h, loss=loss, grads=grads,
              after=jax.device_get(after["params"]), metrics=jax.device_get(metrics))


def _assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5), a, b)


@pytest.mark.devices(8)
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_forward_grads_and_step_equal_single_device(reference, mesh_shape):
  config = tiny_config(mesh=mesh_shape)
  graphdef, state, shardings, mesh, tx = build(config)
  # Created directly sharded from the same seed: the same numbers as on one device.
  _assert_trees_close(jax.device_get(state["params"]), reference["params"], atol=0)
  h, loss, grads = _forward_and_grads(graphdef, state["params"], reference["tokens"], mesh)
  np.testing.assert_allclose(h, reference["h"], atol=1e-5)
  np.testing.assert_allclose(loss, reference["loss"], atol=1e-5)
  _assert_trees_close(grads, reference["grads"], atol=1e-5)
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  batch_placement = sharding.batch_sharding(mesh, config.mesh.rules, 3, 1)
  batch = sharding.global_batch(reference["tokens"][None], batch_placement, batch_dim=1)
  after, metrics = step(state, batch)
  # Adam's first update is ~lr * g / |g|: gradients within 1e-5 but near zero can move by a fraction of lr
  # (1e-3), so parameters get 5e-5; a missing reduction or wrong sharding would be off by ~lr everywhere.
  _assert_trees_close(jax.device_get(after["params"]), reference["after"], atol=5e-5)
  np.testing.assert_allclose(metrics["train_loss"], reference["metrics"]["train_loss"], atol=1e-5)


@pytest.mark.devices(8)
def test_batch_axes_come_from_the_configs_rules(reference):
  # Batch over `data` only (fsdp shards the weights, every fsdp device sees the same rows).
  config = tiny_config(mesh=(2, 4, 1))
  config.mesh.rules = tuple(("batch", "data") if name == "batch" else (name, axes) for name, axes in config.mesh.rules)
  config.train.batch_size = 8
  config_lib.validate(config, 8)
  assert config_lib.data_parallel_degree(config, 8) == 2 and config_lib.grad_accum_steps(config, 8) == 1
  graphdef, state, shardings, mesh, tx = build(config)
  placement = sharding.batch_sharding(mesh, config.mesh.rules, 3, 1)
  assert placement.spec == P(None, "data", None)
  # The model's residual stream follows the same rules inside a step (sharding.constrain).
  pin = sharding.under_mesh(lambda x: sharding.constrain(x, ("batch", None, None)), mesh, config.mesh.rules)
  pinned = jax.jit(pin)(jax.device_put(np.zeros((8, 4, 16), np.float32), sharding.replicated(mesh)))
  assert pinned.sharding.spec == P("data")
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  after, metrics = step(state, sharding.global_batch(reference["tokens"][None], placement, batch_dim=1))
  _assert_trees_close(jax.device_get(after["params"]), reference["after"], atol=5e-5)
  np.testing.assert_allclose(metrics["train_loss"], reference["metrics"]["train_loss"], atol=1e-5)
  config.mesh.rules = (("batch", "pipeline"),)
  with pytest.raises(config_lib.ConfigError, match="'pipeline'.*not mesh axes"):
    config_lib.validate(config, 8)


@pytest.mark.devices(8)
def test_parameters_are_sharded_as_the_rules_say():
  _, state, _, _, _ = build(tiny_config(mesh=(2, 2, 2)))
  params = state["params"]
  # wte [V_tensor, D_fsdp]; stacked MLP kernels [L, D_fsdp, F_tensor] and [L, F_tensor, D_fsdp].
  assert params["wte"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["blocks"]["mlp"]["fc"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert params["blocks"]["mlp"]["proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
  assert params["blocks"]["attn"]["qkv_kernel"].sharding.spec == P(None, "fsdp", None, "tensor", None)
  assert params["ln_f"]["scale"].sharding.spec == P("fsdp")
  # Each device holds an eighth of the fc kernel: 1/2 of D times 1/2 of F, replicated over data.
  fc = params["blocks"]["mlp"]["fc"]["kernel"]
  assert fc.addressable_shards[0].data.shape == (2, 32, 128)
  # Adam moments follow their parameter.
  mu = state["opt_state"][1][0].mu["wte"]["embedding"]
  assert mu.sharding.spec == P("tensor", "fsdp")


@pytest.mark.devices(8)
def test_indivisible_dimension_is_replicated():
  mesh = sharding.make_mesh(tiny_config(mesh=(1, 1, 8)))
  assert sharding.logical_to_spec(("heads", "embed"), (12, 64), tiny_config().mesh.rules, mesh) == P(None, None)
