"""AdaLoRA's algorithm against hand computations: budget schedule, masking, regulariser, importance, merge."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.config import default_config
from gptjax.finetune import adalora, lora, tasks


def _init(key, lead, in_dim, out_dim, r):
  """An adapter {'a': P, 'e': Λ, 'b': Q} with peft's init (P, Q ~ N(0, 0.02), Λ zeros), as the model makes them."""
  a_key, b_key = jax.random.split(key)
  return {"a": 0.02 * jax.random.normal(a_key, (*lead, r, in_dim)), "e": jnp.zeros((*lead, r)),
          "b": 0.02 * jax.random.normal(b_key, (*lead, r, out_dim))}


def test_budget_follows_peft_cubic_schedule():
  # 100 steps, warm-up 10, final 20: the budget falls from 96 to 64 triplets over the 70 steps between.
  schedule = lambda step: adalora.budget(step, 100, 96, 64, tinit=10, tfinal=20, delta_t=5)
  assert schedule(0) == (96, False)
  assert schedule(10) == (96, False)  # peft: step <= tinit is still warm-up
  assert schedule(11) == (94, False)  # 64 + floor(32 * (69/70)^3) = 64 + floor(30.65); 11 % 5 != 0
  assert schedule(24) == (80, False)  # 64 + floor(32 * 0.8^3) = 64 + floor(16.384)
  assert schedule(45) == (68, True)  # 64 + 32 * 0.5^3, and 45 % 5 == 0
  assert schedule(80) == (64, True)  # total - tfinal: the target, the mask fixed from here on
  assert schedule(81) == (64, True)
  assert schedule(100) == (64, True)
  # peft forces the mask at step total - tfinal even off the deltaT grid (79 % 5 != 0).
  assert adalora.budget(79, 100, 96, 64, tinit=10, tfinal=21, delta_t=5) == (64, True)
  # No warm-up and no final phase (peft's defaults): decreasing from step 1, the target at the last step.
  assert adalora.budget(1, 4, 40, 8, tinit=0, tfinal=0, delta_t=1) == (8 + 32 * 27 // 64, True)
  assert adalora.budget(4, 4, 40, 8, tinit=0, tfinal=0, delta_t=1) == (8, True)


@pytest.mark.parametrize("kwargs, match", [
    ({"tinit": 60, "tfinal": 40}, "no budget-decreasing phase"),
    ({"delta_t": 0}, "deltaT=0"),
    ({"target_total": 200}, "target_r <= init_r"),
])
def test_budget_rejects_bad_settings(kwargs, match):
  args = {"step": 1, "total_steps": 100, "init_total": 96, "target_total": 64, "tinit": 0, "tfinal": 0, "delta_t": 1}
  with pytest.raises(ValueError, match=match):
    adalora.budget(**{**args, **kwargs})


def test_totals_count_triplets_over_adapters_and_layers():
  adapters = {"x": _init(jax.random.key(0), (3,), 4, 5, 6),
              "y": _init(jax.random.key(1), (), 4, 5, 6)}
  assert adalora.totals(adapters, target_r=2) == (4 * 6, 4 * 2)


def _adapters(seed=0):
  """'x' with 2 stacked layers of 3 triplets, 'y' unstacked with 4, all Λ nonzero."""
  keys = jax.random.split(jax.random.key(seed), 2)
  adapters = {"x": _init(keys[0], (2,), 5, 7, 3), "y": _init(keys[1], (), 5, 7, 4)}
  for i, name in enumerate(adapters):
    adapters[name]["e"] = 1.0 + jax.random.uniform(jax.random.key(10 + i), adapters[name]["e"].shape)
  return adapters


def test_mask_keeps_exactly_the_top_budget_triplets():
  adapters = _adapters()
  scores = {"x": jnp.array([[0.5, 0.9, 0.1], [0.3, 0.8, 0.2]]), "y": jnp.array([0.7, 0.05, 0.6, 0.4])}
  masked, keep = jax.jit(adalora.mask_to_budget)(adapters, scores, 4)  # the budget traced, as in a jitted step
  np.testing.assert_array_equal(keep["x"], [[False, True, False], [False, True, False]])  # 0.9, 0.8
  np.testing.assert_array_equal(keep["y"], [True, False, True, False])  # 0.7, 0.6
  np.testing.assert_array_equal(keep["x"].sum(-1), [1, 1])  # kept rank per layer
  for name in adapters:
    np.testing.assert_array_equal(masked[name]["e"], np.where(keep[name], adapters[name]["e"], 0.0))
    np.testing.assert_array_equal(masked[name]["a"], adapters[name]["a"])
    np.testing.assert_array_equal(masked[name]["b"], adapters[name]["b"])


@pytest.mark.parametrize("budget", [0, 1, 5, 10])
def test_mask_count_is_exact_with_tied_scores(budget):
  adapters = _adapters()
  scores = {"x": jnp.full((2, 3), 0.25), "y": jnp.array([0.25, 0.25, 1.0, 0.25])}
  _, keep = adalora.mask_to_budget(adapters, scores, budget)
  assert sum(int(k.sum()) for k in keep.values()) == budget
  if budget:  # the single best first, then the ties by position: x layer 0, x layer 1, then y
    assert bool(keep["y"][2])
    expected_x = np.arange(6).reshape(2, 3) < budget - 1
    np.testing.assert_array_equal(keep["x"], expected_x)


def test_orthogonality_on_hand_made_adapters():
  s3 = math.sqrt(3.0)
  adapters = {
      # P [3, 2] (stored as Pᵀ) has orthonormal columns: 0. Q = [[1, 1], [0, 1]]: Q Q^T - I = [[1, 1], [1, 0]],
      # norm sqrt(3).
      "x": {"a": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "e": jnp.ones(2),
            "b": jnp.array([[1.0, 1.0], [0.0, 1.0]])},
      # 2 layers, r = 1: P = 0 gives |0 - 1| = 1 per layer; Q = [2], [0] give |4 - 1| = 3 and |0 - 1| = 1.
      "y": {"a": jnp.zeros((2, 1, 4)), "e": jnp.ones((2, 1)), "b": jnp.array([[[2.0]], [[0.0]]])}}
  np.testing.assert_allclose(adalora.orthogonality(adapters), (0 + s3 + 1 + 1 + 3 + 1) / 6, rtol=1e-6)
  grads = jax.grad(adalora.orthogonality)(adapters)  # the exactly orthonormal P must not give NaN
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(grads["x"]["a"], 0.0)


def test_importance_ema_after_two_updates():
  beta1, beta2 = 0.8, 0.5
  adapters = {"x": {"a": jnp.array([[2.0, 1.0]]), "e": jnp.array([1.0]), "b": jnp.array([[0.0, 3.0]])}}
  grads = {"x": {"a": jnp.array([[-0.5, 0.0]]), "e": jnp.array([2.0]), "b": jnp.array([[5.0, 1.0]])}}
  state = adalora.update_importance(adalora.init_importance(adapters), adapters, grads, beta1, beta2)
  adapters2 = {"x": {"a": jnp.array([[-1.0, 1.0]]), "e": jnp.array([0.5]), "b": jnp.array([[1.0, 3.0]])}}
  grads2 = {"x": {"a": jnp.array([[3.0, 4.0]]), "e": jnp.array([2.0]), "b": jnp.array([[1.0, 0.0]])}}
  state = adalora.update_importance(state, adapters2, grads2, beta1, beta2)
  # Per element, I1 = |p1 g1|, I2 = |p2 g2|: Ibar1 = 0.2 I1, U1 = 0.5 |I1 - Ibar1|;
  # Ibar2 = 0.8 Ibar1 + 0.2 I2, U2 = 0.5 U1 + 0.5 |I2 - Ibar2|.
  i1 = {"a": [[1.0, 0.0]], "e": [2.0], "b": [[0.0, 3.0]]}
  i2 = {"a": [[3.0, 4.0]], "e": [1.0], "b": [[1.0, 0.0]]}
  for leaf in ("a", "e", "b"):
    ibar1, x1, x2 = 0.2 * np.array(i1[leaf]), np.array(i1[leaf]), np.array(i2[leaf])
    ibar2 = 0.8 * ibar1 + 0.2 * x2
    unc2 = 0.5 * (0.5 * np.abs(x1 - ibar1)) + 0.5 * np.abs(x2 - ibar2)
    np.testing.assert_allclose(state["ipt"]["x"][leaf], ibar2, rtol=1e-6, err_msg=leaf)
    np.testing.assert_allclose(state["unc"]["x"][leaf], unc2, rtol=1e-6, err_msg=leaf)
  # The first element of a by hand: Ibar2 = 0.8 * 0.2 + 0.2 * 3 = 0.76, U2 = 0.5 * 0.4 + 0.5 * 2.24 = 1.32.
  np.testing.assert_allclose([state["ipt"]["x"]["a"][0, 0], state["unc"]["x"]["a"][0, 0]], [0.76, 1.32], rtol=1e-6)


def test_triplet_scores_combine_value_and_vector_scores():
  state = {"ipt": {"x": {"a": jnp.array([[1.0, 3.0], [2.0, 4.0]]), "e": jnp.array([1.0, 0.5]),
                         "b": jnp.array([[1.0, 1.0, 1.0], [0.0, 3.0, 0.0]])}},
           "unc": {"x": {"a": jnp.full((2, 2), 2.0), "e": jnp.array([1.0, 4.0]), "b": jnp.ones((2, 3))}}}
  # s(Λ) = [1, 2]; P's columns [2, 6] and [4, 8] average to [4, 6]; Q's rows average to [1, 1].
  np.testing.assert_allclose(adalora.triplet_scores(state)["x"], [6.0, 9.0], rtol=1e-6)


@pytest.mark.parametrize("lead", [(), (3,)])
def test_delta_equals_the_unmerged_computation(lead):
  """The merged update s·P·diag(Λ)·Q (what a merged export adds to W) equals running x through P, Λ and Q."""
  alpha, r = 8.0, 4
  keys = jax.random.split(jax.random.key(0), 3)
  adapter = _init(keys[0], lead, 6, 5, r)
  adapter["e"] = jax.random.normal(keys[1], lead + (r,)).at[..., 1].set(0.0)  # a masked triplet among them
  x_BI = jax.random.normal(keys[2], (7, 6))
  delta = lora.delta(adapter, alpha / r)
  unmerged = alpha / r * jnp.einsum("...br,...ro->...bo", jnp.einsum("bi,...ri->...br", x_BI, adapter["a"])
                                    * adapter["e"][..., None, :], adapter["b"])
  np.testing.assert_allclose(jnp.einsum("bi,...io->...bo", x_BI, delta), unmerged, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(unmerged).max()) > 1e-4


def test_allocator_keeps_the_budget_each_step_and_freezes_the_mask():
  """Wrapped around an optimizer over {'lora', 'head'}: before tinit nothing is masked, then exactly the budget
  of triplets keeps a nonzero Λ at every step, and from total - tfinal on the mask no longer changes."""
  config = tasks.add_task_config(default_config(), "ner")
  config.train.steps = 10
  config.lora.update(rank=4, method="adalora", target_r=2, tinit=2, tfinal=3, deltaT=1)
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"lora": {"blocks": {"attn": {"qkv_adapter": _init(keys[0], (2,), 5, 6, 4)},
                                "mlp": {"fc_adapter": _init(keys[1], (), 5, 6, 4)}}},
            "head": {"kernel": jnp.ones((3, 2))}}
  tx = adalora.allocator(optax.sgd(0.1), config, params["lora"])
  state = tx.init(params)
  update = jax.jit(tx.update)
  kept = []
  for step in range(1, 11):
    grads = jax.tree.map(lambda x, k=jax.random.fold_in(keys[2], step): jax.random.normal(k, x.shape), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    e = [params["lora"]["blocks"]["attn"]["qkv_adapter"]["e"], params["lora"]["blocks"]["mlp"]["fc_adapter"]["e"]]
    nonzero = sum(int((np.asarray(x) != 0).sum()) for x in e)
    expected, _ = adalora.budget(step, 10, 12, 6, tinit=2, tfinal=3, delta_t=1)
    assert nonzero == expected, (step, nonzero, expected)  # 12 triplets (2 layers x 4 + 4) down to 2 per matrix
    kept.append(jax.tree.map(np.asarray, state.keep))
  for later in kept[7:]:  # steps 8..10 keep step 7's mask
    jax.tree.map(np.testing.assert_array_equal, later, kept[6])
