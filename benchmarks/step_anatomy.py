"""What one compiled train step executes, and how long each kind of operation takes (a per-thunk profile).

  python -m benchmarks.step_anatomy --config=configs/shakespeare_char.py
  python -m benchmarks.step_anatomy --config=configs/gpt2_small.py --batch=8 --seq=128

The step is the one `python -m gptjax.main` runs (`train.make_train_step`, the config's optimizer and model). It is
timed over --steps calls, then --trace_steps calls run under `jax.profiler`: XLA:CPU records every thunk it executes
(a fusion, a dot, a copy, ...) under the instruction's name, which the compiled program's text maps to its kind and
to the line of gptjax that produced it. Printed: thunks per step and their time by kind and by part of the step
(model forward / backward, LM head + loss, optimizer, the step's own bookkeeping). While loops and conditionals
are containers: their time is their thunks'.
"""

import glob
import gzip
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import median, report, time_calls
from gptjax import anatomy, config as config_lib, sharding, train
from gptjax.model import GPTConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/shakespeare_char.py", "Model and optimizer config.")
_BATCH = flags.DEFINE_integer("batch", 0, "Sequences per step (0 = the config's train.batch_size).")
_SEQ = flags.DEFINE_integer("seq", 0, "Tokens per sequence (0 = the config's block_size).")
_VOCAB = flags.DEFINE_integer("vocab", 0, "Vocabulary (0 = the config's data.vocab_size; 65 for a char config).")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps (after 10 warm-up steps).")
_TRACE_STEPS = flags.DEFINE_integer("trace_steps", 10, "Steps run under the profiler.")
_TOP = flags.DEFINE_integer("top", 0, "Also print the N instructions that take the most time, with their op names.")

_NAME = re.compile(r"^\s+(?:ROOT )?%(\S+) = ")
_OPCODE = re.compile(r"[\]})] ([a-z][a-z0-9-]*)\(")  # after the result type: f32[..]{layout}, (tuple), ...
CONTAINERS = {"while", "conditional", "call"}


def _frames(hlo: str) -> dict[int, str]:
  """stack_frame_id -> 'file.py:function' of the innermost gptjax frame (gptjax.anatomy reads the tables)."""
  short = lambda where: re.sub(r"^gptjax/(?:\w+/)*([\w]+\.py):\d+ ", r"\1:", where) if where else "?"
  return {key: short(where) for key, where in anatomy.source_lines(hlo).items()}


def _instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
  """instruction name -> (kind, part of the step, its source line and op name) for every instruction."""
  frames = _frames(hlo)
  out = {}
  for line in hlo.splitlines():
    name = _NAME.match(line)
    opcode = name and _OPCODE.search(line, name.end() - 1)
    if not opcode:
      continue
    name, opcode = name.group(1), opcode.group(1)
    fusion_kind, op_name, frame = (m and m.group(1) for m in (re.search(r"kind=(k\w+)", line),
                                                               re.search(r'op_name="([^"]*)"', line),
                                                               re.search(r"stack_frame_id=(\d+)", line)))
    if opcode == "fusion":
      dot = any(library in line for library in ("__ynn_fusion", "__onednn", "__xnn"))
      kind = "dot (library fusion)" if dot else {"kLoop": "fusion: elementwise", "kInput": "fusion: reduction",
                                                 "kOutput": "fusion: output"}.get(fusion_kind, "fusion: other")
    elif opcode in ("dot", "custom-call"):
      kind = "dot" if opcode == "dot" else "custom-call"
    elif opcode in ("copy", "transpose"):
      kind = "copy / transpose"
    elif opcode in CONTAINERS:
      kind = "container"
    else:
      kind = opcode
    where = frames.get(int(frame), "?") if frame else "?"
    out[name] = (kind, _part(op_name or "", where), f"{where} {op_name or ''}")
  return out


def _part(op_name: str, where: str) -> str:
  """Which part of the step an instruction belongs to, from the gptjax line that produced it (XLA-made layout ops
  carry only the op name, which says forward or backward)."""
  file, _, function = where.partition(":")
  function = function.rsplit(".", 1)[-1]
  if file == "losses.py":
    return "LM head + loss"
  if "/cond/" in op_name or function in ("apply_update", "schedule"):
    return "optimizer (AdamW, schedule; under the finite guard)"
  if file == "train.py":
    return "step bookkeeping (grad norm, finite guard, counters)"
  if file in ("model.py", "attention.py", "sharding.py") or (file == "?" and "jvp(" in op_name):
    # A custom_vjp's backward rule (e.g. attention._short_causal_bwd) is traced without transpose( in its names.
    backward = "transpose(" in op_name or function.endswith("_bwd")
    return "model backward" if backward else "model forward"
  return "other"


