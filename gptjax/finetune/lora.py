"""LoRA: low-rank adapters on the attention and MLP projections, kept apart from the frozen base parameters.

An adapter for a kernel W viewed as a matrix [in, out] is a pair A [in, r], B [r, out]; the model runs with
W + (alpha / r) * A @ B reshaped to W's shape (`merge`), so the unchanged GPT serves both LoRA training and the
merged export. B starts at zero: at init the adapted model is exactly the base model. Scanned models stack
their kernels on a leading layer axis; their adapters do too (A [L, in, r], B [L, r, out]), one per layer.
"""

import math

import jax
import jax.numpy as jnp

# Target name -> (path suffix of its kernel, how many leading kernel dims are inputs, the kernel's ndim per layer).
# qkv [D, 3, N, H] and out [N, H, D] are einsum kernels; fc [D, F] and proj [F, D] are nnx.Linear kernels.
TARGETS = {
    "qkv": (("attn", "qkv_kernel"), 1, 4),
    "out": (("attn", "out_kernel"), 2, 3),
    "fc": (("mlp", "fc", "kernel"), 1, 2),
    "proj": (("mlp", "proj", "kernel"), 1, 2),
}


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def _target(names: tuple[str, ...], targets) -> tuple[int, int] | None:
  """(input dims, per-layer ndim) when the kernel at `names` is one of `targets`, else None."""
  for name in targets:
    suffix, in_dims, ndim = TARGETS[name]
    if names[-len(suffix):] == suffix:
      return in_dims, ndim
  return None


def _split_shape(shape, in_dims: int, ndim: int) -> tuple[tuple, int, int]:
  """(leading layer dims, rows, cols) of a kernel seen as a batch of [in, out] matrices."""
  lead = len(shape) - ndim
  return tuple(shape[:lead]), math.prod(shape[lead:lead + in_dims]), math.prod(shape[lead + in_dims:])


def init_adapters(params, targets, rank: int, key: jax.Array) -> dict:
  """{kernel path: {'a': [..., in, r] normal / sqrt(in), 'b': [..., r, out] zeros}} for every targeted kernel."""
  unknown = sorted(set(targets) - set(TARGETS))
  if unknown or not targets:
    raise ValueError(f"LoRA targets {list(targets)} must be a non-empty subset of {list(TARGETS)}; "
                     f"{unknown or 'none'} are not.")
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
  adapters = {}
  for path, kernel in jax.tree_util.tree_leaves_with_path(params):
    names = _names(path)
    found = _target(names, targets)
    if found is None:
      continue
    lead, rows, cols = _split_shape(kernel.shape, *found)
    a_key = jax.random.fold_in(key, len(adapters))
    adapters["/".join(names)] = {
        "a": jax.random.normal(a_key, lead + (rows, rank), jnp.float32) / math.sqrt(rows),
        "b": jnp.zeros(lead + (rank, cols), jnp.float32)}
  return adapters


def merge(params, adapters: dict, alpha: float, rank: int):
  """The base params with W + (alpha / rank) * A @ B in place of every adapted kernel (params is not changed)."""
  scale = alpha / rank

  def merged(path, kernel):
    adapter = adapters.get("/".join(_names(path)))
    if adapter is None:
      return kernel
    delta = scale * jnp.matmul(adapter["a"], adapter["b"])
    return kernel + delta.reshape(kernel.shape).astype(kernel.dtype)

  missing = set(adapters) - {"/".join(_names(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  if missing:
    raise ValueError(f"adapters for {sorted(missing)} have no kernel in these params: they were made for another "
                     "model layout (scan_layers or n_layer differ); init_adapters on these params.")
  return jax.tree_util.tree_map_with_path(merged, params)


def count(tree) -> int:
  """Number of parameters in a tree (adapters, a head, or both): the trainable count LoRA reports."""
  return sum(leaf.size for leaf in jax.tree.leaves(tree))
