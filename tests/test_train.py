"""Train step behaviour: it learns, accumulation equals one big batch, the schedule and decay mask are right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import config as config_lib, sharding, train
from tests.helpers import build, random_tokens, tiny_config


def _run_steps(config, batches):
  graphdef, state, shardings, mesh, tx = build(config)
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.global_batch(batch, sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES, 3, 1), batch_dim=1))
    losses.append(float(metrics["train_loss"]))
  return state, losses


def test_overfits_a_fixed_batch():
  config = tiny_config(learning_rate=3e-3, warmup_steps=0, steps=60)
  _, losses = _run_steps(config, [random_tokens((1, 8, 17))] * 60)
  assert losses[0] > 4.5  # ~ln(128) at init
  assert losses[-1] < 0.5 * losses[0], losses


def test_gradient_accumulation_equals_one_big_batch():
  tokens = random_tokens((8, 17))
  big, big_losses = _run_steps(tiny_config(batch_size=8), [tokens[None]] * 2)
  accum, accum_losses = _run_steps(tiny_config(batch_size=8, micro_batch_size=2), [tokens.reshape(4, 2, 17)] * 2)
  np.testing.assert_allclose(accum_losses, big_losses, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), jax.device_get(accum["params"]),
               jax.device_get(big["params"]))


@pytest.mark.devices(8)
def test_accumulation_on_a_mesh_equals_single_device():
  tokens = random_tokens((8, 17))
  single, _ = _run_steps(tiny_config(batch_size=8, micro_batch_size=4), [tokens.reshape(2, 4, 17)])
  sharded, _ = _run_steps(tiny_config(batch_size=8, micro_batch_size=1, mesh=(2, 2, 2)),
                          [tokens.reshape(2, 4, 17)])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), jax.device_get(sharded["params"]),
               jax.device_get(single["params"]))


def test_schedule_matches_warmup_and_cosine():
  config = tiny_config(warmup_steps=10, steps=110, learning_rate=1e-3)
  config.train.min_learning_rate = 1e-4
  lr = train.lr_schedule(config)
  np.testing.assert_allclose(lr(0), 1e-3 / 11, rtol=1e-6)
  np.testing.assert_allclose(lr(9), 1e-3 * 10 / 11, rtol=1e-6)
  np.testing.assert_allclose(lr(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(lr(60), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-6)
  np.testing.assert_allclose(lr(110), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(lr(500), 1e-4, rtol=1e-6)


def test_weight_decay_only_on_matrices():
  _, state, _, _, _ = build(tiny_config())
  mask = train.decay_mask(state["params"])
  assert mask["blocks"]["mlp"]["fc"]["kernel"] and mask["blocks"]["attn"]["qkv_kernel"]
  assert mask["blocks"]["attn"]["out_kernel"]
  assert not mask["blocks"]["mlp"]["fc"]["bias"] and not mask["blocks"]["ln_1"]["scale"]
  assert not mask["wte"]["embedding"] and not mask["wpe"]["embedding"] and not mask["ln_f"]["bias"]


def test_dropout_changes_training_but_not_eval():
  tokens = random_tokens((1, 8, 17))
  _, plain = _run_steps(tiny_config(), [tokens])
  config = tiny_config()
  config.model.dropout = 0.5
  _, dropped = _run_steps(config, [tokens])
  assert abs(plain[0] - dropped[0]) > 1e-3
  graphdef, state, shardings, mesh, _ = build(config)
  eval_step = train.make_eval_step(graphdef, config, shardings, mesh)
  first = eval_step(state["params"], tokens[0])
  np.testing.assert_allclose(eval_step(state["params"], tokens[0]), first)
  np.testing.assert_allclose(first, plain[0], atol=1e-5)


@pytest.mark.parametrize("conditional", [True, False], ids=["conditional", "select"])
def test_a_loss_spike_is_skipped_and_the_run_equals_one_that_never_saw_it(conditional, monkeypatch):
  monkeypatch.setattr(train, "guard_as_conditional", lambda mesh: conditional)  # False: the GPU/TPU form
  config = tiny_config(spike_skip=3.0, spike_window=4, spike_max_in_row=2)
  graphdef, state, shardings, mesh, tx = build(config)
  # A batch carries a factor on its loss: 100 makes a bad batch whose loss and gradients are 100 times the others'.
  objective = lambda params, frozen, batch, key: (train.loss_fn(params, graphdef, batch["tokens"], key) *
                                                  batch["scale"][0])
  step = train.make_train_step(graphdef, tx, config, shardings, mesh, objective)
  placement = sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES, 2, 1)
  batch = lambda seed, scale=1.0: {"tokens": sharding.global_batch(random_tokens((1, 8, 17), seed=seed), placement, 1),
                                   "scale": sharding.global_batch(np.full((1, 8), scale, np.float32), placement, 1)}

  def run(scales):
    s = jax.tree.map(jnp.copy, state)
    for seed, scale in scales:
      s, metrics = step(s, batch(seed, scale))
    return jax.device_get(s), jax.device_get(metrics)
  clean, clean_metrics = run([(i, 1.0) for i in range(6)])
  spiked, spiked_metrics = run([(i, 1.0) for i in range(5)] + [(9, 100.0), (5, 1.0)])
  assert int(spiked_metrics["spike_skipped_steps"]) == 1 and int(clean_metrics["spike_skipped_steps"]) == 0
  assert int(spiked_metrics["spikes_in_row"]) == 0 and int(spiked["step"]) == 7
  jax.tree.map(np.testing.assert_array_equal, spiked["params"], clean["params"])
  jax.tree.map(np.testing.assert_array_equal, spiked["opt_state"], clean["opt_state"])
  # Spikes in a row: counted, and from spike_max_in_row on every step is refused (the loop then stops the run).
  state_after, metrics = run([(i, 1.0) for i in range(5)] + [(9, 100.0), (10, 100.0), (5, 1.0)])
  assert int(metrics["spikes_in_row"]) == 3 and int(metrics["spike_skipped_steps"]) == 3
  jax.tree.map(np.testing.assert_array_equal, state_after["params"], run([(i, 1.0) for i in range(5)])[0]["params"])
  # Before the window is full nothing is a spike.
  assert int(run([(0, 1.0), (9, 100.0)])[1]["spike_skipped_steps"]) == 0


@pytest.mark.devices(8)
def test_dropout_rng_draws_other_masks_the_same_on_any_mesh():
  losses = {}
  for rng in ("threefry", "rbg"):
    for mesh in ((1, 1, 1), (2, 2, 2)):
      config = tiny_config(mesh=mesh, dropout_rng=rng)
      config.model.dropout = 0.5
      graphdef, state, shardings, mesh_, tx = build(config)
      step = train.make_train_step(graphdef, tx, config, shardings, mesh_)
      placement = sharding.batch_sharding(mesh_, config_lib.DEFAULT_RULES, 3, 1)
      _, metrics = step(state, sharding.global_batch(random_tokens((1, 8, 17)), placement, batch_dim=1))
      losses[rng, mesh] = float(metrics["train_loss"])
  for rng in ("threefry", "rbg"):
    np.testing.assert_allclose(losses[rng, (2, 2, 2)], losses[rng, (1, 1, 1)], rtol=1e-5)
  assert abs(losses["rbg", (1, 1, 1)] - losses["threefry", (1, 1, 1)]) > 1e-4  # other masks (float noise: 1e-6)
