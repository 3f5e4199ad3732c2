"""AdaLoRA (Zhang et al. 2023, HF peft's semantics): SVD-form adapters whose ranks follow a budget, as pure functions.

An adapter for a kernel seen as [in, out] is a triplet set {"a": Pᵀ [..., r, in] (peft's lora_A layout),
"e": Λ [..., r], "b": Q [..., r, out]};
the projection adds (alpha / r_init) * ((x·P)·Λ)·Q, Λ acting elementwise on the r axis. Leading dims `...` stack
layers, each layer its own r triplets. A triplet is masked by zeroing its Λ entry; gradients still reach it, so a
later allocation may revive it until the final phase freezes the mask.

After each optimizer update (peft's `update_and_allocate`), with step = updates done (1..T), T = total_steps:
  step <  T - tfinal: state = update_importance(...); b, mask_now = budget(...); if mask_now:
                      adapters, keep = mask_to_budget(adapters, triplet_scores(state), b)
  step == T - tfinal: the same masking at the target budget without the importance update; keep this `keep`
  step >  T - tfinal: adapters = apply_mask(adapters, keep) with the kept mask, every step.
`budget` runs on the host (exact integer arithmetic); the rest is jit-compatible, and `mask_to_budget` takes the
budget as a traced scalar, so one compiled program serves every budget.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.finetune import lora


def totals(adapters: dict, target_r: int) -> tuple[int, int]:
  """(initial, target) budgets in triplets over all adapters and layers: sum of r, and target_r per matrix."""
  init_total = sum(adapter["e"].size for adapter in adapters.values())
  n_matrices = sum(adapter["e"].size // adapter["e"].shape[-1] for adapter in adapters.values())
  return init_total, target_r * n_matrices


def budget(step: int, total_steps: int, init_total: int, target_total: int, tinit: int, tfinal: int,
           delta_t: int) -> tuple[int, bool]:
  """(triplets to keep, whether to mask at this step) on peft's cubic schedule from init_total to target_total.

  Steps <= tinit keep init_total and do not mask; then the budget falls as target + (init - target) * (1 - t)^3,
  t = (step - tinit) / (total_steps - tfinal - tinit), floored, masking every delta_t steps; from step
  total_steps - tfinal on it is target_total and masking is due every step (the mask is fixed there, see above).
  Integer arithmetic, so the floor is exact where peft's float may land one below a whole number.
  """
  if tinit < 0 or tfinal < 0 or tinit >= total_steps - tfinal:
    raise ValueError(f"AdaLoRA tinit={tinit}, tfinal={tfinal} leave no budget-decreasing phase in {total_steps} "
                     "steps: need 0 <= tinit < total_steps - tfinal; lower tinit/tfinal or train longer.")
  if delta_t < 1:
    raise ValueError(f"AdaLoRA deltaT={delta_t}: the steps between allocations must be >= 1.")
  if not 0 <= target_total <= init_total:
    raise ValueError(f"AdaLoRA target budget {target_total} exceeds the initial {init_total} triplets: "
                     "set target_r <= init_r.")
  if step <= tinit:
    return init_total, False
  if step >= total_steps - tfinal:
    return target_total, True
  span = total_steps - tfinal - tinit
  left = span - (step - tinit)
  return target_total + (init_total - target_total) * left**3 // span**3, step % delta_t == 0


def _fro(m):
  """Frobenius norm over the last two axes, with a zero (not NaN) gradient where the norm is 0."""
  sq = jnp.sum(jnp.square(m), axis=(-2, -1))
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def orthogonality(adapters: dict) -> jax.Array:
  """peft's regulariser: ||P^T P - I||_F and ||Q Q^T - I||_F averaged over every P and Q of every adapter and layer."""
  norms = []
  for adapter in adapters.values():
    eye_RR = jnp.eye(adapter["e"].shape[-1], dtype=adapter["a"].dtype)
    norms.append(_fro(jnp.einsum("...ri,...si->...rs", adapter["a"], adapter["a"]) - eye_RR).reshape(-1))
    norms.append(_fro(jnp.einsum("...ro,...so->...rs", adapter["b"], adapter["b"]) - eye_RR).reshape(-1))
  return jnp.mean(jnp.concatenate(norms))


def init_importance(adapters: dict) -> dict:
  """The sensitivity state: smoothed importance 'ipt' and its uncertainty 'unc', zeros shaped like the adapters."""
  zeros = jax.tree.map(jnp.zeros_like, adapters)
  return {"ipt": zeros, "unc": zeros}


def update_importance(state: dict, adapters: dict, grads: dict, beta1: float, beta2: float) -> dict:
  """One EMA step of I = |p * grad| (beta1) and of its uncertainty |I - Ibar| against the new Ibar (beta2)."""
  ipt = jax.tree.map(lambda p, g: jnp.abs(p * g), adapters, grads)
  ibar = jax.tree.map(lambda old, i: beta1 * old + (1 - beta1) * i, state["ipt"], ipt)
  ubar = jax.tree.map(lambda old, i, new: beta2 * old + (1 - beta2) * jnp.abs(i - new), state["unc"], ipt, ibar)
  return {"ipt": ibar, "unc": ubar}


