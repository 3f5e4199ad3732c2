"""Weight-only quantization for inference: matrices stored in bfloat16 or int8, computed in the model's dtype.

Decoding one token reads every weight once, so narrower weights mean fewer bytes per token. `quantize` narrows
the matrices (projection kernels, token and position embeddings); biases and LayerNorm parameters stay as they
are (they are <0.1% of the bytes). int8 keeps one float32 scale per output channel (symmetric, max-abs / 127):
per column of a kernel, per row of an embedding (a row is the LM head's output channel too).

`dequantize` runs inside the jitted program that uses the weights, so only the narrow copies live in memory
between calls; on TPU and GPU XLA fuses the widening into the matmul that reads the weight.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# What `--weights` accepts besides '' (the weights as stored, no change).
WEIGHTS = ("bfloat16", "int8")


class Int8(NamedTuple):
  """A matrix as int8 values and the float32 scale of each output channel: value = q * scale."""
  q: jax.Array
  scale: jax.Array


def _reduced_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
  """The axes an output channel spans (its scale is shared over them), counted from the end so that a leading
  stacked-layers axis does not matter; None = not a matrix that is quantized."""
  name = path[-1]
  if name == "embedding":  # wte [V, D], wpe [T, D]: one scale per row
    return (ndim - 1,)
  if name == "out_kernel":  # [N, H, D]: the output channel is D
    return (ndim - 3, ndim - 2)
  if name == "qkv_kernel":  # [D, 3, N, H]
    return (ndim - 4,)
  if name == "kernel" and ndim >= 2:  # nnx.Linear [in, out]
    return (ndim - 2,)
  return None


def _is_int8(x) -> bool:
  return isinstance(x, Int8)


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def quantize(params, weights: str | None):
  """The parameter tree with its matrices stored as `weights` (None or '': params unchanged)."""
  if not weights:
    return params
  if weights not in WEIGHTS:
    raise ValueError(f"weights={weights!r} is not one of {', '.join(WEIGHTS)} ('' = as stored).")

  def narrow(path, x):
    axes = _reduced_axes(_keys(path), x.ndim)
    if axes is None or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if weights == "bfloat16":
      return x.astype(jnp.bfloat16)
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True) / 127
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
    return Int8(jnp.round(x / scale).astype(jnp.int8), scale)

  return jax.tree_util.tree_map_with_path(narrow, params)


def dequantize(params):
  """The parameter tree with every narrow matrix widened to float32, as trained (the model casts to its dtype)."""
  def widen(x):
    if isinstance(x, Int8):
      return x.q.astype(jnp.float32) * x.scale
    return x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x

  return jax.tree.map(widen, params, is_leaf=_is_int8)


def weight_bytes(params) -> int:
  """Bytes the parameters occupy as stored (int8 scales included)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def is_narrow(params) -> bool:
  """Whether any matrix of the tree is stored narrow (bfloat16 or int8)."""
  return any(_is_int8(x) or x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params, is_leaf=_is_int8))


def widen_each_step(params, step: jax.Array):
  """`dequantize` inside a loop body, kept there: tied to the loop's `step`, XLA cannot hoist the widening out of
  the loop (which would hold every weight widened for the whole loop) and fuses it into each matmul instead (TPU,
  GPU). XLA:CPU has no such fusion: there the widening belongs before the loop (measured 2.5x slower per step)."""
  return dequantize(jax.lax.optimization_barrier((params, step))[0])
