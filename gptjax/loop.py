"""The training loop: data, sharded state, jitted steps, metrics, validation, checkpoints, samples."""

import dataclasses
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from gptjax import checkpoint, config as config_lib, data, generate, loader, metrics, paths, plan, sharding, train
from gptjax.model import GPTConfig, count_params, flops_per_token


ASSUMED_MFU = 0.4  # for the pre-training time estimate only; measured MFU is logged every log.every_steps
LONG_RUN_SECONDS = 24 * 3600  # an estimate above this gets a warning with faster alternatives


class StopFlag:
  """Set by SIGINT/SIGTERM (e.g. a TPU preemption notice); the loop stops after the current step."""

  def __init__(self):
    self.reason = None
    self.busy_until = None  # time.perf_counter() when the steps already dispatched should be done (set by the loop)
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    if self.reason is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C means "now"
    self.reason = signal.Signals(signum).name
    seconds_left = None if self.busy_until is None else self.busy_until - time.perf_counter()
    logging.warning("%s", stop_message(self.reason, seconds_left))

  def should_stop(self, at_sync_point: bool) -> bool:
    """Whether to stop now. With several processes, a stop one process asked for (its signal, its clock for
    train.max_seconds) waits for a sync point, where all agree: every process stops after the same step and
    they save one checkpoint together, instead of some waiting forever in the next step's collectives."""
    if jax.process_count() == 1:
      return self.reason is not None
    if not at_sync_point:
      return False
    anyone = bool(multihost_utils.process_allgather(np.int32(self.reason is not None)).max())
    if anyone and self.reason is None:
      self.reason = "another process's stop"
    return anyone


def stop_message(reason: str, seconds_left: float | None) -> str:
  """What a stop signal prints: the run stops once the steps already started end (in `seconds_left`), or aborts."""
  known = seconds_left is not None and seconds_left >= 1
  wait = f", which need about {metrics.format_duration(seconds_left)} more" if known else ""
  return (f"{reason} received: stopping after the steps already started{wait}, then saving a checkpoint. "
          "Ctrl-C again aborts at once, without a checkpoint.")


def long_run_warning(step_seconds: float, steps: int, devices: str) -> str | None:
  """A framed warning with faster alternatives when `steps` of `step_seconds` (estimated) exceed a day; else None."""
  if step_seconds * steps <= LONG_RUN_SECONDS:
    return None
  rule = "=" * 100
  return "\n".join([
      rule, f"WARNING: this run would take about {metrics.format_duration(step_seconds * steps)} on {devices} "
      f"({metrics.format_duration(step_seconds)} per step x {steps} steps, estimated). Instead:",
      "  - see a model learn within minutes on this machine: --config=configs/quickstart.py",
      "  - train this model on an accelerator (TPU or GPU): launch/README.md",
      f"  - or run fewer steps: --config.train.steps=N (each takes about {metrics.format_duration(step_seconds)})",
      rule])


@dataclasses.dataclass
class RunInfo:
  """What a finished run hands back (for tests, notebooks and benchmarks)."""
  step: int
  train_loss: float
  val_loss: float
  final_val_loss: float
  stopped_by: str | None
  samples: list[str]
  summary: dict  # what <workdir>/summary.json holds (see `summarize`)


def log(msg: str, *args) -> None:
  if jax.process_index() == 0:
    print(msg % args if args else msg, flush=True)


