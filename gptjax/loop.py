"""The training loop: data, sharded state, jitted steps, metrics, validation, checkpoints, samples."""

import contextlib
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

from gptjax import checkpoint, config as config_lib, errors, goodput, metrics, paths, pretrain, sharding, train
from gptjax.job import Job, log


ASSUMED_MFU = 0.4  # for the pre-training time estimate only; measured MFU is logged every log.every_steps
LONG_RUN_SECONDS = 24 * 3600  # an estimate above this gets a warning with faster alternatives


class Interrupted(Exception):
  """A stop signal during a part of the run that it cuts short (the final evaluation)."""


class StopFlag:
  """Set by SIGINT/SIGTERM (e.g. a TPU preemption notice); the loop stops after the current step."""

  def __init__(self):
    self.reason = None
    self.busy_until = None  # time.perf_counter() when the steps already dispatched should be done (set by the loop)
    self._previous = {}
    self._interruptible = False

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self._interruptible:
      self.reason = self.reason or name
      raise Interrupted(f"{name} received")
    if self.reason is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C means "now"
    self.reason = name
    seconds_left = None if self.busy_until is None else self.busy_until - time.perf_counter()
    logging.warning("%s", stop_message(self.reason, seconds_left))

  @contextlib.contextmanager
  def interruptible(self):
    """A block that a stop signal ends at once with `Interrupted` (the checkpoint is already safe)."""
    self._interruptible = True
    try:
      yield
    finally:
      self._interruptible = False

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
  """Trains `config` in `workdir`: pretraining, or fine-tuning when the config has a `task` section.

  The steps, in order: validate the whole config (one error before any work); build the job; resume from the
  newest readable checkpoint or start at step 0; train, with the periodic actions (log, evaluate, save) after each
  step, until the last step or a stop (signal, train.max_seconds, a non-finite step); save; evaluate; summarize.
  """
  start_time = time.time()
  validate(config, jax.device_count())
  paths.makedirs(workdir)
  mesh = sharding.make_mesh(config)
  mngr = checkpoint.manager(workdir, config, *ranking(config))
  job = build_job(config, workdir, mesh, resuming=bool(mngr.all_steps()))
  state, resumed_step = checkpoint.restore_latest(mngr, job.abstract, job.shardings, job.batches, job.tokenizer)
  if state is not None:
    log("resumed from %s/%d", mngr.directory, resumed_step)
  else:
    state = job.init_state()
  trainer = Trainer(job, mesh, mngr, workdir, state)
  with StopFlag() as stop:
    trainer.train(stop, start_time)
    return trainer.finish(stop, start_time)


def validate(config, n_devices: int) -> None:
  """Every section of the config, pretraining's and a task's, checked before anything is loaded or computed."""
  config_lib.validate(config, n_devices)
  if "task" in config:
    from gptjax.finetune import tasks  # pylint: disable=import-outside-toplevel
    tasks.validate(config, n_devices)
  if config.eval.harness_every:
    if "task" in config and not tasks.is_language_model(config.task):
      raise config_lib.ConfigError(f"eval.harness_tasks: a {config.task.kind} model is not a language model; the "
                                   "harness runs during pretraining and SFT only (set eval.harness_every=0).")
    try:
      from gptjax import harness  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise config_lib.ConfigError(f"eval.harness_tasks needs lm-evaluation-harness ({e}): pip install "
                                   "'gptjax[eval]'.") from e
    harness.load_tasks(config_lib.harness_tasks(config), config.eval.harness_include_path or None)


def ranking(config) -> tuple[str, bool]:
  """(metric, higher is better) that checkpoint.keep_best ranks checkpoints by: the validation loss, or for a task
  its first headline metric (accuracy, entity F1, SFT eval loss)."""
  if "task" not in config:
    return "val_loss", False
  from gptjax.finetune import tasks  # pylint: disable=import-outside-toplevel
  return tasks.ranking(config.task)


def build_job(config, workdir: str, mesh, resuming: bool) -> Job:
  if "task" in config:
    from gptjax.finetune import job as finetune_job  # pylint: disable=import-outside-toplevel
    return finetune_job.build(config, workdir, mesh, resuming)
  return pretrain.build(config, workdir, mesh, resuming)


