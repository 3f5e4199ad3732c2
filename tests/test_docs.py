"""Every `python -m gptjax.*` command the docs quote parses against the real flags and configs.

The commands come from README.md, docs/*.md, launch/README.md and benchmarks/RESULTS.md: every command in a code
block, and every inline `python -m gptjax.X --flag ...` with flags and no `...` placeholder. One subprocess
(this file run as a script) runs each command's module as `__main__` with absl's `app.run` replaced by flag parsing
alone: its flags, required flags, the config file (with its `:arg`) and every `--config.*` override against the
locked config are checked exactly as the real command would, and no work is done.
"""

import importlib.util
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md", "launch/README.md", "benchmarks/RESULTS.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
# The commands that take one positional argument (absl leaves it to main), and its values; the others take none.
POSITIONAL = {"gptjax.hf": {"import", "export"}}
# This file as a script, run from the repository root so that `gptjax` and `configs/` are this checkout's.
CHECKER = [sys.executable, "-m", "tests.test_docs"]
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`]+)`")


def _commands_in(text: str) -> list[list[str]]:
  """The `python -m gptjax.X args` commands of a shell text, as [module, *args]."""
  if not re.search(r"python3? -m gptjax\.", text):  # prose or other commands, which need not be shell syntax
    return []
  lexer = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=";&|")
  lexer.whitespace_split = True
  words, commands = [], []
  for word in [*lexer, ";"]:
    if word not in (";", "&&", "||", "|", "&"):
      words.append(word)
      continue
    for i in range(len(words) - 2):
      if re.fullmatch(r"python3?", words[i]) and words[i + 1] == "-m" and words[i + 2].startswith("gptjax."):
        # `...` stands for more arguments and `[--flag=x]` for an optional one: check what is written.
        args = [w[1:-1] if w.startswith("[") and w.endswith("]") else w for w in words[i + 3:] if w != "..."]
        commands.append([words[i + 2], *args])
    words = []
  return commands


def doc_commands() -> list[tuple[str, list[str]]]:
  """(file:line, [module, *args]) of every command quoted in DOCS."""
  found = []
  for name in DOCS:
    text = (ROOT / name).read_text()
    line_of = lambda source, pos: f"{name}:{source.count(chr(10), 0, pos) + 1}"
    for block in _FENCE.finditer(text):
      # One command per line (after joining continuations), so that each reports its own line.
      start = block.start(1)
      for line in re.split(r"(?<!\\)\n", block.group(1)):
        found += [(line_of(text, start), c) for c in _commands_in(line)]
        start += len(line) + 1
    prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # code blocks out, line numbers kept
    for span in _INLINE.finditer(prose):
      code = span.group(1).replace("\n", " ")
      if "..." not in code:
        commands = [c for c in _commands_in(code) if any(a.startswith("--") for a in c)]  # not a bare name
        found += [(line_of(prose, span.start()), c) for c in commands]
  return found


COMMANDS = doc_commands()


@pytest.fixture(scope="module")
def parsed() -> dict[str, str | None]:
  """The checker's verdict on every command: None when it parses, else the error."""
  argvs = sorted({json.dumps(c) for _, c in COMMANDS})
  done = subprocess.run(CHECKER, input=json.dumps([json.loads(a) for a in argvs]), cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return dict(zip(argvs, json.loads(done.stdout.splitlines()[-1])))


def test_the_docs_quote_the_commands():
  modules = {c[0] for _, c in COMMANDS}
  assert {"gptjax.main", "gptjax.prepare", "gptjax.sample", "gptjax.evaluate", "gptjax.export", "gptjax.hf",
          "gptjax.plan", "gptjax.plot"} <= modules, modules
  assert any(a.startswith("--config.") for _, c in COMMANDS for a in c), "no --config.* override found"


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w} {c[0]}" for w, c in COMMANDS])
def test_command_parses(parsed, where, command):
  error = parsed[json.dumps(command)]
  assert error is None, f"{where}: python -m {' '.join(command)}\n{error}"


