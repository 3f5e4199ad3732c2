"""Train state, loss, the jitted train/eval steps, the optimizer and its schedule.

The hot path is a pure function of (state, batch) under `jax.jit` with explicit shardings and a donated
state; the NNX module is only rebuilt inside the trace (`nnx.merge`), which is ~20x cheaper to dispatch than
`nnx.jit` (measured when the design was chosen).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gptjax import losses, sharding
from gptjax.config import ConfigError
from gptjax.model import GPT, GPTConfig

# {'step', 'skipped' (non-finite updates skipped): int32; 'params': pure dict; 'opt_state'; with train.spike_skip
# also 'spikes' (see `new_spike_history`)}
TrainState = dict
# train.dropout_rng -> JAX's PRNG implementation of the dropout masks' keys.
DROPOUT_RNG = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}


def new_state(params, tx, spike_window: int = 0) -> TrainState:
  """Step 0 of a run starting from `params` (`spike_window`: train.spike_skip's history, 0 = off)."""
  state = {"step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": tx.init(params)}
  if spike_window:
    state["spikes"] = new_spike_history(spike_window)
  return state


def new_spike_history(window: int) -> dict:
  """The last `window` accepted steps' loss and gradient norm (NaN until written), how many were accepted, the
  spikes skipped so far and how many of the latest steps in a row were spikes."""
  # A buffer each: the train step donates them.
  nan = lambda: jnp.full((window,), jnp.nan, jnp.float32)
  zero = lambda: jnp.zeros((), jnp.int32)
  return {"loss": nan(), "grad_norm": nan(), "accepted": zero(), "skipped": zero(), "in_row": zero()}


def spike_window(config) -> int:
  """The spike history's length in a config's train state: train.spike_window when train.spike_skip is on."""
  return config.train.spike_window if config.train.get("spike_skip", 0) > 0 else 0


def lr_schedule(config) -> optax.Schedule:
  """Linear warmup to learning_rate, then cosine decay to min_learning_rate at decay_steps (as nanoGPT)."""
  t = config.train
  warmup, decay_steps = t.warmup_steps, max(t.decay_steps or t.steps, t.warmup_steps + 1)

  def schedule(step):
    warm = t.learning_rate * (step + 1) / (warmup + 1)
    progress = jnp.clip((step - warmup) / (decay_steps - warmup), 0.0, 1.0)
    cosine = t.min_learning_rate + 0.5 * (1 + jnp.cos(jnp.pi * progress)) * (t.learning_rate - t.min_learning_rate)
    return jnp.where(step < warmup, warm, cosine)
  return schedule


def decay_mask(params) -> Any:
  """Weight decay on matmul kernels only: not on biases, LayerNorm parameters or embeddings.

  Decided by name, not ndim: with scanned layers a stacked bias or LayerNorm scale is 2-D too.
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: str(getattr(path[-1], "key", "")).endswith("kernel"),
                                          params)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and the warmup-cosine schedule."""
  t = config.train
  adamw = optax.adamw(lr_schedule(config), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw


def abstract_model(model_cfg: GPTConfig):
  """(graphdef, abstract nnx.State) without allocating anything."""
  return nnx.split(nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0))))


def abstract_state(config, model_cfg: GPTConfig, mesh: Mesh, tx: optax.GradientTransformation):
  """(graphdef, abstract train state, its shardings on `mesh`) without allocating anything."""
  graphdef, abstract = abstract_model(model_cfg)
  param_shardings = sharding.state_shardings(abstract, config.mesh.rules, mesh)
  abstract_params = nnx.to_pure_dict(abstract)
  window = spike_window(config)
  return graphdef, jax.eval_shape(lambda p: new_state(p, tx, window), abstract_params), state_shardings(
      tx, abstract_params, param_shardings, mesh, window)


@dataclasses.dataclass
class BuiltStep:
  """A config's train step on a mesh and what it runs on: the optimizer, the model's graph, the train state
  (abstract, nothing allocated) and its shardings."""
  tx: optax.GradientTransformation
  graphdef: nnx.GraphDef
  abstract: dict
  shardings: dict
  step: Any  # jit(train_step)(state, batch) -> (state, metrics)


def build_step(config, model_cfg: GPTConfig, mesh: Mesh) -> BuiltStep:
  """The next-token train step of `config` on `mesh`: what runs, plans and benchmarks compile (a fine-tuning job
  builds its own objective on `make_train_step`)."""
  tx = make_optimizer(config)
  graphdef, abstract, shardings = abstract_state(config, model_cfg, mesh, tx)
  return BuiltStep(tx, graphdef, abstract, shardings, make_train_step(graphdef, tx, config, shardings, mesh))


