"""The fine-tuning job for the one training loop (gptjax/loop.py): a config with a `task` section.

  python -m gptjax.main --config=configs/sst2.py --workdir=runs/sst2

Loads the base (checkpoint.init_from: a run, an export or an HF import), reads and encodes the task's files with
the base's tokenizer, and hands the loop what is trained (the head and the base, or the head and LoRA/AdaLoRA
adapters computed in the forward pass beside the frozen base), shuffled Grain batches, and the task's eval metrics
after every epoch. The loop checkpoints and resumes it exactly like pretraining. At the end it writes:

  eval/report.json              the final eval metrics; eval/predictions.jsonl, one row per eval example
  finetuned/                    what was trained (store.py): adapters + head, or the whole model + head
  merged/                       the fine-tuned GPT as an export (adapters merged), for sample/evaluate/init_from
"""

import dataclasses
import functools
import math
import os

import grain
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gptjax import checkpoint, config as config_lib, generate, loader, metrics, paths, sharding, train
from gptjax.data.pipeline import BatchStream
from gptjax.finetune import adalora, lora, sft, store, tasks, tuning
from gptjax.job import Job, log
from gptjax.model import count_params, describe_execution, flops_per_token

BASE_FILE = "base.json"  # in the workdir: the base a run trains on (store.base_record), for its resumes


def build(config, workdir: str, mesh, resuming: bool) -> Job:
  """The job of a fine-tuning config in `workdir`."""
  task = tasks.make_task(config.task)  # the config is validated (loop.validate)
  train_examples = task.read(config.task.train_path)
  eval_examples = task.read(config.task.eval_path)
  t = config.train
  config, steps_per_epoch = _schedule(config, len(train_examples))
  lora_cfg = lora.LoraConfig.of(config.lora)
  # Loaded on resumes too: the frozen part, or the shapes of the trained one.
  base, base_record = _load_base(config, workdir, mesh, frozen=lora_cfg is not None, resuming=resuming)
  tokenizer = base.tokenizer
  model_cfg, max_len = _run_model(config, base.model_cfg, mesh)

  labels = task.label_vocab(train_examples)
  train_data = task.encode(tokenizer, train_examples, labels, max_len)
  eval_data = task.encode(tokenizer, eval_examples, labels, max_len)
  full_rows = int((train_data["lengths"] == max_len).sum())

  run_cfg = model_cfg if lora_cfg is None else lora_cfg.model(model_cfg)  # the adapters in the forward pass
  dropout = config.task.dropout if config.task.dropout >= 0 else model_cfg.dropout
  graphdef = store.graphdef_of(run_cfg, dropout)

  init_key, adapter_key = jax.random.split(jax.random.key(t.seed))
  head = task.init_head(model_cfg.n_embd, len(labels), init_key, train_data)
  trainable, frozen = tuning.split_trainable(base.params, head, lora_cfg, adapter_key, model_cfg)
  # The head and adapters are small: replicated on the mesh (the base keeps its sharding).
  replicated = sharding.replicated(mesh)
  trainable = {k: v if k == "base" else jax.device_put(v, replicated) for k, v in trainable.items()}
  tx, abstract, shardings = _train_state(config, trainable, lora_cfg, mesh)
  window = train.spike_window(config)

  predict = tuning.make_predict(store.graphdef_of(run_cfg), task.loss, lora_cfg, mesh, config.mesh.rules)
  final_rows = []

  def evaluate(params, final: bool) -> dict:
    report, rows = score(task, predict, params, frozen, eval_examples, eval_data, labels,
                         config.task.eval_batch_size, mesh, config.mesh.rules)
    if final:
      final_rows[:] = [report, rows]
    return {f"eval_{k}": float(report[k]) for k in task.headline}

  def finish(state, step: int) -> tuple[dict, list[str]]:
    report, rows = final_rows
    params = tuning.merged_params(state["params"], frozen, lora_cfg)
    if tasks.is_language_model(config.task) and config.task.generate:
      prompts = [sft.prompt_text(c.turns[:-1]) for c in eval_examples[:config.task.generate]]
      responses = generate.generate_text(params, store.graphdef_of(model_cfg), tokenizer, prompts,
                                         config.task.generate_tokens, generate.Sampling(temperature=0.0),
                                         rules=base.config.mesh.rules)
      for row, response in zip(rows, responses):
        row["generated"] = response
    if jax.process_index() == 0:
      tasks.write_report(os.path.join(workdir, "eval"), report, rows)
    store.save(os.path.join(workdir, "finetuned"), config, base.config, labels, state["params"], tokenizer, step,
               base_record)
    if config.task.export_merged:
      checkpoint.write_export(os.path.join(workdir, "merged"), params, base.config, tokenizer, step,
                              source=os.path.join(paths.absolute(workdir), "finetuned"))
    log("eval: %s | %s", ", ".join(f"{k} {report[k]:.4f}" for k in task.headline),
        os.path.join(workdir, "eval", "report.json"))
    return {"task": config.task.kind, "epochs": step / steps_per_epoch, "trainable_parameters": n_trainable,
            "base_parameters": n_base, "lora_rank": config.lora.rank,
            "eval": {k: v for k, v in report.items() if not isinstance(v, (list, dict)) or k == "per_type"}}, []

  n_trainable, n_base = lora.count(trainable), lora.count(base.params)
  what = (f"{lora_cfg.method} rank {lora_cfg.rank} on {','.join(lora_cfg.targets)}" if lora_cfg else
          "all parameters")
  description = [
      f"base: {config.checkpoint.init_from} (step {base.step}) | {metrics.format_count(n_base)} parameters, "
      f"context {model_cfg.block_size}, tokenizer {tokenizer.kind} | {describe_execution(model_cfg)}",
      f"data: {len(train_examples)} train / {len(eval_examples)} eval examples"
      f"{f' | {len(labels)} labels' if labels else ''} | {full_rows} rows reach max_len {max_len} (longer ones "
      "are cut)",
      f"training {what}: {metrics.format_count(n_trainable)} trainable parameters ({100 * n_trainable / n_base:.2f}%"
      f" of the base's) | {config.train.steps} steps ({steps_per_epoch} per epoch, batch {t.batch_size})"]
  accum = config_lib.grad_accum_steps(config, jax.device_count())
  batches = train_batches(train_data, task.batch_keys, t.batch_size, t.seed, config.task.group_by_length,
                          sharding.process_rows(mesh, config.mesh.rules, t.batch_size, accum))
  return Job(config=config, model_cfg=run_cfg, graphdef=graphdef, tokenizer=tokenizer, tx=tx, abstract=abstract,
             # Donated: full fine-tuning's step 0 takes over the loaded base instead of copying it.
             shardings=shardings, init_state=lambda: jax.jit(lambda p: train.new_state(p, tx, window),
                                                             out_shardings=shardings, donate_argnums=0)(trainable),
             batches=batches, evaluate=evaluate, finish=finish,
             tokens=lambda batch: int(batch["tokens"].size) * jax.process_count(), steps=config.train.steps,
             flops_per_token=_flops_per_token(model_cfg, base.params, tasks.is_language_model(config.task), lora_cfg,
                                             max_len),
             description=description, frozen=frozen or None,
             language_model=(None if not tasks.is_language_model(config.task) else lambda params: (
                 tuning.merged_params(params, frozen, lora_cfg), store.graphdef_of(model_cfg))),
             objective=tuning.objective(graphdef, functools.partial(task.loss, z_loss=t.z_loss), lora_cfg,
                                         config.lora.orth_reg_weight),
             frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen) if frozen else None,
             use_dropout=dropout > 0)


