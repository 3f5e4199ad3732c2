"""The loss-curve command: what it draws is what metrics.jsonl holds, as a real PNG; clear errors without a run."""

import json
import pathlib
import struct
import subprocess
import sys

import pytest

from gptjax import plot

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = {1: 8.3, 20: 7.1, 40: 6.6, 60: 6.2}
VAL = {40: 6.5, 60: 6.1}


def _write_run(workdir, tokens_per_step=2048):
  """A metrics.jsonl as a run writes it (train rows, val rows, a final row), resumed once after step 40."""
  rows = [{"step": s, "train_loss": v, "grad_norm": 1.0, "learning_rate": 1e-3, "tokens_per_sec": 3e3, "mfu": 0.5}
          for s, v in TRAIN.items() if s <= 40]
  rows += [{"step": 40, "val_loss": VAL[40]}]
  rows += [{"step": 40, "train_loss": 99.0}]  # logged before a kill; the resumed run logs step 40 again below
  rows += [{"step": s, "train_loss": v} for s, v in TRAIN.items() if s >= 40]
  rows += [{"step": 60, "val_loss": VAL[60], "final_val_loss": 6.12}]
  workdir.mkdir(exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
  if tokens_per_step:
    (workdir / "summary.json").write_text(json.dumps({"step": 60, "tokens_seen": 60 * tokens_per_step}))
  return workdir


def test_series_are_the_file_values_last_write_of_a_step_wins(tmp_path):
  series = plot.loss_series(plot.read_metrics(str(_write_run(tmp_path / "run"))))
  assert series == {"train_loss": (list(TRAIN), list(TRAIN.values())), "val_loss": (list(VAL), list(VAL.values()))}


def test_figure_draws_the_series_with_a_tokens_axis(tmp_path):
  workdir = str(_write_run(tmp_path / "run"))
  fig = plot.figure(workdir)
  ax = fig.axes[0]
  drawn = {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()}
  assert drawn == {"train": [[s, v] for s, v in TRAIN.items()], "validation": [[s, v] for s, v in VAL.items()]}
  assert plot.tokens_per_step(workdir) == 2048
  tokens_axis = ax.child_axes[0]
  assert tokens_axis.get_xlabel() == "tokens (2,048 per step)"
  fig.draw_without_rendering()  # a secondary axis takes its limits at drawing time
  # The top axis is the step axis scaled by tokens per step.
  assert tokens_axis.get_xlim() == pytest.approx(tuple(2048 * x for x in ax.get_xlim()))


def test_no_tokens_axis_without_a_summary(tmp_path):
  workdir = str(_write_run(tmp_path / "run", tokens_per_step=None))
  assert plot.tokens_per_step(workdir) is None
  assert not plot.figure(workdir).axes[0].child_axes


def test_png_written_to_workdir_or_out(tmp_path):
  workdir = str(_write_run(tmp_path / "run"))
  for out, expected in ((None, tmp_path / "run" / "loss.png"), (str(tmp_path / "other.png"), tmp_path / "other.png")):
    assert plot.write(workdir, out) == str(expected)
    png = expected.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (800, 450)  # 8 x 4.5 inches at 100 dpi
    assert 10_000 < len(png) < 500_000
  assert not list((tmp_path / "run").glob(".tmp-*"))


def test_cli_writes_the_png_and_reports_errors_in_one_line(tmp_path):
  workdir = _write_run(tmp_path / "run")
  done = subprocess.run([sys.executable, "-m", "gptjax.plot", f"--workdir={workdir}"], capture_output=True, text=True,
                        cwd=ROOT, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == f"wrote {workdir / 'loss.png'}"
  assert (workdir / "loss.png").stat().st_size > 10_000
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "metrics.jsonl").write_text("")
  for bad, message in ((tmp_path / "missing", "metrics.jsonl does not exist"), (tmp_path / "empty", "holds no")):
    done = subprocess.run([sys.executable, "-m", "gptjax.plot", f"--workdir={bad}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {bad}/metrics.jsonl") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_broken_line_is_named(tmp_path):
  workdir = _write_run(tmp_path / "run")
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 80, "train_lo\n')
  with pytest.raises(plot.MetricsError, match=r"metrics.jsonl, line 10: not a JSON object"):
    plot.read_metrics(str(workdir))
