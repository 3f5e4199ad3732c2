"""Causal self-attention kernels behind one switch (`config.model.attention`).

'xla' and 'cudnn' are `jax.nn.dot_product_attention`'s implementations. 'causal_blocks' splits the queries
into blocks and lets each attend only to keys up to its own end, skipping the fully masked upper triangle
that XLA:CPU otherwise computes and throws away (about half the work at long contexts).
"""

import jax
import jax.numpy as jnp

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
