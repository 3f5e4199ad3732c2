"""Attention kernels, the KV cache and the kernel switch against independent references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import attention, config as config_lib


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


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_short_causal_attention_gradients_equal_autodiff_of_the_reference(dtype, tolerance):
  """The packed short-sequence kernel's hand-written backward pass against autodiff of the float32 reference."""
  B, T, N, H = 2, 40, 3, 16
  qkv = jax.random.normal(jax.random.key(0), (B, T, 3, N, H))
  cotangent = jax.random.normal(jax.random.key(1), (B, T, N, H))

  def loss(attend, qkv):
    return jnp.sum(attend(qkv).astype(jnp.float32) * cotangent)
  ours = lambda qkv: attention.causal_attention_qkv(qkv.astype(dtype), "causal_blocks")
  reference = lambda qkv: _reference_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
  value, grad = jax.value_and_grad(functools.partial(loss, ours))(qkv)
  expected_value, expected_grad = jax.value_and_grad(functools.partial(loss, reference))(qkv)
  assert grad.shape == qkv.shape and float(jnp.abs(expected_grad).max()) > 0.1
  np.testing.assert_allclose(value, expected_value, rtol=tolerance)
  np.testing.assert_allclose(grad, expected_grad, atol=tolerance * float(jnp.abs(expected_grad).max()))
  # The q, k, v entry point is the same kernel.
  q, k, v = (qkv[:, :, i] for i in range(3))
  np.testing.assert_allclose(attention.causal_attention(q, k, v, "causal_blocks"), reference(qkv), atol=2e-5)


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




def _numpy_attention(q_BTNH, k_BSNH, v_BSNH, mask_TS):
  """softmax(q k^T / sqrt(H) where mask) v in float64 numpy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BTNH, k_BSNH, v_BSNH))
  logits_BNTS = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits_BNTS = np.where(mask_TS, logits_BNTS, -np.inf)
  probs_BNTS = np.exp(logits_BNTS - logits_BNTS.max(-1, keepdims=True))
  probs_BNTS /= probs_BNTS.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs_BNTS, v)


def test_causal_blocks_past_several_query_blocks_equal_numpy():
  """T > QUERY_BLOCK and not a multiple of it: the last block is short and sees every key."""
  T = 2 * attention.QUERY_BLOCK + 37
  q, k, v = jax.random.normal(jax.random.key(0), (3, 1, T, 2, 8))
  expected = _numpy_attention(q, k, v, np.tril(np.ones((T, T), bool)))
  np.testing.assert_allclose(attention.causal_attention(q, k, v, "causal_blocks"), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(attention.causal_attention(q, k, v, "xla"), expected, rtol=1e-5, atol=1e-5)


def test_write_cache_places_each_head_at_its_slots():
  B, T, N, H, S = 2, 3, 2, 4, 8
  new_BTNH = np.arange(B * T * N * H, dtype=np.float32).reshape(B, T, N, H) + 1
  cache_ZSH = attention.write_cache(jnp.zeros((B * N, S, H)), jnp.asarray(new_BTNH), jnp.int32(4))
  expected_ZSH = np.zeros((B * N, S, H), np.float32)
  for b in range(B):
    for n in range(N):
      expected_ZSH[b * N + n, 4:4 + T] = new_BTNH[b, :, n]  # row z = b * N + n, slots start .. start + T - 1
  np.testing.assert_array_equal(cache_ZSH, expected_ZSH)


def test_cached_attention_over_a_prefix_equals_full_causal_attention():
  """Prefill the first P positions, then attend the remaining queries to the cache: the full attention's rows."""
  B, T, N, H, S, P = 2, 9, 3, 8, 16, 5
  q, k, v = jax.random.normal(jax.random.key(1), (3, B, T, N, H))
  k_cache = attention.write_cache(jnp.zeros((B * N, S, H)), k[:, :P], jnp.int32(0))
  v_cache = attention.write_cache(jnp.zeros((B * N, S, H)), v[:, :P], jnp.int32(0))
  k_cache = attention.write_cache(k_cache, k[:, P:], jnp.int32(P))
  v_cache = attention.write_cache(v_cache, v[:, P:], jnp.int32(P))
  mask_TS = np.arange(S)[None, :] <= np.arange(P, T)[:, None]  # query at position t sees slots 0 .. t
  y = attention.cached_attention(q[:, P:], k_cache, v_cache, jnp.broadcast_to(mask_TS, (B,) + mask_TS.shape))
  expected = _numpy_attention(q, k, v, np.tril(np.ones((T, T), bool)))[:, P:]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_explicit_kernels_resolve_to_themselves():
  for kernel in ("xla", "causal_blocks", "cudnn"):
    assert attention.resolve(kernel, jnp.float32, "cpu") == kernel
  assert attention.resolve("pallas", jnp.float32, "tpu") == "pallas"
  assert attention.resolve("pallas", jnp.float32, "cpu") == "pallas"  # interpret mode, for the tests
