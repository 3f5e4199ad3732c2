"""The pretraining job for the one training loop (gptjax/loop.py): next-token prediction on the config's corpus.

Prepares the data (tokenizer + token shards), builds the model and its sharded train state (from GPT-2's init or
checkpoint.init_from), and gives the loop Grain batches, the validation loss and the end-of-run samples.
"""

import os

import jax
import numpy as np

from gptjax import config as config_lib, data, generate, loader, metrics, plan, sharding, train
from gptjax.job import Job, log
from gptjax.model import GPTConfig, count_params, describe_execution, flops_per_token


def build(config, workdir: str, mesh, resuming: bool) -> Job:
  """The job of a pretraining config in `workdir` (`resuming`: the workdir already holds checkpoints)."""
  t = config.train
  config, source = _initial_weights(config, workdir, mesh, resuming)
  prepared = data.prepare(config, workdir)
  vocab = config_lib.check_vocab(config, prepared.tokenizer.vocab_size)
  # 'auto' attention resolved once for this device: a fused kernel that does not compile falls back to 'xla'.
  model_cfg = GPTConfig.from_config(config.model, vocab).for_device(mesh, rules=config.mesh.rules)
  seq = model_cfg.block_size
  tx = train.make_optimizer(config)
  graphdef, abstract, shardings = train.abstract_state(config, model_cfg, mesh, tx)
  if t.micro_batch_size == -1:
    micro = plan.fit_micro_batch(config, graphdef, abstract, shardings, mesh, tx)
    log("micro-batch: %d sequences per data-parallel shard (the largest that fits in device memory)", micro)
    config = config.copy_and_resolve_references()
    config.train.micro_batch_size = micro
  if source is not None and source.tokenizer.fingerprint != prepared.tokenizer.fingerprint:
    raise config_lib.ConfigError(
        f"checkpoint.init_from={config.checkpoint.init_from!r} was trained with tokenizer "
        f"{source.tokenizer.fingerprint} but data.tokenizer_path gives {prepared.tokenizer.fingerprint}; leave "
        "data.tokenizer_path empty to use the source model's tokenizer.")

  def init_state():
    return train.init_state(config, model_cfg, mesh, tx, params=None if source is None else source.params)[1]

  accum = config_lib.grad_accum_steps(config, jax.device_count())
  batches = data.train_batches(prepared.train_path, seq, t.batch_size, t.seed,
                               sharding.process_rows(mesh, config.mesh.rules, t.batch_size, accum),
                               config.data.num_workers)
  evaluate, validation_batches = _validation(config, prepared, seq, train.make_eval_step(graphdef, config, shardings,
                                                                                          mesh), mesh)

  def finish(state, step: int) -> tuple[dict, list[str]]:
    samples = write_samples(config, prepared.tokenizer, state["params"], graphdef,
                            vocab_limit=prepared.tokenizer.vocab_size)
    return validation_batches, samples

  n_params = count_params(abstract["params"])
  flops_tok = flops_per_token(model_cfg, count_params(abstract["params"], exclude_position=True), seq)
  tokens_per_step = t.batch_size * seq
  description = [
      f"model: {metrics.format_count(n_params)} parameters | vocab {vocab} (tokenizer {prepared.tokenizer.vocab_size},"
      f" {prepared.tokenizer.kind}) | context {seq} | {describe_execution(model_cfg)}",
      f"data: {metrics.format_count(prepared.train_tokens)} train tokens, {metrics.format_count(prepared.val_tokens)}"
      f" val tokens | {metrics.format_count(tokens_per_step)} tokens/step (batch {t.batch_size} x {seq}, {accum} "
      f"micro-batches) | {metrics.format_count(flops_tok)} FLOPs/token"]
  return Job(config=config, model_cfg=model_cfg, graphdef=graphdef, tokenizer=prepared.tokenizer, tx=tx,
             abstract=abstract, shardings=shardings, init_state=init_state, batches=batches, evaluate=evaluate,
             finish=finish, tokens=lambda batch: tokens_per_step, steps=t.steps, flops_per_token=flops_tok,
             description=description, use_dropout=model_cfg.dropout > 0,
             language_model=lambda params: (params, graphdef))


def _initial_weights(config, workdir: str, mesh, resuming: bool):
  """(config, the model checkpoint.init_from names or None): a new run from a source model reads its data with
  the source's tokenizer (kept in the workdir for resumes); a resumed run loads nothing here."""
  source = None
  init_tokenizer = os.path.join(workdir, "init_tokenizer")
  if config.checkpoint.init_from and not resuming:
    source = loader.load_model(config.checkpoint.init_from, mesh)
    log("initialising from %s (step %d)", config.checkpoint.init_from, source.step)
    if jax.process_index() == 0 and not config.data.tokenizer_path:
      source.tokenizer.save(init_tokenizer)
  if config.checkpoint.init_from and not config.data.tokenizer_path:
    config = config.copy_and_resolve_references()
    config.data.update(tokenizer_path=init_tokenizer, tokenizer=data.load_tokenizer(init_tokenizer).kind)
  return config, source


def _validation(config, prepared, seq: int, eval_step, mesh):
  """(evaluate(params, final) -> {'val_loss'[, 'final_val_loss']}, the batch counts of both evaluations): the
  validation split's fixed batches, each process feeding its rows."""
  t = config.train
  local_batch = t.batch_size // jax.process_count()
  shard = (jax.process_index(), jax.process_count())
  eval_data = data.eval_batches(prepared.val_path, seq, local_batch, t.eval_batches, *shard)
  final_batches = t.final_eval_batches or t.eval_batches
  if final_batches < 0:
    final_batches = -(-(prepared.val_tokens - 1) // (seq * t.batch_size))
  final_eval_data = data.eval_batches(prepared.val_path, seq, local_batch, final_batches, *shard)
  eval_sharding = sharding.batch_sharding(mesh, config.mesh.rules)

  def loss_on(params, batches) -> float:
    losses = [eval_step(params, sharding.global_batch(b, eval_sharding)) for b in batches]
    return float(np.mean(jax.device_get(losses)))

  def evaluate(params, final: bool) -> dict:
    val_loss = loss_on(params, eval_data)
    if not final:
      return {"val_loss": val_loss}
    return {"val_loss": val_loss,
            "final_val_loss": loss_on(params, final_eval_data) if final_batches != t.eval_batches else val_loss}
  return evaluate, {"val_batches": len(eval_data), "final_val_batches": len(final_eval_data)}


def write_samples(config, tokenizer, params, graphdef, vocab_limit: int) -> list[str]:
  """Prints `log.samples` continuations of `log.sample_prompt` (end-of-text when empty)."""
  if config.log.samples <= 0:
    return []
  prompt = list(tokenizer.encode(config.log.sample_prompt)) or [tokenizer.eos_id]
  ids = generate.generate(params, graphdef, prompt, config.log.samples, config.log.sample_tokens,
                          seed=config.train.seed, vocab_limit=vocab_limit)
  texts = [config.log.sample_prompt + tokenizer.decode(row) for row in ids]
  for i, text in enumerate(texts):
    log("---- sample %d ----\n%s", i, text)
  return texts
