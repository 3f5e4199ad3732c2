"""Mesh from the config, logical-axis rules -> PartitionSpecs, and batch placement.

Notation as in the scaling book: W[D_fsdp, F_tensor] means dimension D is split over mesh axis `fsdp` and
F over `tensor`. Model code names only logical axes; the config's rules decide the strategy.
"""

import contextvars

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gptjax import config as config_lib

# The rules of the step being traced (set by `under_mesh`), for `constrain` deep inside the model.
_RULES = contextvars.ContextVar("gptjax_rules", default=config_lib.DEFAULT_RULES)


def make_mesh(config, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (GSPMD propagates shardings through the step)."""
  devices = jax.devices() if devices is None else devices
  shape = config_lib.mesh_shape(config, len(devices))
  return jax.make_mesh(shape, config_lib.MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes, shape, rules, mesh: Mesh) -> P:
  """PartitionSpec for a tensor with these logical axes; dims a mesh axis does not divide stay replicated."""
  table = dict(rules)
  used, spec = set(), []
  for name, size in zip(axes, shape):
    mesh_axes = table.get(name) if name is not None else None
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    degree = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
    if mesh_axes and size % degree:
      logging.log_first_n(logging.WARNING, "axis %s of size %d is not divisible by mesh axes %s (%d); "
                          "replicating it", 10, name, size, mesh_axes, degree)
      mesh_axes = ()
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*spec)


def state_shardings(abstract_state, rules, mesh: Mesh):
  """NamedShardings for every Variable of an (abstract) nnx.State, as a pure dict of the same structure."""
  def sharding(var):
    axes = var.get_metadata().get("axes") or (None,) * var.ndim
    return NamedSharding(mesh, logical_to_spec(axes, var.shape, rules, mesh))
  shardings = jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings) if isinstance(shardings, nnx.State) else shardings


def batch_sharding(mesh: Mesh, rules, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
  """Tokens [..., B, T]: the batch dimension split over the mesh axes `rules` give 'batch', the rest replicated."""
  spec = [None] * ndim
  spec[batch_dim] = config_lib.batch_axes(rules) or None
  return NamedSharding(mesh, P(*spec))


def batch_degree(mesh: Mesh, rules) -> int:
  """How many ways `rules` split the batch dimension on `mesh`."""
  return int(np.prod([mesh.shape[a] for a in config_lib.batch_axes(rules)]))


def params_mesh(params) -> Mesh | None:
  """The mesh the parameters are placed on, if they are placed on one of several devices."""
  placement = getattr(jax.tree.leaves(params)[0], "sharding", None)
  return placement.mesh if isinstance(placement, NamedSharding) and placement.mesh.size > 1 else None


def constrain(x: jax.Array, axes) -> jax.Array:
  """Pins an activation to its logical `axes` (as the traced step's rules place them) inside `under_mesh`.

  The model keeps activations split over the batch this way: without it GSPMD may follow the FSDP-sharded weights
  and split the embedding dimension instead, replicating the batch (measured: 74 GiB instead of ~10 GiB of
  temporaries per device for GPT-2 small on fsdp=8).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, current_rules(), mesh))


def current_rules():
  """The rules of the step being traced under `under_mesh` (the defaults outside one)."""
  return _RULES.get()


def under_mesh(fn, mesh: Mesh, rules):
  """fn traced with `mesh` as the context mesh and `rules` as the rules `constrain` and the kernels read."""
  def wrapped(*args, **kwargs):
    token = _RULES.set(rules)
    try:
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fn(*args, **kwargs)
    finally:
      _RULES.reset(token)
  return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, rules, batch_size: int, accum: int = 1) -> np.ndarray:
  """The rows of a global batch this process feeds, in the order `global_batch` places them.

  The loop runs a batch of B rows as [accum, B / accum] micro-batches, the second axis split over the batch axes;
  this process's devices hold [:, lo:hi] of it. Feeding exactly those rows makes the global batch the same array
  on any number of processes (the same steps, dropout masks included).
  """
  micro = batch_size // accum
  placement = batch_sharding(mesh, rules, ndim=2, batch_dim=1)
  held = set()
  for index in placement.addressable_devices_indices_map((accum, micro)).values():
    held.update(range(micro)[index[1]])
  lo, hi = min(held), max(held) + 1
  if len(held) != hi - lo or (hi - lo) * jax.process_count() != micro:
    raise config_lib.ConfigError(
        f"this process's devices hold rows {sorted(held)[:8]}... of each micro-batch of {micro}: the mesh must split "
        "the batch evenly over the processes, each holding one contiguous part (put mesh.tensor within a host).")
  return (np.arange(accum)[:, None] * micro + np.arange(lo, hi)).reshape(-1)


def global_batch(local_batch: np.ndarray, sharding: NamedSharding, batch_dim: int = 0) -> jax.Array:
  """Assembles each process's slice of the batch into one global array (multi-host safe)."""
  global_shape = list(local_batch.shape)
  global_shape[batch_dim] *= jax.process_count()
  return jax.make_array_from_process_local_data(sharding, local_batch, tuple(global_shape))
