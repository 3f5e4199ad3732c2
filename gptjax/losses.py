"""Language-model loss: the tied LM head fused with softmax cross-entropy."""

import jax
import jax.numpy as jnp
import optax


def lm_cross_entropy(h_BTD: jax.Array, wte_VD: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Mean cross-entropy of logits h @ wte^T against integer targets, in float32."""
  logits_BTV = jnp.einsum("btd,vd->btv", h_BTD, wte_VD.astype(h_BTD.dtype), preferred_element_type=jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()
