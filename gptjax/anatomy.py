"""Where a compiled step's bytes go: its optimized program read instruction by instruction, by part of the model.

A TPU step is bound by the bytes it moves when they take longer at HBM bandwidth than its FLOPs at peak, and the
compiler's `cost_analysis()` gives only the whole program's `bytes accessed`. `instructions` splits a compiled
program (`compiled.as_text()`) into its top-level instructions (fusions, copies, custom calls, ...), each with
- its bytes accessed and FLOPs, from XLA's own cost analysis of that instruction alone (its fused computation
  rebuilt as a one-instruction program), or from its operand and result shapes where that cannot be costed
  (TPU custom calls such as splash attention, asynchronous copies and slices);
- the part of the step it belongs to, from the named scopes the model code opens (`PART_OF_SCOPE`; the backward
  pass keeps the forward's scopes); an instruction outside every scope (a layout copy, the compiler's prefetch of
  a tensor into on-chip memory and back) belongs to the part that produced its operand, and casts and moves of the
  step's parameters and optimizer state are a part of their own;
- the gptjax source line that produced it (the program's stack-frame tables).

`python -m gptjax.plan --tpu=TYPE --anatomy` puts this beside the compiler's totals and each part's analytical
floor (`floors`), per token. Everything here is read off the program text: deterministic for one compiler version.
"""

import dataclasses
import math
import re

PART_OF_SCOPE = {  # named scope in the model and train step -> part (the innermost scope that is a key wins)
    "embedding": "embedding", "layer_norm": "layer norms", "final_norm": "layer norms",
    "attention_projections": "attention projections", "attention": "attention (kernel)", "mlp": "MLP",
    "residual": "residual adds", "lm_head": "LM head + loss", "gradient_accumulation": "gradient accumulation",
    "optimizer": "optimizer update"}
WEIGHTS, OTHER = "weights: casts and moves", "other (no scope, not from a parameter)"
PARTS = tuple(dict.fromkeys(PART_OF_SCOPE.values())) + (WEIGHTS, OTHER)

_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) ")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\(")
_BOOKKEEPING = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
                "replica-id"}


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One top-level instruction of a compiled program and what it costs."""
  name: str
  opcode: str
  shape: str  # the result type as the program writes it (with the TPU's tiled layout)
  bytes: float
  flops: float
  costed_by_xla: bool  # False: bytes from operand and result shapes (custom calls, asynchronous moves)
  op_name: str
  source: str  # 'gptjax/model.py:123 Attention.__call__', or '' when no gptjax line produced it
  part: str


def bytes_accessed(compiled) -> float:
  """The compiler's `bytes accessed` of a compiled program (its whole-program cost analysis)."""
  return float(compiled.cost_analysis()["bytes accessed"])


def array_bytes(shape: str) -> int:
  """Bytes of every array in an HLO type ('bf16[8,1024]{...}', or a tuple of them), without layout padding."""
  return sum(_ITEM_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(shape))


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """{name: [header, instruction lines..., '}']} of a program's text (an instruction continued over several lines is
  one line), and the entry computation's name."""
  comps, entry, name, body = {}, "", None, []
  for line in hlo.splitlines():
    if name is None:
      header = _HEADER.match(line)
      if header and line.rstrip().endswith("{"):
        name, body, is_entry = header.group(2), [line], bool(header.group(1))
      continue
    if line == "}":
      comps[name] = body + [line]
      entry = name if is_entry else entry
      name = None
    elif line.startswith(("  %", "  ROOT ")):
      body.append(line)
    else:
      body[-1] += "\n" + line
  return comps, entry


def _called(line: str) -> set[str]:
  names = set(re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line))
  for group in re.findall(r"(?:called_computations|branch_computations)=\{([^}]*)\}", line):
    names |= set(re.findall(r"%([\w.\-]+)", group))
  return names


def _closure(comps, names) -> list[str]:
  """The computations `names` call, transitively, in the program's order (callees before callers)."""
  seen, stack = set(), list(names)
  while stack:
    name = stack.pop()
    if name in comps and name not in seen:
      seen.add(name)
      stack += [callee for line in comps[name][1:-1] for callee in _called(line)]
  return [name for name in comps if name in seen]


def _operands(line: str, start: int) -> tuple[list[str], int]:
  """The operand names of the instruction whose '(' ends at `start`, and where its operand list ends."""
  depth, end = 1, start
  while depth:
    depth += {"(": 1, ")": -1}.get(line[end], 0)
    end += 1
  return re.findall(r"%([\w.\-]+)", line[start:end - 1]), end - 1


