"""Shared by the benchmark scripts: timing, the machine they ran on, and the JSON-last-line report."""

import functools
import json
import os
import platform
import time

import numpy as np

# The ISA extensions that decide CPU matmul speed on our machine kind (AMD EPYC: avx2/avx512f; Intel Xeon: + AMX).
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def time_calls(fn, repeats: int) -> list[float]:
  """Wall seconds of each of `repeats` calls of fn() (fn must block until its work is done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def median(values) -> float:
  return float(np.median(np.asarray(values)))


@functools.cache
def machine() -> dict:
  """The CPU model, its ISA flags that matter, the XLA flags in force and the measured fp32/bf16 matmul ceilings.

  Timings differ several-fold between the CPU models of one machine kind, so every number is printed beside these.
  """
  import jax
  import jax.numpy as jnp
  from gptjax import metrics
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:  # a fixed system file, not a user path
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  info = {"cpu": model, "cores": os.cpu_count(), "isa": [f for f in _ISA_FLAGS if f in flags],
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind}
  for dtype in (jnp.float32, jnp.bfloat16):
    info[f"matmul_{jnp.dtype(dtype).name}_gflops"] = round(metrics.measure_matmul_flops(dtype=dtype) / 1e9, 1)
  return info


def stream_gbs(mib: int = 256, repeats: int = 5) -> float:
  """Memory bandwidth in GB/s of a jitted STREAM triad a = b + 3c over float32 arrays of `mib` MiB each (reads b
  and c, writes a): the most a memory-bound loop such as batch-1 decoding can read on this machine."""
  import jax
  import jax.numpy as jnp
  n = mib * 2**20 // 4
  arrays = {"b": jnp.ones((n,), jnp.float32), "c": jnp.full((n,), 2.0, jnp.float32)}
  # In place (donated b): a fresh output buffer would time the OS's first touch of its pages (5x less).
  triad = jax.jit(lambda b, c: b + 3.0 * c, donate_argnums=0)

  def call():
    arrays["b"] = triad(arrays["b"], arrays["c"]).block_until_ready()
  call()
  return 3 * n * 4 / min(time_calls(call, repeats)) / 1e9


def read_gbs(mib: int = 1024, repeats: int = 5) -> float:
  """Read-only memory bandwidth in GB/s: a jitted sum over a float32 array of `mib` MiB (what a matrix-vector
  product that streams its matrix needs; a triad also writes, which can count for more or less than a read)."""
  import jax
  import jax.numpy as jnp
  array = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(array).block_until_ready()
  return mib * 2**20 / min(time_calls(lambda: total(array).block_until_ready(), repeats)) / 1e9


def machine_rows() -> list[tuple[str, str]]:
  """`machine()` as table rows."""
  m = machine()
  return [("machine", f"{m['cpu']} ({m['cores']} cores; {' '.join(m['isa']) or 'no avx2'}) | {m['backend']} "
                      f"{m['device']}"),
          ("XLA_FLAGS", m["xla_flags"] or "(none)"),
          ("matmul ceiling 2048^3", f"fp32 {m['matmul_float32_gflops']:.0f} GFLOP/s, "
                                    f"bf16 {m['matmul_bfloat16_gflops']:.0f} GFLOP/s")]


def report(rows: list[tuple[str, str]], result: dict) -> None:
  """Prints the machine, a readable two-column table, then the numbers (with the machine) as one JSON object."""
  rows = machine_rows() + list(rows)
  result = dict(result, machine=machine())
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f"{key:<{width}}  {value}")
  print(json.dumps(result, default=lambda x: float(np.asarray(x))))
