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

from gptjax import checkpoint, config as config_lib, metrics, paths, pretrain, sharding, train
from gptjax.job import log


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


def run(config, workdir: str) -> RunInfo:
  """Trains `config` in `workdir`: pretraining, or fine-tuning when the config has a `task` section."""
  start_time = time.time()
  n_devices = jax.device_count()
  config_lib.validate(config, n_devices)
  paths.makedirs(workdir)
  mesh = sharding.make_mesh(config)
  mngr = checkpoint.manager(workdir, config)
  if "task" in config:
    from gptjax.finetune import job as finetune_job  # pylint: disable=import-outside-toplevel
    job = finetune_job.build(config, workdir, mesh, resuming=bool(mngr.all_steps()))
  else:
    job = pretrain.build(config, workdir, mesh, resuming=bool(mngr.all_steps()))
  config, t = job.config, job.config.train
  accum = config_lib.grad_accum_steps(config, n_devices)
  state, resumed_step = checkpoint.restore_latest(mngr, job.abstract, job.shardings, job.batches, job.tokenizer)
  if state is not None:
    log("resumed from %s/%d", mngr.directory, resumed_step)
  else:
    state = job.init_state()
  first_step = int(state["step"])

  peak_flops, peak_source = metrics.peak_flops_per_device()
  log("devices: %d x %s (%d processes) | mesh %s | peak %s FLOP/s/device (%s)", n_devices,
      jax.devices()[0].device_kind, jax.process_count(), dict(mesh.shape), metrics.format_count(peak_flops),
      peak_source)
  for line in job.description:
    log("%s", line)
  # Until the first steps are measured (one GPT-2 small step takes ~30 min on a CPU) the bar has no rate.
  tokens_per_step = t.batch_size * job.model_cfg.block_size
  estimate = tokens_per_step * job.flops_per_token / (peak_flops * n_devices * ASSUMED_MFU)
  log("estimate before measuring: %s/step at %.0f%% MFU -> %s for %d steps; the bar shows measured rates",
      metrics.format_duration(estimate), 100 * ASSUMED_MFU,
      metrics.format_duration(estimate * (job.steps - first_step)), job.steps - first_step)
  warning = long_run_warning(estimate, job.steps - first_step, f"{n_devices} x {jax.devices()[0].device_kind}")
  if warning and jax.process_index() == 0:
    print(warning, file=sys.stderr, flush=True)

  train_step = train.make_train_step(job.graphdef, job.tx, config, job.shardings, mesh, job.objective,
                                     job.frozen_shardings, job.use_dropout)
  frozen = () if job.frozen is None else (job.frozen,)
  batch_placement = sharding.batch_sharding(mesh, config.mesh.rules, ndim=2, batch_dim=1)

  def place(local):
    """This process's batch [B_local, ...] as the global [accum, B, ...] (micro-batches on the leading axis)."""
    return jax.tree.map(lambda x: sharding.global_batch(x.reshape(accum, x.shape[0] // accum, *x.shape[1:]),
                                                        batch_placement, batch_dim=1), local)

  writer = metrics.MetricsWriter(workdir, config, config.log.tensorboard, config.log.wandb)
  profiler = metrics.StepProfiler(config_lib.profile_range(config), os.path.join(workdir, "profile"))
  train_loss, evaluation = float("nan"), {}
  step = first_step
  finished = []  # perf_counter() as each step of this run finishes (the first one includes the compile)
  window_start, window_tokens = time.perf_counter(), 0
  tokens_run = 0  # this run's tokens (fine-tuning batches vary in length)
  bar = tqdm(total=job.steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0)

  def save(val_loss=None):
    checkpoint.save(mngr, step, state, job.batches, config, job.tokenizer, val_loss)

  def evaluate(final: bool) -> dict:
    results = job.evaluate(state["params"], final)
    writer.write(step, **results)
    return results

  in_flight = None  # the previous step's loss: the bar counts finished steps, one step stays queued behind
  # train.nonfinite='stop' reads the state's count of skipped (non-finite) steps only where the loop waits for the
  # device anyway: a step that is not finite leaves the state as it was, so the steps up to the next such point
  # continue from a finite state, and no checkpoint is written before the check.
  skipped_before, checked_step = int(state["skipped"]), first_step
  with StopFlag() as stop:
    # Multi-host runs agree on stopping at logging steps, where the loop waits for the device anyway.
    while step < job.steps and not stop.should_stop(step % config.log.every_steps == 0):
      profiler.before_step(step + 1, state)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        local = next(job.batches)
        state, step_metrics = train_step(state, place(local), *frozen)
      # This step starts when the one before it ends; a stop signal says how long they still need.
      step_seconds = finished[-1] - finished[-2] if len(finished) > 1 else estimate
      stop.busy_until = max(stop.busy_until or 0.0, time.perf_counter()) + step_seconds
      step += 1
      if job.after_step is not None:
        state = job.after_step(state, step)
      profiler.after_step(step, (state, step_metrics))
      window_tokens += job.tokens(local) * jax.process_count()
      tokens_run += job.tokens(local) * jax.process_count()
      if in_flight is not None:
        jax.block_until_ready(in_flight)
        finished.append(time.perf_counter())
        bar.update(1)
      in_flight = step_metrics["train_loss"]
      logged = step % config.log.every_steps == 0 or step == job.steps or step == first_step + 1
      evaluated = bool(t.eval_every and step % t.eval_every == 0 and step < job.steps)
      saving = bool(config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0 and step < job.steps)
      if t.nonfinite == "stop" and (logged or evaluated or saving):
        if int(step_metrics["skipped_steps"]) > skipped_before:
          stop.reason = "nonfinite"
          break
        checked_step = step
      if logged:
        step_metrics = jax.device_get(step_metrics)
        elapsed = time.perf_counter() - window_start
        tokens_per_sec = window_tokens / elapsed
        mfu = tokens_per_sec * job.flops_per_token / (peak_flops * n_devices)
        train_loss = float(step_metrics.pop("train_loss"))
        writer.write(step, train_loss=train_loss, **step_metrics, tokens_per_sec=tokens_per_sec, mfu=mfu)
        bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=metrics.format_count(tokens_per_sec), mfu=f"{mfu:.1%}")
        window_start, window_tokens = time.perf_counter(), 0  # the first window holds the compile: reset
      if evaluated:
        evaluation = evaluate(final=False)
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
        window_start, window_tokens = time.perf_counter(), 0
      if saving:
        save(evaluation.get("val_loss") if evaluated else None)
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
        f"non-finite loss or gradient at step {checked_step + 1}-{step} (train.nonfinite='stop'; non-finite steps "
        f"change nothing, so the state is finite); the state is saved in "
        f"{mngr.directory}/{step}. Lower train.learning_rate or check the data, then rerun to resume, or set "
        "train.nonfinite='skip' to skip such steps.")
  evaluation = evaluate(final=True)
  if mngr.latest_step() != step:
    save(evaluation.get("val_loss"))
  mngr.wait_until_finished()
  extra, samples = job.finish(state, step)
  # Tokens per step as run: the full windows of pretraining, the padded rows of fine-tuning (on average).
  tokens_per_step = tokens_run / (step - first_step) if step > first_step else tokens_per_step
  summary = summarize(
      step=step, steps_run=step - first_step, tokens_seen=round(step * tokens_per_step),
      wall_seconds=time.time() - start_time, step_seconds=np.diff(finished), tokens_per_step=tokens_per_step,
      flops_per_sec_at_peak=peak_flops * n_devices / job.flops_per_token, train_loss=train_loss,
      checkpoint=f"{mngr.directory}/{step}", stopped_by=stop.reason, **evaluation, **extra)
  log_summary(summary, workdir, evaluation)
  if stop.reason:
    log("stopped by %s at step %d of %d; the checkpoint %s/%d resumes it: rerun the same command.", stop.reason,
        step, job.steps, mngr.directory, step)
  mngr.close()
  writer.close()
  return RunInfo(step, train_loss, evaluation.get("val_loss", float("nan")),
                 evaluation.get("final_val_loss", float("nan")), stop.reason, samples, summary)


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


def log_summary(summary: dict, workdir: str, evaluation=()) -> None:
  """Prints the summary (with the `evaluation` metrics it holds) and writes it to <workdir>/summary.json."""
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
  if "val_batches" in s:
    evaluated = (f"val {fmt(s['val_loss'])} ({s['val_batches']} batches), {fmt(s['final_val_loss'])} "
                 f"({s['final_val_batches']} batches)")
  else:
    evaluated = ", ".join(f"{k} {fmt(s[k])}" for k in evaluation)
  log("loss: train %s | %s | checkpoint %s | summary %s", fmt(s["train_loss"]), evaluated, s["checkpoint"], path)