def source_lines(hlo: str) -> dict[int, str]:
  """stack_frame_id -> 'gptjax/FILE.py:LINE FUNCTION' of the innermost gptjax frame, from the program's tables."""
  tables = {name: {} for name in ("FileNames", "FunctionNames", "FileLocations", "StackFrames")}
  section = None
  for line in hlo.splitlines():
    key, _, value = line.partition(" ")
    if line in tables:
      section = tables[line]
    elif section is not None and key.isdigit():
      section[int(key)] = value
    else:
      section = None
  field = lambda text, name: int(re.search(rf"{name}=(\d+)", text).group(1))
  frames = {}
  for key, value in tables["StackFrames"].items():
    location = tables["FileLocations"].get(field(value, "file_location_id"), "")
    file = tables["FileNames"].get(field(location, "file_name_id"), '""').strip('"') if location else ""
    frames[key] = (file, location, field(value, "parent_frame_id") - 1)  # parent ids count from 1; 0: none

  def innermost_gptjax(frame_id: int) -> str:
    while frame_id in frames:
      file, location, parent = frames[frame_id]
      match = re.search(r"(gptjax/[\w/]+\.py)$", file)
      if match and not file.endswith("sharding.py"):
        function = tables["FunctionNames"].get(field(location, "function_name_id"), '""').strip('"')
        return f"{match.group(1)}:{field(location, 'line')} {function.replace('.<locals>', '')}"
      frame_id = parent
    return ""
  return {key: innermost_gptjax(key) for key in frames}


def part_of(op_name: str) -> str:
  """The part of the step an op belongs to: the innermost named scope of `PART_OF_SCOPE` in its op name."""
  scopes = [s for s in re.split(r"[/()]", op_name) if s in PART_OF_SCOPE]
  return PART_OF_SCOPE[scopes[-1]] if scopes else OTHER


def instructions(hlo: str, cost_client=None) -> list[Instruction]:
  """The top-level instructions of a compiled program (its entry computation), each costed and attributed.

  `cost_client`: the XLA client whose cost analysis prices a fused computation (default: this process's CPU
  client: the libtpu compile-only client prices no program of its own; FLOPs and unpadded bytes are the same).
  """
  import jax  # pylint: disable=import-outside-toplevel  # parsing a program's text needs no JAX
  client = cost_client or jax.devices("cpu")[0].client
  comps, entry = computations(hlo)
  lines = source_lines(hlo)
  parsed = [(_INSTRUCTION.match(line), line) for line in comps[entry][1:-1]]
  shapes = {m.group(1): m.group(2) for m, _ in parsed if m}
  part_of_instruction = _attribution(parsed)
  out = []
  for match, line in parsed:
    if not match or match.group(3) in _BOOKKEEPING or match.group(3).endswith(("-done", "-update")):
      continue
    name, shape, opcode = match.groups()
    operands, end = _operands(line, match.end())
    cost = None if opcode == "custom-call" or opcode.endswith("-start") else _xla_cost(
        client, comps, line, match, operands, end, shapes)
    if cost is None:  # by shapes: a move reads and writes its result (the second array of its tuple type)
      arrays = _ARRAY.findall(shape)
      moved = array_bytes("{}[{}]".format(*arrays[1])) if opcode.endswith("-start") and len(arrays) > 1 else None
      cost = {"bytes accessed": 2 * moved if moved is not None else
              sum(array_bytes(shapes.get(o, "")) for o in operands) + array_bytes(shape), "flops": 0.0, "xla": False}
    op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]
    frame = re.search(r"stack_frame_id=(\d+)", line)
    out.append(Instruction(name, opcode, shape, float(cost.get("bytes accessed", 0.0)), float(cost.get("flops", 0.0)),
                           cost.get("xla", True), op_name, lines.get(int(frame.group(1)), "") if frame else "",
                           part_of_instruction(name)))
  return out


def _xla_cost(client, comps, line, match, operands, end, shapes) -> dict | None:
  """XLA's cost analysis of one instruction alone: a program of its operands as parameters and its callees (None
  where it cannot be had: then the caller prices the instruction by its shapes)."""
  program = "\n\n".join(["HloModule one"] + ["\n".join(comps[c]) for c in _closure(comps, _called(line))] + [
      "ENTRY %e {\n" + "\n".join(f"  %p{i} = {shapes[o]} parameter({i})" for i, o in enumerate(operands)) +
      "\n  ROOT " + line[line.index("%"):match.end()] + ", ".join(f"%p{i}" for i in range(len(operands))) +
      line[end:] + "\n}"])
  program = re.sub(r",? stack_frame_id=\d+", "", program)  # the one-instruction program has no frame tables
  try:
    # jaxlib's own bindings, not a public JAX API: a jaxlib without them prices every instruction by its shapes.
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
    from jaxlib import _hlo  # pylint: disable=import-outside-toplevel
    return dict(_jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(program)))
  except Exception:  # pylint: disable=broad-except  # an op XLA's CPU analysis cannot price: costed by shapes
    return None