@dataclasses.dataclass
class Throughput:
  """Tokens and clock: the window since the last log line (tokens/s, MFU) and this run's steps (the summary)."""
  flops_per_token: float
  peak_flops: float  # of all devices together
  finished: list = dataclasses.field(default_factory=list)  # perf_counter() as each step finishes (1st: compile)
  window_start: float = dataclasses.field(default_factory=time.perf_counter)
  window_tokens: int = 0
  run_tokens: int = 0

  def add(self, tokens: int) -> None:
    self.window_tokens += tokens
    self.run_tokens += tokens

  def step_finished(self) -> None:
    self.finished.append(time.perf_counter())

  def last_step_seconds(self) -> float | None:
    return self.finished[-1] - self.finished[-2] if len(self.finished) > 1 else None

  def window(self) -> tuple[float, float]:
    """(tokens/s, MFU) since the window started; starts a new window."""
    tokens_per_sec = self.window_tokens / (time.perf_counter() - self.window_start)
    self.restart_window()
    return tokens_per_sec, tokens_per_sec * self.flops_per_token / self.peak_flops

  def restart_window(self) -> None:
    """After a compile or an evaluation, which are not training speed."""
    self.window_start, self.window_tokens = time.perf_counter(), 0


class Trainer:
  """One run of a Job from a train state: the steps, the periodic actions after them, and the end."""

  def __init__(self, job: Job, mesh, mngr, workdir: str, state: dict):
    self.job, self.mngr, self.workdir, self.state = job, mngr, workdir, state
    self.config = config = job.config
    self.step = self.first_step = int(state["step"])
    n_devices = jax.device_count()
    self.accum = config_lib.grad_accum_steps(config, n_devices)
    peak_flops, peak_source = metrics.peak_flops_per_device()
    self.throughput = Throughput(job.flops_per_token, peak_flops * n_devices)
    self.estimate = self._announce(mesh, peak_flops, peak_source)
    self.train_step = train.make_train_step(job.graphdef, job.tx, config, job.shardings, mesh, job.objective,
                                            job.frozen_shardings, job.use_dropout)
    self.frozen = () if job.frozen is None else (job.frozen,)
    self.batch_placement = sharding.batch_sharding(mesh, config.mesh.rules, ndim=2, batch_dim=1)
    self.writer = metrics.MetricsWriter(workdir, config, config.log.tensorboard, config.log.wandb)
    self.profiler = metrics.StepProfiler(config_lib.profile_range(config), os.path.join(workdir, "profile"))
    self.bar = tqdm(total=job.steps, initial=self.first_step, desc="train", unit="step", dynamic_ncols=True,
                    disable=jax.process_index() != 0)
    self.train_loss, self.evaluation = float("nan"), {}
    self.in_flight = None  # the last step's loss: the bar counts finished steps, one step stays queued behind
    # train.nonfinite='stop' reads the state's count of skipped (non-finite) steps only where the loop waits for
    # the device anyway: a step that is not finite leaves the state as it was, so the steps up to the next such
    # point continue from a finite state, and no checkpoint is written before the check.
    self.skipped_before, self.checked_step = int(state["skipped"]), self.first_step

  def _announce(self, mesh, peak_flops: float, peak_source: str) -> float:
    """Logs the devices, the job and the time it should take; returns the estimated seconds per step."""
    job, n_devices = self.job, jax.device_count()
    log("devices: %d x %s (%d processes) | mesh %s | peak %s FLOP/s/device (%s)", n_devices,
        jax.devices()[0].device_kind, jax.process_count(), dict(mesh.shape), metrics.format_count(peak_flops),
        peak_source)
    for line in job.description:
      log("%s", line)
    # Until the first steps are measured (one GPT-2 small step takes ~30 min on a CPU) the bar has no rate.
    estimate = (self.config.train.batch_size * job.model_cfg.block_size * job.flops_per_token /
                (peak_flops * n_devices * ASSUMED_MFU))
    steps = job.steps - self.first_step
    log("estimate before measuring: %s/step at %.0f%% MFU -> %s for %d steps; the bar shows measured rates",
        metrics.format_duration(estimate), 100 * ASSUMED_MFU, metrics.format_duration(estimate * steps), steps)
    warning = long_run_warning(estimate, steps, f"{n_devices} x {jax.devices()[0].device_kind}")
    if warning and jax.process_index() == 0:
      print(warning, file=sys.stderr, flush=True)
    return estimate

  def train(self, stop: StopFlag, start_time: float) -> None:
    """Steps until the job's last step or a stop; after each, the actions due at it."""
    self.time = goodput.TimeSplit(self.workdir, start_time, self.first_step)
    self.time.seconds["startup"] = time.time() - start_time
    with self.time.timing("steps"):  # what the parts below do not claim
      self._train(stop, start_time)

  def _train(self, stop: StopFlag, start_time: float) -> None:
    t, every = self.config.train, self.config.log.every_steps
    # Multi-host runs agree on stopping at logging steps, where the loop waits for the device anyway.
    while self.step < self.job.steps and not stop.should_stop(self.step % every == 0):
      step_metrics = self._dispatch_step(stop)
      logged = self.step % every == 0 or self.step == self.job.steps or self.step == self.first_step + 1
      evaluated = self._due(t.eval_every)
      # checkpoint.keep_best ranks checkpoints by their evaluation: each evaluated step is saved too.
      saving = self._due(self.config.checkpoint.every_steps) or (evaluated and self.config.checkpoint.keep_best > 0)
      if logged or evaluated or saving:
        if t.nonfinite == "stop" and int(step_metrics["skipped_steps"]) > self.skipped_before:
          stop.reason = "nonfinite"
          return
        if t.spike_skip and int(step_metrics["spikes_in_row"]) >= t.spike_max_in_row:
          stop.reason = "spikes"
          return
        self.checked_step = self.step
      if logged:
        self._log(step_metrics)
      if evaluated:
        with self._timed("evaluations"):
          self.evaluation = self._evaluate(final=False)
        self.bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.evaluation.items()))
        self.throughput.restart_window()
      if self._due(self.config.eval.harness_every) and not self._harness(stop):
        return  # a stop signal cut it short: the checkpoint is saved next (finish)
      if saving:
        self._save(self.evaluation if evaluated else None)
      if t.max_seconds and time.time() - start_time > t.max_seconds:
        stop.reason = f"train.max_seconds={t.max_seconds}"

  @contextlib.contextmanager
  def _timed(self, part: str):
    """A block that needs the latest step's state, timed as `part` once that step has finished (its compute is
    step time)."""
    jax.block_until_ready(self.state)
    with self.time.timing(part):
      yield

  def _due(self, every: int) -> bool:
    """Whether an action run every `every` steps (0 = never) is due after this step; the end has its own."""
    return bool(every and self.step % every == 0 and self.step < self.job.steps)

  def _dispatch_step(self, stop: StopFlag) -> dict:
    """Queues the next step on the device and returns its (not yet computed) metrics; waits for the step before."""
    self.profiler.before_step(self.step + 1, self.state)
    with jax.profiler.StepTraceAnnotation("train", step_num=self.step + 1):
      with self.time.timing("data"):
        local = next(self.job.batches)
      # The first call traces and compiles before it queues the step.
      with self.time.timing("compile") if self.step == self.first_step else contextlib.nullcontext():
        self.state, step_metrics = self.train_step(self.state, self._place(local), *self.frozen)
    # This step starts when the one before it ends; a stop signal says how long they still need.
    step_seconds = self.throughput.last_step_seconds() or self.estimate
    stop.busy_until = max(stop.busy_until or 0.0, time.perf_counter()) + step_seconds
    self.step += 1
    self.time.steps_done(self.step)
    self.profiler.after_step(self.step, (self.state, step_metrics))
    self.throughput.add(self.job.tokens(local))
    self._wait_for_previous_step()
    self.in_flight = step_metrics["train_loss"]
    return step_metrics

  def _place(self, local):
    """This process's batch [B_local, ...] as the global [accum, B, ...] (micro-batches on the leading axis)."""
    return jax.tree.map(lambda x: sharding.global_batch(x.reshape(self.accum, x.shape[0] // self.accum, *x.shape[1:]),
                                                        self.batch_placement, batch_dim=1), local)

  def _wait_for_previous_step(self) -> None:
    if self.in_flight is not None:
      jax.block_until_ready(self.in_flight)
      self.throughput.step_finished()
      self.bar.update(1)

  def _log(self, step_metrics) -> None:
    step_metrics = jax.device_get(step_metrics)
    tokens_per_sec, mfu = self.throughput.window()  # the first window holds the compile
    self.train_loss = float(step_metrics.pop("train_loss"))
    self.writer.write(self.step, train_loss=self.train_loss, **step_metrics, tokens_per_sec=tokens_per_sec, mfu=mfu)
    self.bar.set_postfix(loss=f"{self.train_loss:.4f}", tok_s=metrics.format_count(tokens_per_sec), mfu=f"{mfu:.1%}")
    self.time.save(at_most_every=60)

  def _evaluate(self, final: bool) -> dict:
    results = self.job.evaluate(self.state["params"], final)
    if final and self.config.eval.harness_every:
      results.update(self._harness_results())
    self.writer.write(self.step, **results)
    return results

  def _harness_results(self) -> dict:
    """eval.harness_tasks on the live parameters (where they are placed): {'harness/<task>/<metric>': value}."""
    from gptjax import harness  # pylint: disable=import-outside-toplevel
    e = self.config.eval
    params, graphdef = self.job.language_model(self.state["params"])
    lm = harness.GptjaxLM(params, graphdef, self.job.tokenizer, e.harness_batch_size, self.config.mesh.rules,
                          progress=False)
    results = harness.run_tasks(lm, config_lib.harness_tasks(self.config), limit=e.harness_limit or None,
                                include_path=e.harness_include_path or None, bootstrap_iters=0)
    return {f"harness/{k}": v for k, v in harness.headline(results).items()}

  def _harness(self, stop: StopFlag) -> bool:
    """Runs and logs the harness tasks after this step; False when a stop signal cut them short."""
    try:
      with stop.interruptible(), self._timed("evaluations"):
        results = self._harness_results()
    except Interrupted as e:
      log("harness evaluation at step %d skipped: %s; saving the checkpoint", self.step, e)
      return False
    self.writer.write(self.step, **results)
    self.bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    self.throughput.restart_window()
    return True

  def _save(self, evaluation: dict | None) -> None:
    with self._timed("checkpoints"):
      checkpoint.save(self.mngr, self.step, self.state, self.job.batches, self.config, self.job.tokenizer,
                      evaluation)
    self.time.save()  # a run killed later leaves its account up to this checkpoint

  def _wait_for_saves(self) -> None:
    with self.time.timing("checkpoints"):
      self.mngr.wait_until_finished()

  def finish(self, stop: StopFlag, start_time: float) -> RunInfo:
    """The last step's checkpoint and the final evaluation, then the summary.

    After a stop the checkpoint comes first: a preemption's grace period may end during an evaluation (a second
    signal skips it), and the steps since the last checkpoint must not be lost with it. A run that reached its
    last step evaluates first, so the checkpoint is ranked by the final metrics (checkpoint.keep_best).
    """
    self.profiler.stop(self.state)
    if self.in_flight is not None:  # the last step's loss, also when the run stopped between logged steps
      self._wait_for_previous_step()
      self.train_loss = float(self.in_flight)
    self.bar.close()
    if stop.reason == "nonfinite":
      self._save(None)  # the step left parameters and optimizer state as they were: this is the last good state
      self._wait_for_saves()
      raise errors.Diverged(
          f"non-finite loss or gradient at step {self.checked_step + 1}-{self.step} (train.nonfinite='stop'; "
          f"non-finite steps change nothing, so the state is finite); the state is saved in "
          f"{self.mngr.directory}/{self.step}. Lower train.learning_rate or check the data, then rerun to resume, "
          "or set train.nonfinite='skip' to skip such steps.")
    if stop.reason == "spikes":
      self._save(None)  # spikes change nothing either: the state is the one before them
      self._wait_for_saves()
      t = self.config.train
      raise errors.Diverged(
          f"{t.spike_max_in_row} loss spikes in a row by step {self.step} (loss or gradient norm above "
          f"train.spike_skip={t.spike_skip} times its median over {t.spike_window} steps; skipped, so the state is "
          f"the one before them); saved in {self.mngr.directory}/{self.step}. Lower train.learning_rate or check "
          "the data at these steps, or raise train.spike_skip / train.spike_max_in_row, then rerun to resume.")
    if stop.reason and self.mngr.latest_step() != self.step:
      self._save(None)
      self._wait_for_saves()
      log("stopped by %s at step %d: checkpoint %s/%d saved; now the final evaluation (a second signal skips it)",
          stop.reason, self.step, self.mngr.directory, self.step)
    evaluation, final_eval = self._final_evaluation(stop)
    if self.mngr.latest_step() != self.step:
      self._save(evaluation or None)
    self._wait_for_saves()
    with self.time.timing("evaluations"):  # the task's report, the samples
      extra, samples = self.job.finish(self.state, self.step) if evaluation else ({}, [])
    steps_run = self.step - self.first_step
    # Tokens per step as run: the full windows of pretraining, the padded rows of fine-tuning (on average).
    tokens_per_step = (self.throughput.run_tokens / steps_run if steps_run else
                       self.config.train.batch_size * self.job.model_cfg.block_size)
    summary = summarize(
        step=self.step, steps_run=steps_run, tokens_seen=round(self.step * tokens_per_step),
        wall_seconds=time.time() - start_time, step_seconds=np.diff(self.throughput.finished),
        tokens_per_step=tokens_per_step, flops_per_sec_at_peak=self.throughput.peak_flops / self.job.flops_per_token,
        train_loss=self.train_loss, checkpoint=f"{self.mngr.directory}/{self.step}", stopped_by=stop.reason,
        final_evaluation=final_eval, time=self.time.save(), **evaluation, **extra)
    log_summary(summary, self.workdir, evaluation)
    if stop.reason:
      log("stopped by %s at step %d of %d; the checkpoint %s/%d resumes it: rerun the same command.", stop.reason,
          self.step, self.job.steps, self.mngr.directory, self.step)
    self.mngr.close()
    self.writer.close()
    return RunInfo(self.step, self.train_loss, evaluation.get("val_loss", float("nan")),
                   evaluation.get("final_val_loss", float("nan")), stop.reason, samples, summary)

  def _final_evaluation(self, stop: StopFlag) -> tuple[dict, str]:
    """(metrics, 'done') of the final evaluation, or ({}, why it was skipped) when a signal interrupted it."""
    try:
      with stop.interruptible(), self._timed("evaluations"):
        return self._evaluate(final=True), "done"
    except Interrupted as e:
      log("final evaluation skipped: %s", e)
      return {}, f"skipped: {e}"


def summarize(step_seconds, tokens_per_step, flops_per_sec_at_peak, **fields) -> dict:
  """The end-of-run summary: `fields`, this run's median step time, its tokens/s and MFU, peak memory.

  Step times are the intervals between finished steps, so the first step's compile is left out; None when the
  run finished fewer than two steps. `flops_per_sec_at_peak` is tokens/s at 100% MFU.
  """
  median_step = float(np.median(step_seconds)) if len(step_seconds) else None
  tokens_per_sec = tokens_per_step / median_step if median_step else None
  finite = lambda x: x if x is None or np.isfinite(x) else None  # JSON has no NaN
  summary = dict(fields, tokens_per_step=tokens_per_step, median_step_seconds=median_step,
                 tokens_per_sec=tokens_per_sec,
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
    evaluated = f"val {fmt(s['val_loss'])} ({s['val_batches']} batches)"
    if s["final_val_batches"] != s["val_batches"]:  # the final evaluation's own, larger one
      evaluated += f", {fmt(s['final_val_loss'])} ({s['final_val_batches']} batches)"
  else:
    evaluated = ", ".join(f"{k} {fmt(s[k])}" for k in evaluation)
  log("loss: train %s | %s | checkpoint %s | summary %s", fmt(s["train_loss"]), evaluated, s["checkpoint"], path)
  if "time" in s:
    log("%s", goodput.describe(s["time"]))
