"""Draws a run's loss curve from its metrics.jsonl: `python -m gptjax.plot --workdir=runs/quickstart [--out=loss.png]`.

Train and validation loss against optimizer steps, with the tokens seen on a second x axis when the run's tokens
per step are known (its summary.json, written when a pretraining run ends or stops), and below them the harness
metrics the run logged (eval.harness_tasks: e.g. harness/hellaswag/acc_norm). Writes <workdir>/loss.png unless
--out says otherwise; the workdir and --out may be gs:// URLs.
"""

import json

from absl import flags
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from gptjax import cli, paths
from gptjax.errors import UserError

# The series drawn: metrics.jsonl key -> line style.
SERIES = {"train_loss": dict(label="train", linewidth=1.2),
          "val_loss": dict(label="validation", marker="o", markersize=4)}


class MetricsError(UserError, ValueError):
  """A metrics file that cannot be plotted; the message names the file and the fix."""


def read_metrics(workdir: str) -> list[dict]:
  """The rows of <workdir>/metrics.jsonl, one dict per line."""
  file = paths.join(workdir, "metrics.jsonl")
  if not paths.is_file(file):
    raise MetricsError(f"{file} does not exist: --workdir must be a run directory of python -m gptjax.main, which "
                       "writes it from the first logged step on.")
  rows = []
  for number, line in enumerate(paths.path(file).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise MetricsError(f"{file}, line {number}: not a JSON object ({e}); delete the line to plot the rest.") from e
  return rows


def loss_series(rows: list[dict], names=tuple(SERIES)) -> dict[str, tuple[list[int], list[float]]]:
  """{'train_loss': (steps, losses), 'val_loss': (steps, losses)} (or the series `names`), by step.

  A resumed run logs again the steps after its checkpoint: the last value written for a step is the one kept.
  """
  series = {}
  for name in names:
    by_step = {int(r["step"]): float(r[name]) for r in rows if name in r}
    steps = sorted(by_step)
    series[name] = (steps, [by_step[s] for s in steps])
  return series


def harness_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
  """The harness metrics a run logged (keys 'harness/<task>/<metric>'), by step."""
  return loss_series(rows, sorted({k for r in rows for k in r if k.startswith("harness/")}))


def tokens_per_step(workdir: str) -> int | None:
  """Tokens per optimizer step from <workdir>/summary.json; None when the run has not written one (yet)."""
  file = paths.join(workdir, "summary.json")
  summary = paths.read_json(file) if paths.is_file(file) else {}
  # A pretraining summary counts tokens_seen = step x tokens per step; a fine-tuning one counts examples.
  return summary["tokens_seen"] // summary["step"] if summary.get("tokens_seen") and summary.get("step") else None


def figure(workdir: str) -> Figure:
  """The loss curve of the run in `workdir` as a matplotlib Figure (no pyplot: nothing global, no display)."""
  rows = read_metrics(workdir)
  series, harness = loss_series(rows), harness_series(rows)
  if not any(steps for steps, _ in series.values()):
    raise MetricsError(f"{paths.join(workdir, 'metrics.jsonl')} holds no train_loss or val_loss yet: plot again "
                       "after the run's first logged step (log.every_steps).")
  fig = Figure(figsize=(8, 7.5 if harness else 4.5), dpi=100, layout="constrained")
  ax = fig.add_subplot(2 if harness else 1, 1, 1)
  if harness:
    below = fig.add_subplot(2, 1, 2, sharex=ax)
    for name, (steps, values) in harness.items():
      below.plot(steps, values, marker="o", markersize=4, label=name.removeprefix("harness/"))
    below.set_xlabel("step")
    below.set_ylabel("harness metric")
    below.grid(alpha=0.3)
    below.legend()
  for name, (steps, losses) in series.items():
    if steps:
      ax.plot(steps, losses, **SERIES[name])
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per token)")
  ax.grid(alpha=0.3)
  ax.legend()
  last = [f"{SERIES[name]['label']} {losses[-1]:.3f}" for name, (_, losses) in series.items() if losses]
  ax.set_title(f"{' | '.join(last)} at step {max(steps[-1] for steps, _ in series.values() if steps)}")
  per_step = tokens_per_step(workdir)
  if per_step:
    tokens = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
    tokens.set_xlabel(f"tokens ({per_step:,} per step)")
    tokens.xaxis.set_major_formatter(EngFormatter())
  return fig


def write(workdir: str, out: str | None = None) -> str:
  """Writes the loss curve of `workdir` as a PNG to `out` (default <workdir>/loss.png); returns its path."""
  out = out or paths.join(workdir, "loss.png")
  fig = figure(workdir)
  with paths.atomic_write(out, "wb") as f:
    fig.savefig(f, format="png")  # a Figure without pyplot renders PNGs with the Agg backend
  return out


def main(argv):
  del argv
  out = write(flags.FLAGS.workdir, flags.FLAGS.out)
  print(f"wrote {out}")


if __name__ == "__main__":
  # Defined only when run as a command: tests import this module next to others that define --workdir/--out.
  flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.", required=True)
  flags.DEFINE_string("out", None, "PNG file to write (default <workdir>/loss.png).")
  cli.run(main)