def _attribution(parsed):
  """name -> part for the entry's instructions: its scope's; a cast of a parameter, and an op outside every scope
  whose first operand is a parameter or such an op, is WEIGHTS (the optimizer update's, for its moments); other
  ops outside every scope take their first operand's part."""
  producers = {}
  for match, line in parsed:
    if match:
      op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]
      producers[match.group(1)] = (match.group(3), _operands(line, match.end())[0], op_name, line)
  memo = {}

  def part(name: str) -> str:
    if name not in memo:
      memo[name] = OTHER  # a cycle cannot occur in a program; this only bounds the recursion
      opcode, operands, op_name, line = producers.get(name, ("", [], "", ""))
      scoped = part_of(op_name)
      if opcode == "parameter":
        state = re.search(r"\b(params|opt_state)\b", op_name)
        memo[name] = OTHER if not state else WEIGHTS if state.group(1) == "params" else "optimizer update"
      elif op_name.endswith("convert_element_type") and any(part(o) == WEIGHTS for o in operands):
        memo[name] = WEIGHTS
      elif scoped != OTHER or not operands:
        memo[name] = scoped
      else:
        memo[name] = part(operands[0])
    return memo[name]
  return part


def by_part(instrs: list[Instruction]) -> dict[str, dict]:
  """{part: {'bytes', 'flops', 'instructions'}} summed over `instrs`, in `PARTS` order."""
  table = {part: {"bytes": 0.0, "flops": 0.0, "instructions": 0} for part in PARTS}
  for i in instrs:
    row = table[i.part]
    row["bytes"] += i.bytes
    row["flops"] += i.flops
    row["instructions"] += 1
  return {part: row for part, row in table.items() if row["instructions"]}


def floors(model_cfg, tokens_per_micro_batch: int, tokens_per_step: int) -> dict[str, float]:
  """Each part's analytical floor in bytes per token: weights and saved activations moved once.

  Per micro-batch a weight is read once forward and once backward in the compute dtype and its float32 gradient
  accumulated (read + write); an activation is written once forward, read once backward, and its gradient written
  and read once. The optimizer reads and writes parameters, both Adam moments and reads the gradient once per step;
  the weights are cast to the compute dtype once per step. Attention is a fused kernel that keeps no [T, T] tensor.
  """
  c = 2 if model_cfg.dtype == "bfloat16" else 4
  D, F, V, L, T = model_cfg.n_embd, 4 * model_cfg.n_embd, model_cfg.vocab_size, model_cfg.n_layer, model_cfg.block_size
  weights = lambda n: n * 2 * c / tokens_per_micro_batch  # bf16 reads, forward and backward
  activation = lambda width: 4 * width * c  # written, read back; its gradient written, read
  per_layer = {
      "layer norms": 2 * activation(D), "attention projections": weights(4 * D * D) + activation(3 * D + D),
      "attention (kernel)": activation(D) + 3 * D * c,  # o and its gradient; q, k, v read again by the backward
      "MLP": weights(2 * D * F) + activation(F), "residual adds": 2 * activation(D)}
  params = L * 12 * D * D + V * D + T * D
  table = {part: L * value for part, value in per_layer.items()}
  table["layer norms"] += activation(D)  # ln_f
  table.update({"embedding": activation(D) / 2, "LM head + loss": weights(V * D) + activation(D),
                "gradient accumulation": 8 * params / tokens_per_micro_batch if tokens_per_step > tokens_per_micro_batch
                else 0.0, "optimizer update": (3 * 8 + 4) * params / tokens_per_step,
                WEIGHTS: (4 + c) * params / tokens_per_step if c < 4 else 0.0, OTHER: 0.0})
  return table


