"""Where a run's hours went: its wall time split into start-up, compile, steps, data waits, checkpoint saves and
evaluations, the steps computed again after a restart, and goodput (productive step time / wall time), for this
run and summed over every run of the same workdir (<workdir>/goodput.json, rewritten at each logged step so that a
killed run leaves its account up to then).

The times are host times around what the loop waits for: the first step's call (tracing and compiling), the next
batch, a save's blocking part, an evaluation (after the step before it has finished). "steps" is the rest of the
training loop: the device computing while the host dispatches. A restart recomputes the steps between the newest
checkpoint and the step the previous run had reached; their share of "steps" is not productive.
"""

import contextlib
import json
import os
import time

import jax

from gptjax import metrics, paths

PARTS = ("startup", "compile", "steps", "data", "checkpoints", "evaluations")
FILE = "goodput.json"


class TimeSplit:
  """This run's time by part, and the runs of the workdir before it."""

  def __init__(self, workdir: str, start_time: float, first_step: int):
    self.path = os.path.join(workdir, FILE)
    self.start_time, self.first_step = start_time, first_step
    self.seconds = dict.fromkeys(PARTS, 0.0)
    self.earlier = paths.read_json(self.path)["runs"] if paths.path(self.path).exists() else []
    # The steps this run computes again: the previous run reached past the checkpoint this one starts from (its
    # last logged step, or what it last wrote here).
    reached = max([r["reached_step"] for r in self.earlier[-1:]] + [_last_logged_step(workdir)])
    self.lost_steps = max(0, reached - first_step)
    self.step_count, self.reached_step = 0, first_step
    self.saved_at = None

  @contextlib.contextmanager
  def timing(self, part: str):
    """Counts the block's wall time to `part` (nested blocks count to the innermost only)."""
    start = time.perf_counter()
    outer = self.seconds.copy()
    try:
      yield
    finally:
      inner = sum(self.seconds.values()) - sum(outer.values())
      self.seconds[part] += time.perf_counter() - start - inner

  def steps_done(self, step: int) -> None:
    self.step_count, self.reached_step = step - self.first_step, step

  def account(self) -> dict:
    """This run's account so far: wall seconds, the parts, recomputed seconds, goodput."""
    wall = time.time() - self.start_time
    seconds = dict(self.seconds)
    seconds["other"] = max(0.0, wall - sum(seconds.values()))
    # The steps run again after a restart are the first `lost_steps` of this run: their share of its step time.
    recomputed = seconds["steps"] * min(1.0, self.lost_steps / self.step_count) if self.step_count else 0.0
    return {"start_step": self.first_step, "reached_step": self.reached_step, "wall_seconds": wall,
            "seconds": seconds, "recomputed_seconds": recomputed, "recomputed_steps": min(self.lost_steps,
                                                                                           self.step_count),
            "goodput": (seconds["steps"] - recomputed) / wall if wall > 0 else None}

  def save(self, at_most_every: float = 0.0) -> dict | None:
    """Writes the workdir's runs with this one's account (process 0); returns {'this_run', 'all_runs'}. With
    `at_most_every` (seconds), nothing happens that soon after the last write (None)."""
    now = time.perf_counter()
    if at_most_every and self.saved_at is not None and now - self.saved_at < at_most_every:
      return None
    self.saved_at = now
    runs = self.earlier + [self.account()]
    if jax.process_index() == 0:
      paths.write_json(self.path, {"runs": runs})
    return {"this_run": runs[-1], "all_runs": total(runs)}


def _last_logged_step(workdir: str) -> int:
  """The last step in <workdir>/metrics.jsonl (0 when there is none)."""
  path = paths.path(os.path.join(workdir, "metrics.jsonl"))
  if not path.exists():
    return 0
  steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip().startswith("{")]
  return max(steps, default=0)


def total(runs: list[dict]) -> dict:
  """The runs of a workdir added up."""
  wall = sum(r["wall_seconds"] for r in runs)
  seconds = {part: sum(r["seconds"].get(part, 0.0) for r in runs) for part in (*PARTS, "other")}
  recomputed = sum(r["recomputed_seconds"] for r in runs)
  return {"runs": len(runs), "wall_seconds": wall, "seconds": seconds, "recomputed_seconds": recomputed,
          "recomputed_steps": sum(r["recomputed_steps"] for r in runs),
          "goodput": (seconds["steps"] - recomputed) / wall if wall > 0 else None}


def describe(split: dict) -> str:
  """One line: 'time: 5m03s = steps 4m10s (82%), compile 12s, ... | goodput 80% (3 runs: 75%)'."""
  run, runs = split["this_run"], split["all_runs"]
  wall = run["wall_seconds"]
  parts = [f"{part} {metrics.format_duration(s)} ({s / wall:.0%})" for part, s in run["seconds"].items() if s >= 0.005]
  recomputed = (f", of which recomputed after a restart {metrics.format_duration(run['recomputed_seconds'])} "
                f"({run['recomputed_steps']} steps)" if run["recomputed_steps"] else "")
  line = f"time: {metrics.format_duration(wall)} = {', '.join(parts)}{recomputed} | goodput {run['goodput']:.0%}"
  if runs["runs"] > 1:
    line += (f" ({runs['runs']} runs of this workdir: {metrics.format_duration(runs['wall_seconds'])}, goodput "
             f"{runs['goodput']:.0%})")
  return line
