"""GPT-2 BPE prepare: MB/s of the whole `python -m gptjax.prepare --config.data.tokenizer=gpt2` command on ~50 MB of
text that never repeats, for this tree and optionally another one (--before), and of the default SentencePiece
tokenizer on the same text, all run alternately.

  mkdir /tmp/before && git archive <rev> | tar -x -C /tmp/before
  python -m benchmarks.bpe_prepare --before=/tmp/before --repeats=3

The corpus: tinyshakespeare and the CoNLL-2003 and SST-2 sentences of ../shared/data, Python's docs (the built-in
corpus), then the source files of the stdlib and of site-packages in order, up to --megabytes, in files of ~5 MB.
Nothing repeats, so the words are as varied as in real text (repeated text favours per-word caches). GPT-2's own
vocab.json + merges.txt need a download: a byte-level BPE of GPT-2's size is trained on a sample of the corpus with
HF tokenizers instead and written in GPT-2's format (same algorithm, size and file format). Running the series
alternately on one machine makes their ratios hold while other jobs load it; the absolute MB/s do not.
"""

import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

from absl import app, flags

from benchmarks.common import median, report
from gptjax import data
from gptjax.data.corpus import builtin_documents, open_corpus

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = os.path.join(_REPO, "..", "shared", "data")
_MEGABYTES = flags.DEFINE_integer("megabytes", 50, "Size of the corpus to prepare.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs of the command per tree (the median is reported).")
_BEFORE = flags.DEFINE_string("before", "", "A gptjax source tree to compare with ('' = this tree only).")
_VOCAB = flags.DEFINE_integer("vocab_size", 50257, "Tokens of the trained byte-level BPE (GPT-2: 50257).")
_SENTENCEPIECE = flags.DEFINE_bool("sentencepiece", True, "Also time the default tokenizer (SentencePiece BPE, "
                                    "8192 tokens, trained first) on the same corpus, for comparison.")
_TRAIN_MB = flags.DEFINE_integer("train_megabytes", 10, "Megabytes of the corpus (evenly sampled) to train it on.")
_FILE_BYTES = 5 << 20
_CONFIG = "from gptjax.config import default_config\n\n\ndef get_config():\n  return default_config()\n"


def _texts():
  """The corpus's texts in order: prose first, then source code."""
  with open(os.path.join(_SHARED, "tinyshakespeare.txt"), encoding="utf-8") as f:
    yield f.read()
  for name in ("train.txt", "dev.txt"):  # CoNLL-2003: one 'word tag' per line, sentences between blank lines
    with open(os.path.join(_SHARED, "conll2003", name), encoding="utf-8") as f:
      sentences = f.read().split("\n\n")
    yield "\n".join(" ".join(line.split(" ")[0] for line in s.splitlines()) for s in sentences) + "\n"
  for name in ("train.tsv", "dev.tsv"):  # SST-2: 'sentence<TAB>label', a header line first
    with open(os.path.join(_SHARED, "sst2", name), encoding="utf-8") as f:
      yield "".join(line.split("\t")[0] + "\n" for line in f.readlines()[1:])
  yield from builtin_documents()
  stdlib = sysconfig.get_paths()["stdlib"]
  for root in (stdlib, sysconfig.get_paths()["purelib"]):
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
      if root == stdlib and "site-packages" in path:
        continue
      with open(path, "rb") as f:
        yield f.read().decode("utf-8", errors="replace")


def write_corpus(directory: str, megabytes: int) -> int:
  """Writes the corpus as text files of ~5 MB into directory; returns its size in bytes (about megabytes)."""
  os.makedirs(directory)
  written, part = 0, bytearray()
  for text in _texts():
    part += text.encode("utf-8") + b"\n"
    if len(part) >= _FILE_BYTES or written + len(part) >= megabytes * 10**6:
      with open(os.path.join(directory, f"part{len(os.listdir(directory)):03d}.txt"), "wb") as f:
        f.write(part)
      written, part = written + len(part), bytearray()
    if written >= megabytes * 10**6:
      break
  return written