def step_anatomy(model_cfg, plan: dict, programs: dict, top: int = 20) -> dict:
  """Bytes and FLOPs per token of a planned train step, by part, beside the compiler's totals and each floor.

  `programs` are `plan.step_bytes_accessed`'s loop-free programs: the step at 1 and 2 layers ('one', 'two') and the
  optimizer update ('update'). A part's bytes are its instructions' in the 1-layer step plus n_layer - 1 times what
  the second layer adds to them (layout copies and prefetches the compiler adds per layer included); the optimizer's
  come from the update program, once per step; the compiler's total is the plan's (`plan.step_bytes_accessed`).
  `top` names the 1-layer step's costliest instructions. Per token means per token of a data-parallel shard, as
  the plan counts it.
  """
  L = model_cfg.n_layer
  micro_tokens = plan["micro_batch"] * model_cfg.block_size
  step_tokens = micro_tokens * plan["accumulation"]
  one, two, update = (instructions(programs[k].as_text()) for k in ("one", "two", "update"))
  compiler = {k: bytes_accessed(programs[k]) for k in ("one", "two", "update")}
  zero = {"bytes": 0.0, "flops": 0.0}
  by_one, by_two = by_part(one), by_part(two)
  rows = {}
  for part in PARTS:
    if part == "optimizer update" or part not in by_one:
      continue
    a, b = by_one[part], by_two.get(part, zero)
    rows[part] = {k + "_per_token": (a[k] + (L - 1) * (b[k] - a[k])) / micro_tokens for k in ("bytes", "flops")}
  rows["optimizer update"] = {"bytes_per_token": sum(i.bytes for i in update) / step_tokens,
                              "flops_per_token": sum(i.flops for i in update) / step_tokens}
  floor = floors(model_cfg, micro_tokens, step_tokens)
  for part, row in rows.items():
    row["floor_bytes_per_token"] = floor.get(part, 0.0)
  block = compiler["two"] - compiler["one"]
  return {
      "tokens_per_micro_batch": micro_tokens, "micro_batches": plan["accumulation"],
      "compiler_bytes_per_token": plan["bytes_per_token"],
      "compiler_block_bytes_per_token": block / micro_tokens,
      "compiler_outside_blocks_bytes_per_token": (compiler["one"] - block - compiler["update"]) / micro_tokens,
      "compiler_update_bytes_per_step": compiler["update"],
      "parts": rows, "floor_bytes_per_token": sum(floor.values()),
      "instructions_bytes_per_token": sum(r["bytes_per_token"] for r in rows.values()),
      "top": [dataclasses.asdict(i) | {"bytes_per_token": i.bytes / micro_tokens}
              for i in sorted(one, key=lambda i: -i.bytes)[:top]]}


def print_anatomy(anatomy: dict) -> None:
  """The anatomy for a person: parts against their floors, then the costliest instructions."""
  kb = lambda b: f"{b / 1e3:8.1f} KB"
  print(f"step anatomy, per token ({anatomy['tokens_per_micro_batch']:.0f} tokens per micro-batch per chip x "
        f"{anatomy['micro_batches']} micro-batches): the compiler's bytes accessed "
        f"{anatomy['compiler_bytes_per_token'] / 1e6:.2f} MB per token (a block {kb(anatomy['compiler_block_bytes_per_token']).strip()}, "
        f"outside the blocks {kb(anatomy['compiler_outside_blocks_bytes_per_token']).strip()}, the optimizer update "
        f"{anatomy['compiler_update_bytes_per_step'] / 1e9:.2f} GB per step)")
  print(f"  {'part':46s} {'bytes/token':>11s} {'floor':>11s} {'x floor':>8s} {'FLOP/token':>11s}")
  for part, row in anatomy["parts"].items():
    over = row["bytes_per_token"] / row["floor_bytes_per_token"] if row["floor_bytes_per_token"] else float("inf")
    print(f"  {part:46s} {kb(row['bytes_per_token']):>11s} {kb(row['floor_bytes_per_token']):>11s} "
          f"{over:7.1f}x {row['flops_per_token'] / 1e6:9.1f} M")
  print(f"  {'sum of the instructions':46s} {kb(anatomy['instructions_bytes_per_token']):>11s} "
        f"{kb(anatomy['floor_bytes_per_token']):>11s}   ({anatomy['instructions_bytes_per_token'] / anatomy['compiler_bytes_per_token']:.0%} "
        "of the compiler's total: the rest is mostly the TPU's tile padding, which the compiler counts and this does not)")
  print(f"the {len(anatomy['top'])} costliest instructions of the 1-layer step (bytes per token of one occurrence):")
  for i in anatomy["top"]:
    print(f"  {kb(i['bytes_per_token'])} {i['opcode']:11s} {i['part'][:24]:24s} {i['source'] or '(no gptjax line)'}"
          f"  {i['shape'][:60]}")