def state_shardings(tx, abstract_params, param_shardings, mesh: Mesh, spike_window: int = 0) -> dict:
  """The train state's shardings: the parameters', their optimizer moments alike, counters replicated."""
  shardings = {"step": sharding.replicated(mesh), "skipped": sharding.replicated(mesh), "params": param_shardings,
               "opt_state": optimizer_shardings(tx, abstract_params, param_shardings, mesh)}
  if spike_window:
    shardings["spikes"] = jax.tree.map(lambda _: sharding.replicated(mesh), new_spike_history(1))
  return shardings


def init_state(config, model_cfg: GPTConfig, mesh: Mesh, tx: optax.GradientTransformation, params=None):
  """Creates the train state directly sharded on the mesh (from `params` if given, else GPT-2 init).

  Returns (graphdef, state, state_shardings).
  """
  graphdef, abstract, shardings = abstract_state(config, model_cfg, mesh, tx)
  if params is not None:
    _check_shapes(params, abstract["params"])
    return graphdef, jax.jit(lambda p: new_state(p, tx, spike_window(config)), out_shardings=shardings)(
        params), shardings

  def init(seed):
    params = nnx.to_pure_dict(nnx.state(GPT(model_cfg, nnx.Rngs(jax.random.key(seed)))))
    return new_state(params, tx, spike_window(config))
  return graphdef, jax.jit(init, out_shardings=shardings)(config.train.seed), shardings


def _check_shapes(params, abstract_params) -> None:
  mismatch = first_shape_mismatch(params, abstract_params)
  if mismatch:
    name, have, want = mismatch
    raise ConfigError(f"initial parameters do not fit this model: {name} has shape {have}, the config's model "
                      f"needs {want}; use the same model settings as the checkpoint (checkpoint.init_from).")


def first_shape_mismatch(tree, abstract_params) -> tuple[str, tuple | None, tuple] | None:
  """(name, shape in `tree` or None when missing, the config's shape) of the first parameter of `abstract_params`
  that `tree` (arrays, or any leaves with a .shape such as saved metadata) lacks or holds in another shape."""
  # Keys compared as text: saved metadata names list entries '0' where the model's tree has the index 0.
  key = lambda path: tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
  shapes = {key(p): tuple(leaf.shape) for p, leaf in
            jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))}
  for path, want in jax.tree_util.tree_leaves_with_path(abstract_params):
    there = shapes.get(key(path))
    if there != tuple(want.shape):
      return jax.tree_util.keystr(path), there, tuple(want.shape)
  return None