def _schedule(config, n_examples: int):
  """(config with train.steps from task.epochs and train.eval_every 0 -> every epoch, steps per epoch)."""
  steps_per_epoch = math.ceil(n_examples / config.train.batch_size)
  config = config.copy_and_resolve_references()
  if config.task.epochs:
    config.train.steps = math.ceil(config.task.epochs * steps_per_epoch)
  tasks.check_schedule(config, config.train.steps)
  config.train.eval_every = config.train.eval_every or steps_per_epoch
  return config, steps_per_epoch


def _run_model(config, base_model_cfg, mesh):
  """(the model as this run computes it, task.max_len resolved). The model is the base's; the compute dtype, the
  attention kernel and remat are this run's speed/memory choices ('qkv_fc' keeps LoRA at 0.43x the memory of full
  fine-tuning, benchmarks/RESULTS.md; bfloat16 is what a TPU or GPU computes fast). 'auto' attention is resolved
  once for this device and every batch length: a fused kernel that does not compile falls back to 'xla'."""
  model_cfg = dataclasses.replace(base_model_cfg, **{k: config.model[k] for k in tasks.RUN_MODEL_FIELDS})
  max_len = config.task.max_len or model_cfg.block_size
  if max_len > model_cfg.block_size:
    raise config_lib.ConfigError(f"task.max_len={max_len} exceeds the base model's block_size "
                                 f"{model_cfg.block_size}; lower it (0 = block_size).")
  return model_cfg.for_device(mesh, tuning.bucket_lengths(max_len), config.mesh.rules), max_len


def _train_state(config, trainable: dict, lora_cfg, mesh):
  """(optimizer, abstract train state, its shardings) of what is trained, placed as `trainable` is."""
  tx = train.make_optimizer(config)
  if lora_cfg is not None and lora_cfg.method == "adalora":
    tx = adalora.allocator(tx, config, trainable["lora"])
  param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
  window = train.spike_window(config)
  return tx, jax.eval_shape(lambda p: train.new_state(p, tx, window), abstract_params), train.state_shardings(
      tx, abstract_params, param_shardings, mesh, window)


