"""Fine-tuning runs: `python -m gptjax.main --config=configs/sst2.py --workdir=runs/sst2` (a config with `task`).

Loads the base (checkpoint.init_from: a run, an export or an HF import), reads and encodes the task's files with
the base's tokenizer, trains the head and the base (full) or LoRA adapters for task.epochs, evaluates on the eval
file after every epoch, and writes into the workdir:

  metrics.jsonl, tensorboard/   training loss, learning rate, tokens/s; eval metrics per epoch
  eval/report.json              the final eval metrics; eval/predictions.jsonl, one row per eval example
  finetuned/                    what was trained (store.py): adapters + head, or the whole model + head
  merged/                       the fine-tuned GPT as an export (adapters merged), for sample/evaluate/init_from
  summary.json                  parameter counts, memory, wall times, final metrics
"""

import math
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from gptjax import checkpoint, config as config_lib, generate, loader, metrics, paths, sharding, train
from gptjax.config import ConfigError
from gptjax.finetune import lora, sft, store, tasks, trainer
from gptjax.loop import StopFlag, log


def run(config, workdir: str) -> dict:
  """Fine-tunes `config` in `workdir`; returns summary.json's contents (with the final eval report)."""
  start_time = time.time()
  tasks.validate(config)
  if jax.process_count() > 1:
    raise ConfigError("fine-tuning runs in one process (any number of local devices); multi-host fine-tuning is "
                      "not supported yet: run it on one host.")
  dp = config_lib.data_parallel_degree(config, jax.device_count())
  for field, value in (("train.batch_size", config.train.batch_size),
                       ("task.eval_batch_size", config.task.eval_batch_size)):
    if value % dp:
      raise ConfigError(f"{field}={value} must be a multiple of the data-parallel degree {dp}.")
  paths.makedirs(workdir)
  task = tasks.make_task(config.task)
  mesh = sharding.make_mesh(config)
  base = loader.load_model(config.checkpoint.init_from, mesh)
  tokenizer, model_cfg = base.tokenizer, base.model_cfg
  max_len = config.task.max_len or model_cfg.block_size
  if max_len > model_cfg.block_size:
    raise ConfigError(f"task.max_len={max_len} exceeds the base model's block_size {model_cfg.block_size}; "
                      "lower it (0 = block_size).")
  # 'auto' attention resolved once for this device and every batch length: a fused kernel that does not compile
  # falls back to 'xla'.
  model_cfg = model_cfg.for_device(mesh, trainer.bucket_lengths(max_len), config.mesh.rules)
  log("base: %s (step %d) | %s parameters, context %d, tokenizer %s | attention %s", config.checkpoint.init_from,
      base.step, metrics.format_count(sum(x.size for x in jax.tree.leaves(base.params))), model_cfg.block_size,
      tokenizer.kind, model_cfg.attention)

  train_examples = task.read(config.task.train_path)
  eval_examples = task.read(config.task.eval_path)
  labels = task.label_vocab(train_examples)
  train_data = task.encode(tokenizer, train_examples, labels, max_len)
  eval_data = task.encode(tokenizer, eval_examples, labels, max_len)
  full_rows = int((train_data["lengths"] == max_len).sum())
  log("data: %d train / %d eval examples%s | %d rows reach max_len %d (longer ones are cut)", len(train_examples),
      len(eval_examples), f" | {len(labels)} labels" if labels else "", full_rows, max_len)

  lora_cfg = store.lora_config(config)
  t = config.train
  init_key, adapter_key = jax.random.split(jax.random.key(t.seed))
  head = task.init_head(model_cfg.n_embd, len(labels), init_key)
  trainable, frozen = trainer.split_trainable(base.params, head, lora_cfg, adapter_key, model_cfg)
  # The head and adapters are small: replicated on the mesh (the base keeps its sharding).
  trainable = {k: v if k == "base" else jax.device_put(v, sharding.replicated(mesh)) for k, v in trainable.items()}

  steps_per_epoch = math.ceil(len(train_examples) / t.batch_size)
  steps = math.ceil(config.task.epochs * steps_per_epoch) if config.task.epochs else t.steps
  config = config.copy_and_resolve_references()
  config.train.steps = steps
  schedule = train.lr_schedule(config)
  tx = trainer.make_optimizer(schedule, t.weight_decay, t.grad_clip, t.b1, t.b2)
  state = trainer.new_state(trainable, tx)
  dropout = config.task.dropout if config.task.dropout >= 0 else model_cfg.dropout
  run_cfg = model_cfg if lora_cfg is None else lora_cfg.model(model_cfg)  # with the adapters in the forward pass
  step_fn = trainer.make_step(store.graphdef_of(run_cfg, dropout), tx, task.loss, lora_cfg, t.seed, mesh,
                              config.mesh.rules)
  predict = trainer.make_predict(store.graphdef_of(run_cfg), task.loss, lora_cfg, mesh, config.mesh.rules)
  place = lambda batch: {k: jax.device_put(v, sharding.batch_sharding(mesh, config.mesh.rules, v.ndim)) for k, v in batch.items()}

  n_trainable, n_base = lora.count(state["trainable"]), lora.count(base.params)
  memory = memory_report(step_fn, state, frozen, place(trainer.take(train_data, np.arange(t.batch_size) %
                                                                    len(train_examples), task.batch_keys)))
  log("training %s: %s trainable parameters (%.2f%% of the base's %s) | %d steps (%d per epoch, batch %d) | "
      "memory: trainable + optimizer %.1f MiB, frozen %.1f MiB, step temporaries %.1f MiB",
      f"LoRA rank {lora_cfg.rank} on {','.join(lora_cfg.targets)}" if lora_cfg else "all parameters",
      metrics.format_count(n_trainable), 100 * n_trainable / n_base, metrics.format_count(n_base), steps,
      steps_per_epoch, t.batch_size, memory["state_mib"], memory["frozen_mib"], memory["temp_mib"])

  writer = metrics.MetricsWriter(workdir, config, config.log.tensorboard, config.log.wandb)
  eval_seconds = 0.0

  def evaluate(step: int) -> tuple[dict, list[dict]]:
    nonlocal eval_seconds
    eval_start = time.perf_counter()
    report, rows = score(task, predict, state["trainable"], frozen, eval_examples, eval_data, labels,
                         config.task.eval_batch_size, place)
    eval_seconds += time.perf_counter() - eval_start
    writer.write(step, **{f"eval_{k}": report[k] for k in task.headline})
    bar.write(f"step {step} (epoch {step / steps_per_epoch:.2f}): " +
              ", ".join(f"eval {k} {report[k]:.4f}" for k in task.headline))
    return report, rows

  rng = np.random.default_rng(t.seed)
  order = np.array([], np.int64)
  loop_start = window_start = time.perf_counter()
  window_tokens = 0
  bar = tqdm(total=steps, desc="fine-tune", unit="step", dynamic_ncols=True)
  with StopFlag() as stop:
    step = 0
    while step < steps and stop.reason is None:
      if len(order) < t.batch_size:  # a new epoch: reshuffle; the tail of the last one starts it
        order = np.concatenate([order, rng.permutation(len(train_examples))])
      rows, order = order[:t.batch_size], order[t.batch_size:]
      batch = trainer.take(train_data, rows, task.batch_keys)
      state, step_metrics = step_fn(state, frozen, place(batch))
      step += 1
      bar.update(1)
      window_tokens += int(train_data["lengths"][rows].sum())
      if step % config.log.every_steps == 0 or step == steps:
        step_metrics = jax.device_get(step_metrics)
        elapsed = time.perf_counter() - window_start
        writer.write(step, train_loss=float(step_metrics["loss"]), grad_norm=float(step_metrics["grad_norm"]),
                     learning_rate=float(schedule(step)), tokens_per_sec=window_tokens / elapsed)
        bar.set_postfix(loss=f"{float(step_metrics['loss']):.4f}",
                        tok_s=metrics.format_count(window_tokens / elapsed))
        window_start, window_tokens = time.perf_counter(), 0
      if step % steps_per_epoch == 0 and step < steps:
        evaluate(step)
        window_start, window_tokens = time.perf_counter(), 0
    report, rows_out = evaluate(step)  # the final one (also when stopped early)
  train_seconds = time.perf_counter() - loop_start - eval_seconds
  bar.close()

  params = trainer.merged_params(state["trainable"], frozen, lora_cfg)
  if config.task.kind == "sft" and config.task.generate:
    prompts = [sft.prompt_text(c.turns[:-1]) for c in eval_examples[:config.task.generate]]
    responses = generate.generate_text(params, store.graphdef_of(model_cfg), tokenizer, prompts,
                                       config.task.generate_tokens, generate.Sampling(temperature=0.0),
                                       rules=base.config.mesh.rules)
    for row, response in zip(rows_out, responses):
      row["generated"] = response
  tasks.write_report(os.path.join(workdir, "eval"), report, rows_out)
  store.save(os.path.join(workdir, "finetuned"), config, base.config, labels, state["trainable"], tokenizer, step)
  if config.task.export_merged:
    checkpoint.write_export(os.path.join(workdir, "merged"), params, base.config, tokenizer, step,
                            source=os.path.join(paths.absolute(workdir), "finetuned"))
  summary = {"task": config.task.kind, "steps": step, "epochs": step / steps_per_epoch, "stopped_by": stop.reason,
             "trainable_parameters": n_trainable, "base_parameters": n_base, "lora_rank": config.lora.rank,
             "memory_mib": memory, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
             "wall_seconds": time.time() - start_time,
             "eval": {k: v for k, v in report.items() if not isinstance(v, (list, dict)) or k == "per_type"}}
  paths.write_json(os.path.join(workdir, "summary.json"), summary, indent=2)
  writer.close()
  log("done in %s (train %s, eval %s): %s | %s", metrics.format_duration(summary["wall_seconds"]),
      metrics.format_duration(train_seconds), metrics.format_duration(eval_seconds),
      ", ".join(f"{k} {report[k]:.4f}" for k in task.headline), os.path.join(workdir, "eval", "report.json"))
  if stop.reason:
    log("stopped by %s at step %d of %d; the model so far is saved.", stop.reason, step, steps)
  return {**summary, "report": report}


