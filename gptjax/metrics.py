"""Metric writers (JSONL, TensorBoard, optionally Weights & Biases), peak FLOP/s and MFU, progress, profiling."""

import concurrent.futures
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import logging

from gptjax import paths, tpu

# Dense bf16 peak FLOP/s of NVIDIA GPUs by a part of their device kind (vendor figures, no sparsity); TPU chips
# have theirs in gptjax.tpu.CHIPS.
_GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """Best observed FLOP/s of an n x n x n matmul on the default device: the honest ceiling on a CPU."""
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops_per_device() -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from): vendor peak on TPU/GPU, measured on CPU."""
  kind = jax.devices()[0].device_kind
  chip = tpu.chip_of(kind)
  if chip is not None:
    return chip.bf16_flops, f"{kind} bf16 peak"
  for name, flops in _GPU_PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops, f"{kind} bf16 peak"
  return measure_matmul_flops(), f"{kind} measured fp32 matmul"


class MetricsWriter:
  """Writes one JSON object per line to <workdir>/metrics.jsonl, and TensorBoard/W&B scalars; process 0 only."""

  def __init__(self, workdir: str, config=None, tensorboard: bool = True, wandb: bool = False):
    self.active = jax.process_index() == 0
    self._tb = self._wandb = self._file = self._tb_pending = None
    if not self.active:
      return
    paths.makedirs(workdir)
    self._file = paths.open_append(os.path.join(workdir, "metrics.jsonl"))
    if tensorboard:
      # Importing tensorboardX takes ~2 s where torch is installed (it imports torch): a thread does it while the
      # run compiles; the first write waits for it.
      self._tb_pending = concurrent.futures.ThreadPoolExecutor(1).submit(
          _summary_writer, os.path.join(workdir, "tensorboard"))
    if wandb:
      try:
        import wandb as wandb_lib
      except ImportError:
        logging.warning("log.wandb=True but wandb is not installed (pip install wandb); skipping W&B.")
      else:
        # wandb stages its files in a local folder before it syncs them.
        self._wandb = wandb_lib.init(project=config.log.wandb_project, config=config.to_dict(),
                                     dir=paths.cache_dir() if paths.is_remote(workdir) else workdir)

  def _tensorboard(self):
    if self._tb_pending is not None:
      self._tb, self._tb_pending = self._tb_pending.result(), None
    return self._tb

  def write(self, step: int, **scalars) -> None:
    if not self.active:
      return
    tb = self._tensorboard()
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write((json.dumps(row) + "\n").encode())
    self._file.flush()
    for key, value in row.items():
      if key != "step" and tb is not None:
        tb.add_scalar(key, value, step)
    if self._wandb is not None:
      self._wandb.log(row, step=step)

  def close(self) -> None:
    if self._file:
      self._file.close()
    if self._tensorboard():
      self._tb.close()
    if self._wandb:
      self._wandb.finish()


def _summary_writer(directory: str):
  """A tensorboardX SummaryWriter into `directory`; URLs are written through gptjax.paths (as every file is)."""
  from tensorboardX import SummaryWriter, record_writer  # pylint: disable=import-outside-toplevel
  if paths.is_remote(directory):
    # tensorboardX's own gs:// writer needs google-cloud-storage and credentials of its own: use ours instead.
    record_writer.register_writer_factory(directory.split(":", 1)[0], _EventsFiles())
  return SummaryWriter(directory)


class _EventsFiles:
  """tensorboardX's writer factory for URLs: an events file is an object uploaded whole (paths.open_append)."""

  def open(self, path: str):
    return paths.open_append(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no directories to create


def format_count(n: float) -> str:
  """1234567 -> '1.23M'."""
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"


def format_duration(seconds: float) -> str:
  """3725 -> '1h02m', 75 -> '1m15s', 0.25 -> '0.25s'."""
  if seconds < 60:
    return f"{seconds:.3g}s"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  days, hours = divmod(hours, 24)
  if days:
    return f"{days}d{hours:02d}h"
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def device_peak_memory_bytes() -> int | None:
  """The largest peak bytes in use over this process's devices; None where the backend reports none (CPU)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [int(p) for p in peaks if p is not None]
  return max(peaks) if peaks else None


def host_peak_memory_bytes() -> int:
  """This process's peak resident memory (what CPU "devices" use)."""
  import resource
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_memory_bytes() -> int:
  """Peak bytes in use on a device when the backend reports it, else this process's peak RSS."""
  device = device_peak_memory_bytes()
  return host_peak_memory_bytes() if device is None else device


class StepProfiler:
  """A jax.profiler trace of optimizer steps first..last (both included) into `directory`, on process 0.

  The steps are dispatched asynchronously: the trace starts once the steps before `first` have finished and
  stops once step `last` has, so it holds exactly the chosen steps.
  """

  def __init__(self, steps: tuple[int, int] | None, directory: str):
    self.steps = steps if jax.process_index() == 0 else None
    self.directory = directory
    self.tracing = False
    self._trace_dir = directory

  def before_step(self, step: int, pending) -> None:
    """Called before step `step` is dispatched; `pending` holds the outputs of the steps before it."""
    if self.steps and not self.tracing and self.steps[0] <= step <= self.steps[1]:
      jax.block_until_ready(pending)
      # JAX writes traces through its own file system layer: a remote directory gets them once the trace ends.
      remote = paths.is_remote(self.directory)
      self._trace_dir = tempfile.mkdtemp(prefix="gptjax-profile-") if remote else self.directory
      jax.profiler.start_trace(self._trace_dir)
      self.tracing = True

  def after_step(self, step: int, outputs) -> None:
    """Called after step `step` is dispatched with its outputs; ends the trace after the last step."""
    if self.tracing and step >= self.steps[1]:
      self.stop(outputs)

  def stop(self, outputs) -> None:
    """Ends a running trace (also when the loop stops early) once `outputs` are computed."""
    if self.tracing:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      if self._trace_dir != self.directory:
        paths.upload_dir(self._trace_dir, self.directory)
        shutil.rmtree(self._trace_dir)
      self.tracing = False
      logging.info("profile of steps %d..%d written to %s", *self.steps, self.directory)

