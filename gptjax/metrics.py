"""Metric writers (JSONL, TensorBoard, optionally Weights & Biases), peak FLOP/s and MFU, progress."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

# Dense bf16 peak FLOP/s per chip by device kind (vendor figures, no sparsity).
_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
}


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
  for name, flops in _PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops, f"{kind} bf16 peak"
  return measure_matmul_flops(), f"{kind} measured fp32 matmul"


class MetricsWriter:
  """Writes one JSON object per line to <workdir>/metrics.jsonl, and TensorBoard/W&B scalars; process 0 only."""

  def __init__(self, workdir: str, config=None, tensorboard: bool = True, wandb: bool = False):
    self.active = jax.process_index() == 0
    self._tb = self._wandb = self._file = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if wandb:
      try:
        import wandb as wandb_lib
      except ImportError:
        logging.warning("log.wandb=True but wandb is not installed (pip install wandb); skipping W&B.")
      else:
        self._wandb = wandb_lib.init(project=config.log.wandb_project, config=config.to_dict(), dir=workdir)

  def write(self, step: int, **scalars) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for key, value in row.items():
      if key != "step" and self._tb is not None:
        self._tb.add_scalar(key, value, step)
    if self._wandb is not None:
      self._wandb.log(row, step=step)

  def close(self) -> None:
    if self._file:
      self._file.close()
    if self._tb:
      self._tb.close()
    if self._wandb:
      self._wandb.finish()


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


def peak_memory_bytes() -> int:
  """Peak bytes in use on device 0 when the backend reports it, else this process's peak RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  import resource
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def median(values) -> float:
  return float(np.median(np.asarray(values)))
