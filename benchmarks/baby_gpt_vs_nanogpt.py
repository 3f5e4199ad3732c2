"""nanoGPT's CPU "baby GPT" recipe, whole command against whole command, in one run on this machine.

  git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt      # supplied by you; nothing of it is in our tree
  python -m benchmarks.baby_gpt_vs_nanogpt --nanogpt=/tmp/nanogpt --data=../shared/data/tinyshakespeare.txt

Runs, alternating `--repeats` times: nanoGPT's README command (`train.py config/train_shakespeare_char.py
--device=cpu --compile=False --eval_iters=20 ... --max_iters=2000`, from a temporary copy of the clone whose
data/shakespeare_char is prepared from --data) and ours (`python -m gptjax.main --config=configs/shakespeare_char.py`).
Each is timed from process start to exit (imports, data, compile, 9 evaluations, samples). Prints the machine,
the wall times, val losses at step 2000 (20 batches, nanoGPT's protocol) and `wall_ratio` = ours / nanoGPT's
(the issue's target is <= 1.25), then one JSON line.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import median, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANOGPT_FLAGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                 "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                 "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def timed(command: list[str], cwd: str) -> tuple[float, str]:
  start = time.perf_counter()
  out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if out.returncode:
    raise SystemExit(f"error: {' '.join(command)} (in {cwd}) exited {out.returncode}:\n{out.stderr[-3000:]}")
  return seconds, out.stdout + out.stderr


def prepare_nanogpt(clone: str, text: str, scratch: str) -> str:
  """A copy of the nanoGPT clone (its code only) with data/shakespeare_char prepared from our local text."""
  if not os.path.isfile(os.path.join(clone, "train.py")):
    raise SystemExit(f"error: --nanogpt={clone!r} has no train.py; give a clone of github.com/karpathy/nanoGPT.")
  copy = os.path.join(scratch, "nanogpt")
  shutil.copytree(clone, copy, ignore=shutil.ignore_patterns(".git", "out-*", "*.bin", "*.pkl"))
  data_dir = os.path.join(copy, "data", "shakespeare_char")
  shutil.copyfile(text, os.path.join(data_dir, "input.txt"))  # prepare.py then downloads nothing
  subprocess.run([sys.executable, "prepare.py"], cwd=data_dir, check=True, capture_output=True)
  return copy


def nanogpt_run(copy: str) -> dict:
  seconds, log = timed([sys.executable, "train.py", *NANOGPT_FLAGS], copy)
  val = re.findall(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", log)
  iters = [float(ms) for ms in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", log)[10:]]
  return {"wall_seconds": seconds, "val_loss": float(val[-1]) if val else None,
          "median_step_ms": median(iters) if iters else None}


def gptjax_run(text: str, workdir: str) -> dict:
  seconds, _ = timed([sys.executable, "-m", "gptjax.main", "--config=configs/shakespeare_char.py",
                      f"--config.data.path={text}", f"--workdir={workdir}"], REPO)
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:  # our own scratch dir
    summary = json.load(f)
  return {"wall_seconds": seconds, "val_loss": summary["val_loss"], "final_val_loss": summary["final_val_loss"],
          "median_step_ms": 1e3 * summary["median_step_seconds"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nanogpt", required=True, help="a clone of github.com/karpathy/nanoGPT (read only)")
  parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  text = os.path.abspath(args.data)
  if not os.path.isfile(text):
    raise SystemExit(f"error: --data={args.data!r} does not exist; give tinyshakespeare's input.txt.")
  runs = {"nanogpt": [], "gptjax": []}
  with tempfile.TemporaryDirectory() as scratch:
    copy = prepare_nanogpt(os.path.abspath(args.nanogpt), text, scratch)
    for i in range(args.repeats):
      runs["nanogpt"].append(nanogpt_run(copy))
      runs["gptjax"].append(gptjax_run(text, os.path.join(scratch, f"gptjax_{i}")))
  rows = []
  for name, results in runs.items():
    for r in results:
      rows.append((name, f"wall {r['wall_seconds']:.1f} s | val loss @2000 {r['val_loss']} | median step "
                         f"{r['median_step_ms'] or float('nan'):.1f} ms"))
  ratio = median([r["wall_seconds"] for r in runs["gptjax"]]) / median([r["wall_seconds"] for r in runs["nanogpt"]])
  rows.append(("wall_ratio (ours / nanoGPT)", f"{ratio:.2f} (target <= 1.25)"))
  report(rows, {"runs": runs, "wall_ratio": ratio})


if __name__ == "__main__":
  main()