def run(config, workdir: str) -> RunInfo:
  """Trains `config` in `workdir`: the whole pretraining job of `python -m gptjax.main`."""
  start_time = time.time()
  n_devices = jax.device_count()
  config_lib.validate(config, n_devices)
  paths.makedirs(workdir)
  t = config.train

  mesh = sharding.make_mesh(config)
  mngr = checkpoint.manager(workdir, config)
  source = None
  init_tokenizer = os.path.join(workdir, "init_tokenizer")
  if config.checkpoint.init_from and not mngr.all_steps():
    source = loader.load_model(config.checkpoint.init_from, mesh)
    log("initialising from %s (step %d)", config.checkpoint.init_from, source.step)
    if jax.process_index() == 0 and not config.data.tokenizer_path:
      source.tokenizer.save(init_tokenizer)
  if config.checkpoint.init_from and not config.data.tokenizer_path:
    # The new data must be read with the source model's tokenizer (kept in the workdir for resumes).
    config = config.copy_and_resolve_references()
    config.data.update(tokenizer_path=init_tokenizer, tokenizer=data.load_tokenizer(init_tokenizer).kind)
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
    t = config.train
  accum = config_lib.grad_accum_steps(config, n_devices)

  local_batch = t.batch_size // jax.process_count()
  batches = data.train_batches(prepared.train_path, seq, local_batch, t.seed, jax.process_index(),
                               jax.process_count(), config.data.num_workers)
  state, resumed_step = checkpoint.restore_latest(mngr, abstract, shardings, batches, prepared.tokenizer)
  if state is not None:
    log("resumed from %s/%d", mngr.directory, resumed_step)
  elif source is not None:
    if source.tokenizer.fingerprint != prepared.tokenizer.fingerprint:
      raise config_lib.ConfigError(
          f"checkpoint.init_from={config.checkpoint.init_from!r} was trained with tokenizer "
          f"{source.tokenizer.fingerprint} but data.tokenizer_path gives {prepared.tokenizer.fingerprint}; leave "
          "data.tokenizer_path empty to use the source model's tokenizer.")
    graphdef, state, shardings = train.init_state(config, model_cfg, mesh, tx, params=source.params)
  else:
    graphdef, state, shardings = train.init_state(config, model_cfg, mesh, tx)
  first_step = int(state["step"])

  n_params = count_params(state["params"])
  flops_tok = flops_per_token(model_cfg, count_params(state["params"], exclude_position=True), seq)
  tokens_per_step = t.batch_size * seq
  peak_flops, peak_source = metrics.peak_flops_per_device()
  log("devices: %d x %s (%d processes) | mesh %s", n_devices, jax.devices()[0].device_kind,
      jax.process_count(), dict(mesh.shape))
  log("model: %s parameters | vocab %d (tokenizer %d, %s) | context %d | attention %s",
      metrics.format_count(n_params), vocab, prepared.tokenizer.vocab_size, prepared.tokenizer.kind, seq,
      model_cfg.attention)
  log("data: %s train tokens, %s val tokens | %s tokens/step (batch %d x %d, %d micro-batches) | "
      "%s FLOPs/token | peak %s FLOP/s/device (%s)", metrics.format_count(prepared.train_tokens),
      metrics.format_count(prepared.val_tokens), metrics.format_count(tokens_per_step), t.batch_size, seq, accum,
      metrics.format_count(flops_tok), metrics.format_count(peak_flops), peak_source)

  # Until the first steps are measured (one GPT-2 small step takes ~30 min on a CPU) the bar has no rate.
  estimate = tokens_per_step * flops_tok / (peak_flops * n_devices * ASSUMED_MFU)
  log("estimate before measuring: %s/step at %.0f%% MFU -> %s for %d steps; the bar shows measured rates",
      metrics.format_duration(estimate), 100 * ASSUMED_MFU, metrics.format_duration(estimate * (t.steps - first_step)),
      t.steps - first_step)
  warning = long_run_warning(estimate, t.steps - first_step, f"{n_devices} x {jax.devices()[0].device_kind}")
  if warning and jax.process_index() == 0:
    print(warning, file=sys.stderr, flush=True)

  eval_data = data.eval_batches(prepared.val_path, seq, local_batch, t.eval_batches, jax.process_index(),
                                jax.process_count())
  final_batches = t.final_eval_batches or t.eval_batches
  if final_batches < 0:
    final_batches = -(-(prepared.val_tokens - 1) // (seq * t.batch_size))
  final_eval_data = data.eval_batches(prepared.val_path, seq, local_batch, final_batches, jax.process_index(),
                                      jax.process_count())
  train_step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  eval_step = train.make_eval_step(graphdef, config, shardings, mesh)
  batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules, ndim=3, batch_dim=1)
  eval_sharding = sharding.batch_sharding(mesh, config.mesh.rules)

  def evaluate(params, batches=eval_data) -> float:
    losses = [eval_step(params, sharding.global_batch(b, eval_sharding)) for b in batches]
    return float(np.mean(jax.device_get(losses)))

  writer = metrics.MetricsWriter(workdir, config, config.log.tensorboard, config.log.wandb)
  profiler = metrics.StepProfiler(config_lib.profile_range(config), os.path.join(workdir, "profile"))
  train_loss = val_loss = float("nan")
  step = first_step
  finished = []  # perf_counter() as each step of this run finishes (the first one includes the compile)
  window_start, window_tokens = time.perf_counter(), 0
  bar = tqdm(total=t.steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  def save(val_loss=None):
    checkpoint.save(mngr, step, state, batches, config, prepared.tokenizer, val_loss)

  in_flight = None  # the previous step's loss: the bar counts finished steps, one step stays queued behind
  with StopFlag() as stop:
    # Multi-host runs agree on stopping at logging steps, where the loop waits for the device anyway.
    while step < t.steps and not stop.should_stop(step % config.log.every_steps == 0):
      profiler.before_step(step + 1, state)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        local = next(batches)
        local = local.reshape(accum, local.shape[0] // accum, local.shape[1])
        state, step_metrics = train_step(state, sharding.global_batch(local, batch_sharding, batch_dim=1))
      # This step starts when the one before it ends; a stop signal says how long they still need.
      step_seconds = finished[-1] - finished[-2] if len(finished) > 1 else estimate
      stop.busy_until = max(stop.busy_until or 0.0, time.perf_counter()) + step_seconds
      step += 1
      profiler.after_step(step, (state, step_metrics))
      window_tokens += tokens_per_step
      if in_flight is not None:
        jax.block_until_ready(in_flight)
        finished.append(time.perf_counter())
        bar.update(1)
      in_flight = step_metrics["train_loss"]
      if t.nonfinite == "stop" and not bool(step_metrics["finite"]):  # a per-step sync, only in this mode
        stop.reason = "nonfinite"
        break
      if step % config.log.every_steps == 0 or step == t.steps or step == first_step + 1:
        step_metrics = jax.device_get(step_metrics)
        elapsed = time.perf_counter() - window_start
        tokens_per_sec = window_tokens / elapsed
        mfu = tokens_per_sec * flops_tok / (peak_flops * n_devices)
        train_loss = float(step_metrics.pop("train_loss"))
        step_metrics.pop("finite")
        writer.write(step, train_loss=train_loss, **step_metrics, tokens_per_sec=tokens_per_sec, mfu=mfu)
        bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=metrics.format_count(tokens_per_sec), mfu=f"{mfu:.1%}")
        window_start, window_tokens = time.perf_counter(), 0  # the first window holds the compile: reset
      evaluated = bool(t.eval_every and step % t.eval_every == 0 and step < t.steps)
      if evaluated:
        val_loss = evaluate(state["params"])
        writer.write(step, val_loss=val_loss)
        bar.write(f"step {step}: val loss {val_loss:.4f}")
      if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0 and step < t.steps:
        save(val_loss if evaluated else None)
      if t.max_seconds and time.time() - start_time > t.max_seconds:
        stop.reason = f"train.max_seconds={t.max_seconds}"
  profiler.stop(state)
  if in_flight is not None:
    train_loss = float(in_flight)  # the last step's, also when the run stopped between logged steps
    finished.append(time.perf_counter())
    bar.update(1)
  bar.close()

  if stop.reason == "nonfinite":
    save()  # the step left parameters and optimizer state as they were: this is the last good state
    mngr.wait_until_finished()
    raise FloatingPointError(
        f"non-finite loss or gradient at step {step} (train.nonfinite='stop'); the last good state is saved in "
        f"{mngr.directory}/{step}. Lower train.learning_rate or check the data, then rerun to resume, or set "
        "train.nonfinite='skip' to skip such steps.")
  val_loss = evaluate(state["params"])
  final_val_loss = evaluate(state["params"], final_eval_data) if final_batches != t.eval_batches else val_loss
  writer.write(step, val_loss=val_loss, final_val_loss=final_val_loss)
  if mngr.latest_step() != step:
    save(val_loss)
  mngr.wait_until_finished()
  summary = summarize(
      step=step, steps_run=step - first_step, tokens_seen=step * tokens_per_step,
      wall_seconds=time.time() - start_time, step_seconds=np.diff(finished), tokens_per_step=tokens_per_step,
      flops_per_sec_at_peak=peak_flops * n_devices / flops_tok, train_loss=train_loss, val_loss=val_loss,
      val_batches=len(eval_data), final_val_loss=final_val_loss, final_val_batches=len(final_eval_data),
      checkpoint=f"{mngr.directory}/{step}", stopped_by=stop.reason)
  log_summary(summary, workdir)
  if stop.reason:
    log("stopped by %s at step %d of %d; the checkpoint %s/%d resumes it: rerun the same command.", stop.reason,
        step, t.steps, mngr.directory, step)
  mngr.close()
  writer.close()
  samples = write_samples(config, prepared.tokenizer, state["params"], graphdef,
                          vocab_limit=prepared.tokenizer.vocab_size)
  return RunInfo(step, train_loss, val_loss, final_val_loss, stop.reason, samples, summary)


def summarize(step_seconds, tokens_per_step, flops_per_sec_at_peak, **fields) -> dict:
  """The end-of-run summary: `fields`, this run's median step time, its tokens/s and MFU, peak memory.

  Step times are the intervals between finished steps, so the first step's compile is left out; None when the
  run finished fewer than two steps. `flops_per_sec_at_peak` is tokens/s at 100% MFU.
  """
  median_step = float(np.median(step_seconds)) if len(step_seconds) else None
  tokens_per_sec = tokens_per_step / median_step if median_step else None
  finite = lambda x: x if x is None or np.isfinite(x) else None  # JSON has no NaN
  summary = dict(fields, median_step_seconds=median_step, tokens_per_sec=tokens_per_sec,
                 mfu=tokens_per_sec / flops_per_sec_at_peak if tokens_per_sec else None,
                 peak_device_memory_bytes=metrics.device_peak_memory_bytes(),
                 peak_host_memory_bytes=metrics.host_peak_memory_bytes())
  return {k: finite(v) if isinstance(v, float) else v for k, v in summary.items()}


def log_summary(summary: dict, workdir: str) -> None:
  """Prints the summary and writes it to <workdir>/summary.json (process 0)."""
  s = summary
  path = os.path.join(workdir, "summary.json")
  if jax.process_index() == 0:
    paths.write_json(path, s)
  if s["median_step_seconds"] is None:
    speed = "median step n/a (fewer than 2 steps)"
  else:
    speed = (f"median step {metrics.format_duration(s['median_step_seconds'])}, "
             f"{metrics.format_count(s['tokens_per_sec'])} tokens/s, MFU {s['mfu']:.1%}")
  peak = s["peak_device_memory_bytes"]
  memory = (f"peak device memory {peak / 2**30:.2f} GiB" if peak is not None else
            f"peak host memory {s['peak_host_memory_bytes'] / 2**30:.2f} GiB (no device memory statistics)")
  fmt = lambda x: "n/a" if x is None else f"{x:.4f}"
  log("done: step %d (%d this run, %s tokens seen) in %s | %s | %s", s["step"], s["steps_run"],
      metrics.format_count(s["tokens_seen"]), metrics.format_duration(s["wall_seconds"]), speed, memory)
  log("loss: train %s | val %s (%d batches), %s (%d batches) | checkpoint %s | summary %s", fmt(s["train_loss"]),
      fmt(s["val_loss"]), s["val_batches"], fmt(s["final_val_loss"]), s["final_val_batches"], s["checkpoint"], path)


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
