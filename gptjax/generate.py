"""Autoregressive sampling (temperature, top-k) from a trained model, jitted end to end.

This first version recomputes the context window for every new token (a sliding window of block_size);
it is exact for any length and simple.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Draws one token per row: greedy when temperature == 0, else softmax(logits / T) over the top k."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1)
  logits_BV = logits_BV / temperature
  if 0 < top_k < logits_BV.shape[-1]:
    kth_BV = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_BV, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "max_new_tokens", "temperature", "top_k",
                                              "vocab_limit"))
def _generate(params, prompt_BP, key, graphdef, prompt_len, max_new_tokens, temperature, top_k, vocab_limit):
  model = nnx.merge(graphdef, params)
  T = model.cfg.block_size
  B = prompt_BP.shape[0]
  total = max(prompt_len + max_new_tokens, T)
  buffer_BL = jnp.zeros((B, total), jnp.int32).at[:, :prompt_len].set(prompt_BP)

  def step(pos, carry):
    buffer_BL, key = carry
    start = jnp.maximum(0, pos - T)
    window_BT = jax.lax.dynamic_slice_in_dim(buffer_BL, start, T, axis=1)
    h_BD = jax.lax.dynamic_index_in_dim(model(window_BT), pos - 1 - start, axis=1, keepdims=False)
    logits_BV = model.logits(h_BD[:, None])[:, 0]
    # Padded vocabulary entries are never data: never sample them.
    logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_limit, logits_BV, -jnp.inf)
    key, sample_key = jax.random.split(key)
    token_B = sample_logits(logits_BV, sample_key, temperature, top_k).astype(jnp.int32)
    return buffer_BL.at[:, pos].set(token_B), key

  buffer_BL, _ = jax.lax.fori_loop(prompt_len, prompt_len + max_new_tokens, step, (buffer_BL, key))
  return buffer_BL[:, prompt_len:prompt_len + max_new_tokens]


def generate(params, graphdef, prompt_ids: list[int], num_samples: int, max_new_tokens: int, seed: int = 0,
             temperature: float = 0.8, top_k: int = 200, vocab_limit: int | None = None) -> np.ndarray:
  """Continues one prompt `num_samples` times; returns new token ids [num_samples, max_new_tokens]."""
  prompt_BP = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (num_samples, 1))
  vocab_limit = vocab_limit or nnx.merge(graphdef, params).cfg.vocab_size
  out = _generate(params, prompt_BP, jax.random.key(seed), graphdef, len(prompt_ids), max_new_tokens,
                  float(temperature), int(top_k), int(vocab_limit))
  return np.asarray(jax.device_get(out))