def test_every_quoted_config_field_exists():
  """`--config.a.b` anywhere in the docs (launcher lines and prose too) names a field of the config."""
  spec = importlib.util.spec_from_file_location("sst2_config", ROOT / "configs" / "sst2.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()  # the default config with the task and lora sections: every field there is
  missing = []
  for name in DOCS:
    for field in sorted(set(re.findall(r"--config\.([A-Za-z_][\w.]*\w)", (ROOT / name).read_text()))):
      node = config
      for part in field.split("."):
        if not hasattr(node, "keys") or part not in node:
          missing.append(f"{name}: --config.{field}")
          break
        node = node[part]
  assert not missing, missing


def test_checker_catches_bad_commands():
  bad = [["gptjax.main", "--config=configs/quickstart.py", "--config.train.stepz=3"],
         ["gptjax.main", "--config=configs/quickstart.py", "--config.train.steps=three"],
         ["gptjax.main", "--config=configs/no_such_config.py"],
         ["gptjax.sample", "--workdir=runs/x", "--top_q=0.9"],
         ["gptjax.sample", "--prompt=The "],  # --workdir is required
         ["gptjax.hf", "convert", "--hf=gpt2", "--out=x"],
         ["gptjax.hf", "import", "export", "--hf=gpt2", "--out=x"],
         ["gptjax.export", "--workdir=a", "--out=b", "stray"],
         ["gptjax.main", "--config=configs/quickstart.py", "--config.lora.rank=8"]]  # lora: task configs only
  good = [["gptjax.main", "--config=configs/sst2.py:data/sst2", "--config.train.steps=3", "--config.lora.rank=8"]]
  done = subprocess.run(CHECKER, input=json.dumps(bad + good), cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  errors = json.loads(done.stdout.splitlines()[-1])
  assert all(errors[:len(bad)]), list(zip(bad, errors))
  assert errors[len(bad):] == [None] * len(good), errors[len(bad):]


class _Parsed(Exception):
  """Raised instead of running a command's main: its flags parsed; carries the positional arguments left."""


def _parse_only(main, argv=None, **kwargs):
  del main, kwargs
  from absl import flags  # pylint: disable=import-outside-toplevel
  positional = flags.FLAGS(argv or sys.argv)[1:]
  for name in flags.FLAGS:  # a config file that failed to load raises only when its value is first read
    getattr(flags.FLAGS[name].value, "keys", None)
  raise _Parsed(positional)


def check(command: list[str]) -> str | None:
  """None when `python -m <command>` parses (flags, required flags, config and overrides); else the error."""
  import runpy  # pylint: disable=import-outside-toplevel
  from unittest import mock  # pylint: disable=import-outside-toplevel
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  module, args = command[0], command[1:]
  before = set(flags.FLAGS)
  sys.argv = [module, *args]  # ml_collections reads --config.* overrides from sys.argv
  try:
    with mock.patch.object(app, "run", _parse_only):
      runpy.run_module(module, run_name="__main__", alter_sys=False)
    return f"{module} does not call absl.app.run"
  except _Parsed as done:
    positional, wanted = done.args[0], POSITIONAL.get(module)
    if (len(positional) == 1 and positional[0] in wanted) if wanted else not positional:
      return None
    return f"positional arguments {positional}: {module} takes {f'one of {sorted(wanted)}' if wanted else 'none'}"
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except  # reported as the command's error
    return f"{type(e).__name__}: {e}"
  finally:
    for name in set(flags.FLAGS) - before:  # the next command defines its own flags of the same names
      if name in flags.FLAGS:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


if __name__ == "__main__":
  import warnings
  warnings.simplefilter("ignore", RuntimeWarning)  # runpy: a module already imported by an earlier command
  print(json.dumps([check(c) for c in json.load(sys.stdin)]))