def train_gpt2_files(corpus_dir: str, directory: str, vocab_size: int, megabytes: int) -> None:
  """vocab.json + merges.txt of a byte-level BPE (GPT-2's format and EOS) trained on an even sample of the corpus."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  chunks = []
  for path in sorted(glob.glob(os.path.join(corpus_dir, "*.txt"))):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    chunks += [text[i:i + 4096] for i in range(0, len(text), 4096)]
  step = max(1, len(chunks) * 4096 // (megabytes * 10**6))
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(chunks[::step], vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                          show_progress=False)
  os.makedirs(directory)
  bpe.save_model(directory)


def run_prepare(tree: str, kind: str, tokenizer_dir: str, corpus_dir: str, cache_dir: str, config_path: str) -> float:
  """Wall seconds of `python -m gptjax.prepare` of tree on the corpus with the tokenizer, into an empty cache_dir."""
  command = [sys.executable, "-m", "gptjax.prepare", f"--config={config_path}", f"--workdir={cache_dir}",
             f"--config.data.path={corpus_dir}", f"--config.data.tokenizer={kind}",
             f"--config.data.tokenizer_path={tokenizer_dir}", f"--config.data.cache_dir={cache_dir}"]
  env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu")
  start = time.perf_counter()
  done = subprocess.run(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wall = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"{' '.join(command)} failed in {tree}:\n{done.stderr[-3000:]}")
  return wall


def main(argv):
  del argv
  if not os.path.exists(os.path.join(_SHARED, "tinyshakespeare.txt")):
    report([("skipped", "../shared/data is absent (it ships only with the development workspace)")],
           {"skipped": "no ../shared/data"})
    return
  with tempfile.TemporaryDirectory() as tmp:
    corpus_dir, gpt2_dir, sp_dir, config_path = (os.path.join(tmp, n) for n in ("corpus", "gpt2", "sp", "config.py"))
    size = write_corpus(corpus_dir, _MEGABYTES.value)
    start = time.perf_counter()
    train_gpt2_files(corpus_dir, gpt2_dir, _VOCAB.value, _TRAIN_MB.value)
    train_s = time.perf_counter() - start
    with open(config_path, "w", encoding="utf-8") as f:
      f.write(_CONFIG)
    # name: (source tree, tokenizer kind, tokenizer directory)
    series = {"gpt2": (_REPO, "gpt2", gpt2_dir)}
    if _BEFORE.value:
      series["gpt2_before"] = (os.path.abspath(_BEFORE.value), "gpt2", gpt2_dir)
    if _SENTENCEPIECE.value:
      data.train_tokenizer((t for t, _ in open_corpus(corpus_dir).documents()), "bpe", 8192, tmp, key="x",
                           total_chars=size).save(sp_dir)
      series["sentencepiece"] = (_REPO, "bpe", sp_dir)
    times = {name: [] for name in series}
    load = [os.getloadavg()[0]]
    for i in range(_REPEATS.value):
      for name in (series if i % 2 == 0 else reversed(series)):  # alternated: every series sees the same load
        times[name].append(run_prepare(*series[name], corpus_dir, os.path.join(tmp, f"cache-{i}-{name}"),
                                       config_path))
        load.append(os.getloadavg()[0])
        print(f"{name}: {times[name][-1]:.1f} s, load {load[-1]:.1f}", file=sys.stderr, flush=True)
  rate = {name: size / 1e6 / median(t) for name, t in times.items()}
  rows = [("corpus", f"{size / 1e6:.1f} MB (text and Python sources, no repeats), {os.cpu_count()} cores"),
          ("tokenizer", f"byte-level BPE, {_VOCAB.value} tokens, trained on {_TRAIN_MB.value} MB in {train_s:.0f} s"),
          ("load average (1 min)", f"{min(load):.1f}-{max(load):.1f} (our runs add up to {os.cpu_count()})")]
  labels = {"gpt2": "gpt2, this tree", "gpt2_before": "gpt2, --before tree",
            "sentencepiece": "SentencePiece bpe 8192, this tree"}
  rows += [(f"prepare, {labels[name]}", f"median {median(t):.1f} s = {rate[name]:.2f} MB/s (runs: "
                                f"{', '.join(f'{s:.1f}' for s in t)} s)") for name, t in times.items()]
  result = dict(megabytes=size / 1e6, vocab_size=_VOCAB.value, seconds=times, load_average=load,
                **{f"mb_per_s_{name}": r for name, r in rate.items()})
  if "gpt2_before" in rate:
    rows.append(("gpt2: this tree / --before", f"{rate['gpt2'] / rate['gpt2_before']:.2f}x"))
    result["ratio"] = rate["gpt2"] / rate["gpt2_before"]
  report(rows, result)


if __name__ == "__main__":
  app.run(main)
