"""What fine-tuning trains (full: base + head; LoRA: adapters + head), the jitted fine-tune step, and prediction.

The step is a pure function under `jax.jit`, as `gptjax/train.py`'s: the model is rebuilt inside the trace with
`nnx.merge`. Gradients and optimizer state cover only the trainable tree; the frozen base params are a separate,
non-donated argument, so a LoRA step cannot change them and AdamW keeps no moments for them.

A task supplies `task_loss(model, head, batch, dropout_key) -> (mean loss, predictions)`, e.g. `classify.loss`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptjax import train
from gptjax.finetune import lora


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA's rank r, scale numerator alpha (updates are scaled by alpha / r) and target projections."""
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("qkv", "out", "fc", "proj")


def split_trainable(params, head: dict, lora_cfg: LoraConfig | None, key: jax.Array) -> tuple[dict, dict]:
  """(trainable, frozen): full fine-tuning trains {'base', 'head'}; LoRA trains {'lora', 'head'}, freezes 'base'."""
  if lora_cfg is None:
    return {"base": params, "head": head}, {}
  adapters = lora.init_adapters(params, lora_cfg.targets, lora_cfg.rank, key)
  return {"lora": adapters, "head": head}, {"base": params}


def model_params(trainable: dict, frozen: dict, lora_cfg: LoraConfig | None):
  """The GPT params the model runs with: the trained base, or the frozen base with the adapters merged in."""
  if lora_cfg is None:
    return trainable["base"]
  return lora.merge(frozen["base"], trainable["lora"], lora_cfg.alpha, lora_cfg.rank)


def make_optimizer(learning_rate: float | optax.Schedule, weight_decay: float = 0.0,
                   grad_clip: float = 1.0) -> optax.GradientTransformation:
  """AdamW (decay on kernels only, as pretraining) with global-norm clipping, for the trainable tree."""
  adamw = optax.adamw(learning_rate, weight_decay=weight_decay, mask=train.decay_mask)
  return optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip > 0 else adamw


def new_state(trainable: dict, tx: optax.GradientTransformation) -> dict:
  """Step 0: {'step', 'trainable', 'opt_state'} (moments for the trainable tree only)."""
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}


def _task_outputs(trainable, frozen, batch, graphdef, task_loss, lora_cfg, dropout_key):
  model = nnx.merge(graphdef, model_params(trainable, frozen, lora_cfg))
  return task_loss(model, trainable["head"], batch, dropout_key)


def make_step(graphdef, tx: optax.GradientTransformation, task_loss, lora_cfg: LoraConfig | None = None,
              seed: int = 0):
  """jit(step)(state, frozen, batch) -> (state, {'loss', 'grad_norm'}); the state is donated, frozen is not."""
  seed_key = jax.random.key(seed)

  def step(state, frozen, batch):
    # The model applies dropout only when its config asks for it, so a key can always be passed.
    dropout_key = jax.random.fold_in(seed_key, state["step"])
    objective = lambda t: _task_outputs(t, frozen, batch, graphdef, task_loss, lora_cfg, dropout_key)
    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(state["trainable"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    new = {"step": state["step"] + 1, "trainable": optax.apply_updates(state["trainable"], updates),
           "opt_state": opt_state}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return jax.jit(step, donate_argnums=0)


def make_predict(graphdef, task_loss, lora_cfg: LoraConfig | None = None):
  """jit(predict)(trainable, frozen, batch) -> the task's predictions, without dropout."""
  return jax.jit(lambda trainable, frozen, batch: _task_outputs(trainable, frozen, batch, graphdef, task_loss,
                                                                lora_cfg, None)[1])


def predict_all(predict, trainable: dict, frozen: dict, arrays: dict, batch_size: int) -> np.ndarray:
  """Predictions for every row of `arrays` ({name: [N, ...]}), batch_size rows per call.

  The last batch is padded by repeating its first row (one compiled shape) and the padding rows dropped.
  """
  n = len(next(iter(arrays.values())))
  outputs = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    rows[rows >= n] = start
    outputs.append(np.asarray(predict(trainable, frozen, {k: v[rows] for k, v in arrays.items()}))[:n - start])
  return np.concatenate(outputs)