def memory_report(step_fn, state, frozen, batch) -> dict:
  """MiB of the trainable state (params + optimizer moments), the frozen params, and the compiled step's
  temporaries (XLA's memory_analysis, per device) -- what LoRA saves against full fine-tuning."""
  mib = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20
  analysis = step_fn.lower(state, frozen, batch).compile().memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", 0) / 2**20 if analysis is not None else float("nan")
  return {"state_mib": mib(state), "frozen_mib": mib(frozen), "temp_mib": temp}


def score(task: tasks.Task, predict, trainable, frozen, examples, data: dict, labels: list[str], batch_size: int,
          place=lambda batch: batch) -> tuple[dict, list[dict]]:
  """(metrics, prediction rows) of the model on encoded `data`."""
  predictions = trainer.predict_all(predict, trainable, frozen, data, task.batch_keys, batch_size, place,
                                    task.token_predictions)
  return task.report(examples, labels, data, predictions)


def evaluate_file(path: str, data_path: str, out_dir: str, base: str | None = None) -> dict:
  """Scores the fine-tuned model in `path` on `data_path` (the task's format); writes report and predictions."""
  tuned = store.load(path, base=base)
  task = tasks.make_task(tuned.config.task)
  examples = task.read(data_path)
  max_len = tuned.config.task.max_len or tuned.base_config.model.block_size
  data = task.encode(tuned.tokenizer, examples, tuned.labels, max_len)
  predict = trainer.make_predict(tuned.graphdef, task.loss, tuned.lora_cfg)
  report, rows = score(task, predict, tuned.trainable, tuned.frozen, examples, data, tuned.labels,
                       tuned.config.task.eval_batch_size)
  tasks.write_report(out_dir, report, rows)
  return report
