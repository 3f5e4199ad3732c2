"""The fused LM-head cross-entropy and its hand-written VJP against optax and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import losses


def _reference_cross_entropy(h, wte, targets):
  logits = jnp.einsum("btd,vd->btv", h.astype(jnp.float32), wte)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.parametrize("vocab, dtype, rtol, grad_tol", [(40, jnp.float32, 1e-6, 1e-6), (40, jnp.bfloat16, 2e-2, 2e-2),
                                                      (50304, jnp.float32, 1e-5, 1e-5),
                                                      (50304, jnp.bfloat16, 1e-2, 3e-2)])
def test_fused_cross_entropy_and_its_gradients_equal_the_reference(vocab, dtype, rtol, grad_tol):
  """Random logits, also over GPT-2's padded vocabulary (50304): bfloat16 (its logits stored in bfloat16) within
  bfloat16's tolerance of the float32 reference, float32 within float32's; gradients relative to their largest."""
  h = (jax.random.normal(jax.random.key(0), (2, 32, 64)) * 2).astype(dtype)
  wte = jax.random.normal(jax.random.key(1), (vocab, 64)) * 0.3
  targets = jax.random.randint(jax.random.key(2), (2, 32), 0, vocab)
  loss, (dh, dwte) = jax.value_and_grad(losses.lm_cross_entropy, argnums=(0, 1))(h, wte, targets)
  ref, (ref_dh, ref_dwte) = jax.value_and_grad(_reference_cross_entropy, argnums=(0, 1))(
      h.astype(jnp.float32), wte, targets)
  np.testing.assert_allclose(loss, ref, rtol=rtol)
  assert dh.dtype == dtype and dwte.dtype == jnp.float32
  for grad, expected in ((dh.astype(jnp.float32), ref_dh), (dwte, ref_dwte)):
    np.testing.assert_allclose(grad, expected, atol=grad_tol * float(jnp.abs(expected).max()))


def test_token_losses_and_weighted_gradients_equal_numpy():
  """Per-position losses, and gradients of a masked weighted sum (the VJP scales by each position's cotangent)."""
  rng = np.random.RandomState(0)
  h_BTD, wte_VD = rng.randn(2, 4, 8).astype(np.float32), rng.randn(11, 8).astype(np.float32)
  targets_BT = rng.randint(0, 11, (2, 4))
  weights_BT = np.array([[1, 1, 0, 0], [2, 0.5, 1, 0]], np.float32)  # 0: padded positions contribute nothing
  logits_BTV = np.einsum("btd,vd->btv", h_BTD.astype(np.float64), wte_VD)
  lse_BT = np.log(np.exp(logits_BTV - logits_BTV.max(-1, keepdims=True)).sum(-1)) + logits_BTV.max(-1)
  expected_BT = lse_BT - np.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.token_losses(h_BTD, wte_VD, targets_BT), expected_BT, rtol=1e-5)
  # d(sum w * loss)/dlogits = w * (softmax - onehot); dh = dlogits @ W, dW = dlogits^T h.
  dlogits_BTV = weights_BT[..., None] * (np.exp(logits_BTV - lse_BT[..., None]) - np.eye(11)[targets_BT])
  dh, dwte = jax.grad(lambda h, w: (losses.token_losses(h, w, targets_BT) * weights_BT).sum(), argnums=(0, 1))(
      h_BTD, wte_VD)
  np.testing.assert_allclose(dh, dlogits_BTV @ wte_VD, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dwte, np.einsum("btv,btd->vd", dlogits_BTV, h_BTD), rtol=1e-5, atol=1e-5)
  assert not np.asarray(dh)[weights_BT == 0].any()


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_z_loss_and_its_gradients_equal_autodiff_of_the_reference(dtype, tol):
  """PaLM's z-loss, z * mean log(Z)^2 on top of the cross-entropy, through the fused VJP at GPT-2's vocabulary."""
  h = (jax.random.normal(jax.random.key(0), (2, 16, 64)) * 2).astype(dtype)
  wte = jax.random.normal(jax.random.key(1), (50304, 64)) * 0.3
  targets = jax.random.randint(jax.random.key(2), (2, 16), 0, 50304)

  def reference(h, wte):
    logits = jnp.einsum("btd,vd->btv", h.astype(jnp.float32), wte)
    return _reference_cross_entropy(h, wte, targets) + 1e-2 * jnp.square(jax.nn.logsumexp(logits, -1)).mean()
  loss, grads = jax.value_and_grad(losses.lm_cross_entropy, argnums=(0, 1))(h, wte, targets, 1e-2)
  ref, ref_grads = jax.value_and_grad(reference, argnums=(0, 1))(h.astype(jnp.float32), wte)
  assert float(loss) > float(losses.lm_cross_entropy(h, wte, targets)) + 1e-2  # log(Z) ~ 10 here: the term counts
  np.testing.assert_allclose(loss, ref, rtol=tol)
  for grad, expected in zip(grads, ref_grads):
    np.testing.assert_allclose(grad.astype(jnp.float32), expected, atol=tol * float(jnp.abs(expected).max()))


def test_task_z_loss():
  from gptjax.finetune import classify  # pylint: disable=import-outside-toplevel
  logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
  labels = jnp.array([0, 2])
  lse = jax.nn.logsumexp(logits, -1)
  np.testing.assert_allclose(classify.cross_entropy(logits, labels, 1e-3) - classify.cross_entropy(logits, labels),
                             1e-3 * lse ** 2, rtol=1e-5)
