"""What fine-tuning trains (full: base + head; LoRA: adapters + head), batches of encoded rows, and prediction.

The train step is the loop's (gptjax/train.py): gradients and optimizer state cover only the trainable tree; the
frozen base params are a separate, non-donated argument, so a LoRA step cannot change them and AdamW keeps no
moments for them.

A task supplies `task_loss(model, head, batch, dropout_key) -> (mean loss, predictions)`, e.g. `classify.loss`.
"""

import jax
import numpy as np
from flax import nnx

from gptjax import config as config_lib, generate, sharding, train
from gptjax.finetune import adalora, lora


def split_trainable(params, head: dict, lora_cfg: lora.LoraConfig | None, key: jax.Array,
                    model_cfg=None) -> tuple[dict, dict]:
  """(trainable, frozen): full fine-tuning trains {'base', 'head'}; LoRA trains {'lora', 'head'} (the adapters of
  `lora_cfg.model(model_cfg)`) and freezes 'base'."""
  if lora_cfg is None:
    return {"base": params, "head": head}, {}
  return {"lora": lora.init_adapters(lora_cfg.model(model_cfg), key), "head": head}, {"base": params}


def model_params(trainable: dict, frozen: dict, lora_cfg: lora.LoraConfig | None):
  """The params the model runs with: the trained base, or the frozen base with the adapters beside its kernels."""
  if lora_cfg is None:
    return trainable["base"]
  return lora.combine(frozen["base"], trainable["lora"])


def merged_params(trainable: dict, frozen: dict, lora_cfg: lora.LoraConfig | None):
  """Plain GPT params (adapters folded into the kernels), for exports and decoding."""
  params = model_params(trainable, frozen, lora_cfg)
  return params if lora_cfg is None else lora.merge(params, lora_cfg.alpha / lora_cfg.rank)


def _task_outputs(trainable, frozen, batch, graphdef, task_loss, lora_cfg, dropout_key):
  model = nnx.merge(graphdef, model_params(trainable, frozen, lora_cfg))
  return task_loss(model, trainable["head"], batch, dropout_key)


def objective(graphdef, task_loss, lora_cfg: lora.LoraConfig | None, orth_reg_weight: float = 0.0):
  """What fine-tuning minimises, (trainable, frozen, batch, dropout_key) -> loss: the task's loss, plus AdaLoRA's
  orthogonality regulariser on its P and Q (peft's orth_reg_weight)."""
  def loss(trainable, frozen, batch, dropout_key):
    task = _task_outputs(trainable, frozen, batch, graphdef, task_loss, lora_cfg, dropout_key)[0]
    if lora_cfg is None or lora_cfg.method != "adalora":
      return task
    return task + orth_reg_weight * adalora.orthogonality(adalora.flat(trainable["lora"]))
  return loss


def make_predict(graphdef, task_loss, lora_cfg: lora.LoraConfig | None = None, mesh=None,
                 rules=config_lib.DEFAULT_RULES):
  """jit(predict)(trainable, frozen, batch) -> the task's predictions, without dropout."""
  predict = lambda trainable, frozen, batch: _task_outputs(trainable, frozen, batch, graphdef, task_loss, lora_cfg,
                                                           None)[1]
  return jax.jit(predict if mesh is None else sharding.under_mesh(predict, mesh, rules))


# Arrays [N, max_len] aligned with the tokens: a batch cuts them to its bucket length.
TOKEN_KEYS = ("tokens", "labels", "targets")


def bucket_length(lengths_B: np.ndarray, max_len: int) -> int:
  """The length a batch is cut to: the bucket (`generate.bucket`, a power of two) of its longest row."""
  return generate.bucket(int(lengths_B.max()), max_len)


def bucket_lengths(max_len: int) -> list[int]:
  """Every length `bucket_length` can cut a batch to: the shapes a run's steps compile for."""
  return sorted({bucket_length(np.array([n]), max_len) for n in range(1, max_len + 1)})


def take(arrays: dict, rows: np.ndarray, keys) -> dict:
  """The batch `rows` of `keys`, token-aligned arrays cut to the batch's bucket length."""
  max_len = arrays["tokens"].shape[1]
  T = bucket_length(arrays["lengths"][rows], max_len)
  return {k: arrays[k][rows][:, :T] if k in TOKEN_KEYS and arrays[k].ndim == 2 else arrays[k][rows] for k in keys}


def predict_all(predict, trainable: dict, frozen: dict, arrays: dict, keys, batch_size: int,
                place=lambda batch: batch, token_predictions: bool = False, gather=np.asarray) -> np.ndarray:
  """Predictions for every row of `arrays` ({name: [N, ...]}) in the rows' order, batch_size rows per call.

  Rows are run sorted by length, so a batch is cut to a short bucket; the last batch is padded by repeating a
  row. Token-aligned predictions [B, T, ...] are padded back to [N, max_len, ...] with zeros.
  """
  n, max_len = arrays["tokens"].shape
  order = np.argsort(arrays["lengths"], kind="stable")
  outputs = [None] * n
  for start in range(0, n, batch_size):
    rows = order[start:start + batch_size]
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
    out = gather(predict(trainable, frozen, place(take(arrays, padded, keys))))[:len(rows)]
    if token_predictions:
      out = np.pad(out, [(0, 0), (0, max_len - out.shape[1])] + [(0, 0)] * (out.ndim - 2))
    for row, o in zip(rows, out):
      outputs[row] = o
  return np.stack(outputs)


def one_device_step(config, graphdef, tx, state: dict, frozen: dict, task_loss, lora_cfg: lora.LoraConfig | None):
  """The loop's jitted train step for a task on one device, everything replicated: for benchmarks and tests that
  time or inspect one task's step. Called as step(state, batch [1, B, ...], frozen) ('frozen' only if not empty)."""
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  placed = lambda tree: jax.tree.map(lambda _: sharding.replicated(mesh), tree)
  orth_reg_weight = config.lora.orth_reg_weight if lora_cfg is not None and lora_cfg.method == "adalora" else 0.0
  return train.make_train_step(graphdef, tx, config, placed(state), mesh,
                               objective(graphdef, task_loss, lora_cfg, orth_reg_weight),
                               placed(frozen) if frozen else None)
