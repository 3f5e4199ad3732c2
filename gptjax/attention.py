"""Causal self-attention kernels behind one switch (`config.model.attention`).

'xla' and 'cudnn' are `jax.nn.dot_product_attention`'s implementations. 'causal_blocks' splits the queries
into blocks and lets each attend only to keys up to its own end, skipping the fully masked upper triangle
that XLA:CPU otherwise computes and throws away (about half the work at long contexts).

Decoding attends new queries to a KV cache laid out [Z, S, H] with batch and heads flattened (Z = B*N): the
batched dots then read the cache as it is stored. With [B, N, S, H], XLA:CPU reshapes between the in-place
cache update and the dot and so copies the whole cache for every token (measured 2.4x slower at S=1024).
"""

import jax
import jax.numpy as jnp
import numpy as np

QUERY_BLOCK = 128


def resolve(implementation: str, dtype) -> str:
  """'auto' -> cuDNN's fused kernel on NVIDIA GPUs in half precision, else 'causal_blocks'."""
  if implementation != "auto":
    return implementation
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if jax.default_backend() == "gpu" and half else "causal_blocks"


def causal_attention(q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, implementation: str) -> jax.Array:
  """softmax(q k^T / sqrt(H) + causal mask) v with the chosen kernel; inputs and output are [B, T, N, H]."""
  implementation = resolve(implementation, q_BTNH.dtype)
  if implementation == "causal_blocks":
    return _causal_blocks(q_BTNH, k_BSNH, v_BSNH)
  return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=True, implementation=implementation)


def _causal_blocks(q_BTNH, k_BSNH, v_BSNH):
  T = q_BTNH.shape[1]
  if T <= QUERY_BLOCK:
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=True, implementation="xla")
  outputs = []
  for start in range(0, T, QUERY_BLOCK):
    end = min(start + QUERY_BLOCK, T)
    # Query i (absolute position start + i) may see keys 0 .. start + i.
    mask_TS = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
    outputs.append(jax.nn.dot_product_attention(
        q_BTNH[:, start:end], k_BSNH[:, :end], v_BSNH[:, :end], mask=mask_TS[None, None], implementation="xla"))
  return jnp.concatenate(outputs, axis=1)


def write_cache(cache_ZSH: jax.Array, new_BTNH: jax.Array, start: jax.Array) -> jax.Array:
  """The cache with new_BTNH's T positions written at slots start..start+T-1."""
  B, T, N, H = new_BTNH.shape
  new_ZTH = new_BTNH.transpose(0, 2, 1, 3).reshape(B * N, T, H).astype(cache_ZSH.dtype)
  return jax.lax.dynamic_update_slice_in_dim(cache_ZSH, new_ZTH, start, axis=1)


def cached_attention(q_BTNH: jax.Array, k_ZSH: jax.Array, v_ZSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(H) where mask) v over the cache slots; the output is [B, T, N, H].

  Like `jax.nn.dot_product_attention`: float32 logits and softmax, probabilities in the values' dtype.
  """
  B, T, N, H = q_BTNH.shape
  S = k_ZSH.shape[1]
  q_ZTH = q_BTNH.transpose(0, 2, 1, 3).reshape(B * N, T, H)
  logits_ZTS = jnp.einsum("zth,zsh->zts", q_ZTH, k_ZSH, preferred_element_type=jnp.float32) * (1 / np.sqrt(H))
  logits_BNTS = jnp.where(mask_BTS[:, None], logits_ZTS.reshape(B, N, T, S), -jnp.inf)
  probs_ZTS = jax.nn.softmax(logits_BNTS, axis=-1).reshape(B * N, T, S).astype(v_ZSH.dtype)
  y_ZTH = jnp.einsum("zts,zsh->zth", probs_ZTS, v_ZSH)
  return y_ZTH.reshape(B, N, T, H).transpose(0, 2, 1, 3)
