"""Shared by the benchmark scripts: timing and the JSON-last-line report."""

import json
import time

import numpy as np


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


def report(rows: list[tuple[str, str]], result: dict) -> None:
  """Prints a readable two-column table, then the numbers as one JSON object on the last line."""
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f"{key:<{width}}  {value}")
  print(json.dumps(result, default=lambda x: float(np.asarray(x))))