def _load_base(config, workdir: str, mesh, frozen: bool, resuming: bool):
  """(the base model, its record): on a resume, the base as <workdir>/base.json recorded it when the run started
  (its step, and for a frozen base under adapters its fingerprint checked); else checkpoint.init_from's newest
  step, recorded."""
  record_path = os.path.join(workdir, BASE_FILE)
  path = config.checkpoint.init_from
  if resuming and paths.path(record_path).exists():
    record = paths.read_json(record_path)
    if frozen:
      return store.load_base(record, mesh, path), record
    # Full fine-tuning trains a copy: its checkpoints hold the whole model, the base gives only the shapes.
    return loader.load_model(path, mesh), record
  base = loader.load_model(path, mesh)
  record = store.base_record(path, base)
  if jax.process_index() == 0:
    paths.write_json(record_path, record, indent=2)
  return base, record


def _flops_per_token(model_cfg, params, language_model: bool, lora_cfg, seq: int) -> float:
  """Training FLOPs per token (for MFU): 6N + attention, without the LM head's matmul for the tasks that do not
  use it (classification, NER), and without the weight gradients (2N) of a frozen base under adapters."""
  n = count_params(params, exclude_position=True)
  if not language_model:
    n -= params["wte"]["embedding"].size
  return flops_per_token(model_cfg, n, seq) - (2 * n if lora_cfg is not None else 0)


def train_batches(arrays: dict, keys, batch_size: int, seed: int, group: int = 1,
                  rows: np.ndarray | None = None) -> BatchStream:
  """Endless batches of rows reshuffled every epoch, resumable at any global position (`BatchStream`).

  With group > 1, `group` batches' worth of shuffled rows are drawn at once, sorted by length, split into batches
  and those batches run in a random order: each batch holds rows of similar length (as HF's group_by_length), so
  little of it is padding. Every process draws the whole global batch (cut to the bucket of its longest row, so
  all see the same length) and takes its `rows` of it (default: all).
  """
  n = len(arrays["lengths"])
  group = max(1, min(group, n // batch_size))  # a draw is at most an epoch
  rows = np.arange(batch_size) if rows is None else np.asarray(rows)
  draws = grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(batch_size * group, drop_remainder=True)

  @functools.lru_cache(maxsize=2)  # a draw is sorted once for its `group` batches
  def draw_batches(d: int) -> np.ndarray:
    draw = draws[d]
    by_length = draw[np.argsort(arrays["lengths"][draw], kind="stable")].reshape(group, batch_size)
    return by_length[np.random.default_rng([seed, d]).permutation(group)]
  ds = draws if group == 1 else grain.MapDataset.range(n).repeat().map_with_index(
      lambda i, _: draw_batches(i // group)[i % group])
  ds = ds.map(lambda batch_rows: {k: v[rows] for k, v in tuning.take(arrays, batch_rows, keys).items()})

  def open_at(start: int):
    if start % batch_size:
      logging.warning("the saved data position (%d rows) is not a whole number of batches of %d: continuing at the "
                      "batch it falls in", start, batch_size)
    return iter(ds[start // batch_size:].to_iter_dataset())
  return BatchStream(open_at, batch_size)


def score(task: tasks.Task, predict, trainable, frozen, examples, data: dict, labels: list[str], batch_size: int,
          mesh=None, rules=config_lib.DEFAULT_RULES) -> tuple[dict, list[dict]]:
  """(metrics, prediction rows) of the model on encoded `data`; on a mesh each process feeds its rows."""
  place, gather = (lambda batch: batch), np.asarray
  if mesh is not None:
    placement = sharding.batch_sharding(mesh, rules, ndim=1)  # rows split, the rest replicated, any rank
    index, count = jax.process_index(), jax.process_count()
    place = lambda batch: {k: sharding.global_batch(v[index::count], placement) for k, v in batch.items()}
    # Global row order is process 0's rows, then process 1's: back to the batch's order.
    order = lambda n: np.concatenate([np.arange(n)[p::count] for p in range(count)])
    gather = lambda out: _unshuffle(np.asarray(multihost_utils.process_allgather(out, tiled=True)), order)
  predictions = tuning.predict_all(predict, trainable, frozen, data, task.batch_keys, batch_size, place,
                                    task.token_predictions, gather)
  # The head is replicated: every process holds all of it.
  head = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), trainable["head"])
  return task.report(examples, labels, data, predictions, head)


def _unshuffle(out, order):
  restored = np.empty_like(out)
  restored[order(len(out))] = out
  return restored


def evaluate_file(path: str, data_path: str, out_dir: str, base: str | None = None) -> dict:
  """Scores the fine-tuned model in `path` on `data_path` (the task's format); writes report and predictions."""
  tuned = store.load(path, base=base)
  task = tasks.make_task(tuned.config.task)
  examples = task.read(data_path)
  max_len = tuned.config.task.max_len or tuned.base_config.model.block_size
  data = task.encode(tuned.tokenizer, examples, tuned.labels, max_len)
  predict = tuning.make_predict(tuned.graphdef, task.loss, tuned.lora_cfg)
  report, rows = score(task, predict, tuned.trainable, tuned.frozen, examples, data, tuned.labels,
                       tuned.config.task.eval_batch_size)
  tasks.write_report(out_dir, report, rows)
  return report