def optimizer_shardings(tx, abstract_params, param_shardings, mesh: Mesh):
  """Optimizer moments take their parameter's sharding; scalars (counts) are replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                               transform_non_params=lambda _: sharding.replicated(mesh),
                               is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))


def loss_fn(params, graphdef, tokens_BT1: jax.Array, dropout_key: jax.Array | None, z_loss: float = 0.0
            ) -> jax.Array:
  """Mean next-token cross-entropy of the window tokens[:, :-1] -> tokens[:, 1:] (+ train.z_loss's term)."""
  model = nnx.merge(graphdef, params)
  h_BTD = model(tokens_BT1[:, :-1], dropout_key)
  return losses.lm_cross_entropy(h_BTD, model.head_embedding(), tokens_BT1[:, 1:], z_loss)


def guard_as_conditional(mesh: Mesh) -> bool:
  """Whether the non-finite guard runs the update inside a conditional (CPU) or selects new or old after it.

  On XLA:CPU a select reads each old moment after its update, so every donated moment is copied first (the baby
  GPT: 4 ms of a 50 ms step; GPT-2 small: 1 GB a step); a conditional copies nothing. XLA:GPU reads a conditional's
  predicate back to the host (a wait every step) and copies at HBM speed, so there (and on TPU) the select stays.
  """
  return mesh.devices.flat[0].platform == "cpu"


def make_train_step(graphdef, tx, config, shardings, mesh: Mesh, objective=None, frozen_shardings=None,
                    use_dropout=None):
  """jit(train_step)(state, batch [accum, B, ...]) -> (state, metrics): one optimizer step over k micro-batches.

  `objective(params, frozen, batch, dropout_key) -> mean loss` is what is minimised (default: next-token
  cross-entropy of token windows [B, T+1]); the batch may be any tree of arrays with leading [accum, B] dims.
  With `frozen_shardings` the step takes a third, non-donated argument `frozen` (parameters that are not trained,
  e.g. a base under LoRA adapters): jit(train_step)(state, batch, frozen).
  """
  t = config.train
  seed_key = jax.random.key(t.seed, impl=DROPOUT_RNG[t.get("dropout_rng", "threefry")])
  use_dropout = config.model.dropout > 0 if use_dropout is None else use_dropout
  schedule = lr_schedule(config)
  objective = objective or (lambda params, frozen, tokens_BT1, key: loss_fn(params, graphdef, tokens_BT1, key,
                                                                            t.z_loss))

  def train_step(state, batch_KB, frozen=None):
    params = state["params"]
    step_key = jax.random.fold_in(seed_key, state["step"])
    grad_fn = jax.value_and_grad(objective)

    def micro_step(i, batch_B):
      key = jax.random.fold_in(step_key, i) if use_dropout else None
      loss, grads = grad_fn(params, frozen, batch_B, key)
      return loss, jax.lax.with_sharding_constraint(grads, shardings["params"])

    accum = jax.tree.leaves(batch_KB)[0].shape[0]
    if accum == 1:
      loss, grads = micro_step(0, jax.tree.map(lambda x: x[0], batch_KB))
    else:
      def body(carry, xs):
        loss, grads = micro_step(*xs)
        with jax.named_scope("gradient_accumulation"):
          return jax.tree.map(jnp.add, carry, (loss, grads)), None
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), batch_KB))
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    with jax.named_scope("optimizer"):
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      spike = _is_spike(state["spikes"], loss, grad_norm, t) if "spikes" in state else jnp.bool_(False)
      new_params, new_opt_state = _guarded_update(tx, params, state["opt_state"], grads, finite & ~spike, mesh)
    updated = {"step": state["step"] + 1, "skipped": state["skipped"] + (~finite).astype(jnp.int32),
               "params": new_params, "opt_state": new_opt_state}
    metrics = {"train_loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"]),
               "skipped_steps": updated["skipped"]}
    if "spikes" in state:
      updated["spikes"] = _record(state["spikes"], loss, grad_norm, accepted=finite & ~spike, spike=finite & spike)
      metrics.update(spike_skipped_steps=updated["spikes"]["skipped"], spikes_in_row=updated["spikes"]["in_row"])
    return updated, metrics

  # One placement for every leaf of the batch: dim 1 split over the batch axes, the rest replicated.
  batch_spec = sharding.batch_sharding(mesh, config.mesh.rules, ndim=2, batch_dim=1)
  in_shardings = (shardings, batch_spec) + (() if frozen_shardings is None else (frozen_shardings,))
  return jax.jit(sharding.under_mesh(train_step, mesh, config.mesh.rules), in_shardings=in_shardings,
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def _guarded_update(tx, params, opt_state, grads, apply: jax.Array, mesh: Mesh):
  """(params, opt_state) after one optimizer update, or as they were when `apply` is false (a non-finite loss or
  gradient, train.nonfinite; a loss spike, train.spike_skip)."""
  def apply_update(operands):
    params, opt_state, grads = operands
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  operands = (params, opt_state, grads)
  if guard_as_conditional(mesh):
    return jax.lax.cond(apply, apply_update, lambda operands: operands[:2], operands)
  keep_unless_applied = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
  return keep_unless_applied(apply_update(operands), operands[:2])


def _is_spike(history: dict, loss: jax.Array, grad_norm: jax.Array, t) -> jax.Array:
  """Whether this step is a spike (train.spike_skip): its loss or gradient norm above spike_skip times their median
  over the last spike_window accepted steps (once there are that many); after spike_max_in_row spikes in a row,
  every step is, so the state stays the last good one until the loop stops the run."""
  full = history["accepted"] >= history["loss"].shape[0]
  above = (loss > t.spike_skip * jnp.median(history["loss"])) | (
      grad_norm > t.spike_skip * jnp.median(history["grad_norm"]))
  return (full & above) | (history["in_row"] >= t.spike_max_in_row)


def _record(history: dict, loss, grad_norm, accepted: jax.Array, spike: jax.Array) -> dict:
  """The spike history after a step: an accepted step's loss and gradient norm written over the oldest."""
  slot = history["accepted"] % history["loss"].shape[0]
  write = lambda buffer, value: jnp.where(accepted, buffer.at[slot].set(value.astype(jnp.float32)), buffer)
  return {"loss": write(history["loss"], loss), "grad_norm": write(history["grad_norm"], grad_norm),
          "accepted": history["accepted"] + accepted.astype(jnp.int32),
          "skipped": history["skipped"] + spike.astype(jnp.int32),
          "in_row": jnp.where(spike, history["in_row"] + 1, 0)}


def make_eval_step(graphdef, config, shardings, mesh: Mesh):
  """jit(eval_step)(params, batch [B, T+1]) -> mean loss, without dropout."""
  rules = config.mesh.rules
  return jax.jit(sharding.under_mesh(functools.partial(_eval_loss, graphdef=graphdef), mesh, rules),
                 in_shardings=(shardings["params"], sharding.batch_sharding(mesh, rules)),
                 out_shardings=sharding.replicated(mesh))


def _eval_loss(params, tokens_BT1, graphdef):
  return loss_fn(params, graphdef, tokens_BT1, None)