class Anatomy:
  """Per-call thunk counts and seconds by kind, by part of the step and by instruction, from a profiler trace."""

  def __init__(self, events, instructions, module: str, calls: float):
    self.instructions = instructions
    self.by_kind, self.by_part, self.by_name = ({} for _ in range(3))
    for event in events:
      if (event.get("ph") != "X" or event.get("args", {}).get("hlo_module") != module
          or event["name"] not in instructions):
        continue
      kind, part, _ = instructions[event["name"]]
      if kind == "container":
        continue
      for table, key in ((self.by_kind, kind), (self.by_part, part), (self.by_name, event["name"])):
        count, seconds = table.get(key, (0, 0.0))
        table[key] = (count + 1 / calls, seconds + event.get("dur", 0) / 1e6 / calls)
    self.thunks = sum(count for count, _ in self.by_kind.values())
    self.seconds = sum(seconds for _, seconds in self.by_kind.values())  # summed over the threads that run thunks

  def summary(self) -> dict:
    return {"thunks": self.thunks, "thunk_seconds": self.seconds,
            "by_kind": {k: {"thunks": c, "seconds": s} for k, (c, s) in self.by_kind.items()},
            "by_part": {k: {"thunks": c, "seconds": s} for k, (c, s) in self.by_part.items()}}


def profile_thunks(run, calls: int, hlo: str, units_per_call: int = 1) -> Anatomy:
  """Runs `run()` `calls` times under jax.profiler: the thunks of the program whose text is `hlo`, per unit (a
  call, or e.g. a decoded token: `units_per_call` of them per call)."""
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(calls):
      run()
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(os.path.join(trace_dir, "plugins/profile/*/*.trace.json.gz")))[-1]
    with gzip.open(trace, "rt") as f:
      events = json.load(f)["traceEvents"]
  module = re.match(r"HloModule (\S+?),", hlo).group(1)
  return Anatomy(events, _instructions(hlo), module, calls * units_per_call)


def anatomy_rows(anatomy: Anatomy, per: str, top: int = 0, parts: bool = True) -> list[tuple[str, str]]:
  """Report rows: thunks per `per` by kind (and by part of a train step), then the `top` costliest instructions."""
  rows = [(f"thunks per {per}", f"{anatomy.thunks:.0f}, {anatomy.seconds * 1e3:.2f} ms inside them (traced, summed "
                                "over threads: independent thunks run at once)")]
  for title, table in (("kind", anatomy.by_kind), ("part", anatomy.by_part))[:2 if parts else 1]:
    for key, (count, seconds) in sorted(table.items(), key=lambda kv: -kv[1][1]):
      rows.append((f"{title}: {key}", f"{count:6.0f} thunks  {seconds * 1e3:8.2f} ms  "
                                      f"{seconds / anatomy.seconds:6.1%} of thunk time  "
                                      f"{seconds / count * 1e6:7.1f} us each"))
  for name, (count, seconds) in sorted(anatomy.by_name.items(), key=lambda kv: -kv[1][1])[:top]:
    rows.append((f"top: {name}", f"{seconds * 1e3:6.2f} ms x{count:.0f}  {anatomy.instructions[name][2][:150]}"))
  return rows


def main(argv):
  del argv
  config = _CONFIG.value
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  batch = _BATCH.value or config.train.batch_size
  seq = _SEQ.value or config.model.block_size
  vocab = config_lib.check_vocab(config, _VOCAB.value or (65 if config.data.tokenizer == "char"
                                                          else config.data.vocab_size))
  model_cfg = GPTConfig.from_config(config.model, vocab)
  mesh = sharding.make_mesh(config)
  built = train.build_step(config, model_cfg, mesh)
  step, state = built.step, train.init_state(config, model_cfg, mesh, built.tx)[1]
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, vocab, (1, batch, seq + 1)), jnp.int32)
  compiled = step.lower(state, tokens).compile()
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], tokens)
    jax.block_until_ready(metrics)
  for _ in range(10):
    run()
  step_seconds = median(time_calls(run, _STEPS.value))
  anatomy = profile_thunks(run, _TRACE_STEPS.value, compiled.as_text())
  rows = [("step", f"{config.model.n_layer}L {config.model.n_embd}D vocab {vocab}, batch {batch} x {seq}, "
                   f"{config.model.dtype}, scan={config.model.scan_layers}, remat={config.model.remat}"),
          ("median step", f"{step_seconds * 1e3:.2f} ms over {_STEPS.value} steps")]
  report(rows + anatomy_rows(anatomy, "step", _TOP.value), dict(anatomy.summary(), step_seconds=step_seconds))

if __name__ == "__main__":
  app.run(main)
