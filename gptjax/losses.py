"""Language-model loss: the tied LM head fused with softmax cross-entropy, with a hand-written VJP.

The logits [tokens, vocab] are the largest tensor of a GPT-2 step (GPT-2 small, 8 x 1024 tokens: 1.6 GB in float32),
and on a TPU the step is bound by the bytes it moves, so the loss touches them as few times as it can:
- they are stored in the compute dtype (bfloat16 on TPU/GPU; float32 runs are unchanged), with the matmul
  accumulating and the log-sum-exp reducing in float32;
- the target's logit is h · wte[target] (D values per token), not a gather from the [tokens, vocab] logits;
- the backward pass forms dlogits = softmax - onehot in float32 from the stored logits and casts it to the compute
  dtype before the two backward matmuls, as the forward matmul does; the log-sum-exp is an output too (for
  train.z_loss), its cotangent folded into the same dlogits. (Autodiff of a float32-output einsum would hand
  float32 cotangents to those matmuls, which then run in float32: on an H200 the LM head took 14 ms of a 41 ms GPT-2
  small step.)
Measured with the TPU compiler (`python -m gptjax.plan --tpu=v5e-1 --anatomy`, benchmarks/RESULTS.md).
"""

import jax
import jax.numpy as jnp


def _logits(h_ND, wte_VD):
  return jnp.einsum("nd,vd->nv", h_ND, wte_VD.astype(h_ND.dtype), preferred_element_type=jnp.float32
                    ).astype(h_ND.dtype)


def _forward(h_ND, wte_VD, targets_N):
  logits_NV = _logits(h_ND, wte_VD)
  lse_N = jax.nn.logsumexp(logits_NV.astype(jnp.float32), axis=-1)
  target_N = jnp.einsum("nd,nd->n", h_ND, jnp.take(wte_VD, targets_N, axis=0).astype(h_ND.dtype),
                        preferred_element_type=jnp.float32)
  return lse_N - target_N, logits_NV, lse_N


@jax.custom_vjp
def _token_losses(h_ND, wte_VD, targets_N):
  """(cross-entropy [N], log-sum-exp [N]) of each token."""
  losses_N, _, lse_N = _forward(h_ND, wte_VD, targets_N)
  return losses_N, lse_N


def _token_losses_fwd(h_ND, wte_VD, targets_N):
  losses_N, logits_NV, lse_N = _forward(h_ND, wte_VD, targets_N)
  return (losses_N, lse_N), (h_ND, wte_VD, targets_N, logits_NV, lse_N)


def _token_losses_bwd(residuals, cotangents):
  h_ND, wte_VD, targets_N, logits_NV, lse_N = residuals
  g_N, g_lse_N = cotangents  # d(loss)/d(lse) = softmax; d(lse)/d(logits) = softmax too
  probs_NV = jnp.exp(logits_NV.astype(jnp.float32) - lse_N[:, None])
  onehot_NV = jax.nn.one_hot(targets_N, logits_NV.shape[-1], dtype=jnp.float32)
  dlogits_NV = (probs_NV * (g_N + g_lse_N)[:, None] - onehot_NV * g_N[:, None]).astype(h_ND.dtype)
  dh_ND = jnp.einsum("nv,vd->nd", dlogits_NV, wte_VD.astype(h_ND.dtype))
  dwte_VD = jnp.einsum("nv,nd->vd", dlogits_NV, h_ND, preferred_element_type=jnp.float32)
  return dh_ND, dwte_VD.astype(wte_VD.dtype), None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def token_terms(h_BTD: jax.Array, wte_VD: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cross-entropy [B, T], log-sum-exp [B, T]) of logits h @ wte^T against integer targets (float32 reductions).
  The log-sum-exp is log(Z), which PaLM's z-loss (train.z_loss) keeps near 0."""
  B, T, D = h_BTD.shape
  with jax.named_scope("lm_head"):
    losses_N, lse_N = _token_losses(h_BTD.reshape(B * T, D), wte_VD, targets_BT.reshape(B * T))
    return losses_N.reshape(B, T), lse_N.reshape(B, T)


def token_losses(h_BTD: jax.Array, wte_VD: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Cross-entropy [B, T] of logits h @ wte^T against integer targets (float32 reductions)."""
  return token_terms(h_BTD, wte_VD, targets_BT)[0]


def lm_cross_entropy(h_BTD: jax.Array, wte_VD: jax.Array, targets_BT: jax.Array, z_loss: float = 0.0) -> jax.Array:
  """Mean cross-entropy of logits h @ wte^T against integer targets, plus z_loss * mean log(Z)^2 when z_loss > 0."""
  losses_BT, lse_BT = token_terms(h_BTD, wte_VD, targets_BT)
  return losses_BT.mean() + (z_loss * jnp.square(lse_BT).mean() if z_loss else 0.0)