def triplet_scores(state: dict) -> dict:
  """{name: [..., r]}: s(Λ_i) + mean over in of s(P[:, i]) + mean over out of s(Q[i, :]), s = Ibar * Ubar."""
  s = jax.tree.map(jnp.multiply, state["ipt"], state["unc"])
  return {name: s_n["e"] + jnp.mean(s_n["a"], axis=-1) + jnp.mean(s_n["b"], axis=-1) for name, s_n in s.items()}


def apply_mask(adapters: dict, keep: dict) -> dict:
  """The adapters with Λ set to 0 where keep [..., r] is False; P and Q untouched."""
  return {name: {**adapter, "e": jnp.where(keep[name], adapter["e"], 0.0)} for name, adapter in adapters.items()}


def mask_to_budget(adapters: dict, scores: dict, budget_now) -> tuple[dict, dict]:
  """(masked adapters, keep {name: bool [..., r]}) keeping exactly `budget_now` triplets with the highest scores.

  Ranked over all adapters and layers together; equal scores rank by position (adapter names sorted, then layer,
  then triplet), so the count is exact where peft's threshold `<=` would drop every tie. A layer's kept rank is
  keep.sum(-1).
  """
  names = sorted(scores)
  flat = jnp.concatenate([scores[name].reshape(-1) for name in names])
  order = jnp.argsort(flat, descending=True, stable=True)
  position = jnp.zeros_like(order).at[order].set(jnp.arange(flat.size, dtype=order.dtype))
  keep_flat = position < budget_now
  keep, offset = {}, 0
  for name in names:
    size = scores[name].size
    keep[name] = keep_flat[offset:offset + size].reshape(scores[name].shape)
    offset += size
  return apply_mask(adapters, keep), keep


def flat(tree: dict, prefix: str = "") -> dict:
  """{'blocks/attn/qkv_adapter': {'a', 'e', 'b'}, ...}: the adapters of a model's parameter tree by path."""
  out = {}
  for key, value in tree.items():
    if lora.is_adapter(key):
      out[prefix + str(key)] = value
    elif isinstance(value, dict):
      out.update(flat(value, f"{prefix}{key}/"))
  return out


def _unflat(adapters: dict, like: dict, prefix: str = "") -> dict:
  """`like` (a parameter tree) with its adapters replaced by `adapters` ({path: adapter}, as `flat` gives)."""
  return {key: adapters[prefix + str(key)] if lora.is_adapter(key) else
          _unflat(adapters, value, f"{prefix}{key}/") if isinstance(value, dict) else value
          for key, value in like.items()}


class AllocatorState(NamedTuple):
  inner: Any  # the wrapped optimizer's state
  count: jax.Array  # optimizer updates done
  importance: dict  # {'ipt', 'unc'} over flat(adapters)
  keep: dict  # {path: bool [..., r]}: the triplets the last allocation kept


def allocator(tx: optax.GradientTransformation, config, adapters: dict) -> optax.GradientTransformation:
  """`tx` followed by AdaLoRA's rank allocation over params['lora'] (peft's update_and_allocate after each step).

  An optax transformation, so the sensitivity EMAs and the mask live in the optimizer state: checkpointed and
  resumed exactly with it. A masked triplet gets the update that sets its Λ to 0. The budget schedule is a
  table over the run's steps (config.train.steps), computed once on the host.
  """
  lo, total_steps = config.lora, config.train.steps
  init_total, target_total = totals(flat(adapters), lo.target_r)
  table = [budget(s, total_steps, init_total, target_total, lo.tinit, lo.tfinal, lo.deltaT)
           for s in range(total_steps + 1)]
  budgets = jnp.asarray(np.array([b for b, _ in table], np.int32))
  due = jnp.asarray(np.array([m for _, m in table], bool))
  final_start = total_steps - lo.tfinal

  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), flat(adapters))

  def init(params):  # shapes from `adapters`: optax also calls this with a placeholder for params
    return AllocatorState(tx.init(params), jnp.zeros((), jnp.int32),
                          init_importance(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)),
                          {name: jnp.ones(a["e"].shape, bool) for name, a in shapes.items()})

  def update(grads, state, params):
    updates, inner = tx.update(grads, state.inner, params)
    step = jnp.minimum(state.count + 1, total_steps)
    stepped = flat(optax.apply_updates(params, updates)["lora"])
    learning = step < final_start  # the sensitivity is tracked until the mask is frozen
    importance = jax.tree.map(lambda new, old: jnp.where(learning, new, old),
                              update_importance(state.importance, stepped, flat(grads["lora"]), lo.beta1, lo.beta2),
                              state.importance)
    allocate = due[step] & (step <= final_start)
    _, allocated = mask_to_budget(stepped, triplet_scores(importance), budgets[step])
    keep = jax.tree.map(lambda new, old: jnp.where(allocate, new, old), allocated, state.keep)
    masked = apply_mask(stepped, keep)
    apply = allocate | (step > final_start)
    lora_updates = {name: {**u, "e": jnp.where(apply, masked[name]["e"] - p["e"], u["e"])}
                    for (name, u), p in zip(flat(updates["lora"]).items(), flat(params["lora"]).values())}
    updates = {**updates, "lora": _unflat(lora_updates, updates["lora"])}
    return updates, AllocatorState(inner, state.count + 1, importance, keep)

  return optax.GradientTransformation(init, update)
