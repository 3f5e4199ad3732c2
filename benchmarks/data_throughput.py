"""Data throughput: prepare (MB/s of text tokenised into shards) and the training pipeline (tokens/s of batches),
compared with what the train step consumes.

  python -m benchmarks.data_throughput --megabytes=50 --train_tokens_per_sec=330

The corpus is ../shared/data/tinyshakespeare.txt repeated into files of ~5 MB in a temporary directory. The
tokenizer is trained first (timed apart), so that prepare's rate is that of reading, encoding with one worker
process per core, and writing shards. The pipeline pulls GPT-2 small batches (8 x 1024 and 512 x 1024) through
train_batches; ratio = pipeline tokens/s / train step tokens/s must stay far above 1 for the data never to be the
bottleneck (the default 330 tokens/s is GPT-2 small's train step at 8 x 128 on a 2-core CPU).
"""

import os
import tempfile
import time

from absl import app, flags

from benchmarks.common import report
from gptjax import config as config_lib, data
from gptjax.data.corpus import open_corpus

_SHAKESPEARE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                            "tinyshakespeare.txt")
_MEGABYTES = flags.DEFINE_integer("megabytes", 50, "Size of the corpus to prepare.")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "bpe", ["bpe", "unigram", "char"], "Tokenizer to train and encode with.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Tokenizer vocabulary.")
_TRAIN_RATE = flags.DEFINE_float("train_tokens_per_sec", 330.0, "Tokens/s the train step consumes (GPT-2 small, "
                                 "8 x 128 on this CPU: benchmarks/train_throughput.py).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Grain worker processes for the pipeline (data.num_workers).")
_SECONDS = flags.DEFINE_float("seconds", 3.0, "Time spent pulling batches of each shape.")
_SEQ = 1024
_BATCHES = (8, 512)


def pipeline_rate(path: str, batch: int, num_workers: int, seconds: float) -> float:
  """Tokens/s (batch x seq per batch) that train_batches delivers, after its first batch."""
  it = data.train_batches(path, _SEQ, batch, seed=0, num_workers=num_workers)
  next(it)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    count += 1
  rate = count * batch * _SEQ / (time.perf_counter() - start)
  del it  # Grain workers must be shut down before exit
  return rate


def main(argv):
  del argv
  if not os.path.exists(_SHAKESPEARE):
    report([("skipped", f"{_SHAKESPEARE} is absent (it ships only with the development workspace)")],
           {"skipped": "no ../shared/data/tinyshakespeare.txt"})
    return
  with open(_SHAKESPEARE) as f:
    text = f.read()
  with tempfile.TemporaryDirectory() as tmp:
    corpus_dir = os.path.join(tmp, "corpus")
    os.makedirs(corpus_dir)
    copies = max(1, (5 << 20) // len(text))
    n_files = max(1, round(_MEGABYTES.value * 1e6 / (copies * len(text))))
    for i in range(n_files):  # each file one document of `copies` plays, numbered so that none is a duplicate
      with open(os.path.join(corpus_dir, f"part{i:03d}.txt"), "w") as f:
        f.write("".join(f"{text}\n[part {i}, copy {j}]\n" for j in range(copies)))
    size = open_corpus(corpus_dir).size_bytes
    config = config_lib.default_config()
    config.data.update(path=corpus_dir, tokenizer=_TOKENIZER.value, vocab_size=_VOCAB.value,
                       cache_dir=os.path.join(tmp, "cache"))

    start = time.perf_counter()
    tok = data.train_tokenizer((t for t, _ in open_corpus(corpus_dir).documents()), _TOKENIZER.value,
                               _VOCAB.value, os.path.join(tmp, "unused"), key="x", total_chars=size)
    train_tokenizer_s = time.perf_counter() - start
    tok.save(os.path.join(tmp, "tokenizer"))
    config.data.tokenizer_path = os.path.join(tmp, "tokenizer")  # prepare loads it: its time is the encoding's
    start = time.perf_counter()
    prepared = data.prepare(config, tmp)
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    data.prepare(config, tmp)
    cached_s = time.perf_counter() - start

    rates = {b: pipeline_rate(prepared.train_path, b, _NUM_WORKERS.value, _SECONDS.value) for b in _BATCHES}
  mb_per_s = size / 1e6 / prepare_s
  tokens = prepared.train_tokens + prepared.val_tokens
  rows = [("corpus", f"{size / 1e6:.1f} MB in {n_files} files, {os.cpu_count()} cores"),
          ("tokenizer", f"{tok.kind} {tok.vocab_size} tokens, trained in {train_tokenizer_s:.1f} s"),
          ("prepare", f"{prepare_s:.1f} s = {mb_per_s:.2f} MB/s of text, {tokens / prepare_s / 1e6:.2f} M tokens/s "
                      f"({tokens / 1e6:.1f} M tokens)"),
          ("prepare again (cached)", f"{cached_s:.2f} s")]
  for b, rate in rates.items():
    rows.append((f"pipeline {b} x {_SEQ} ({_NUM_WORKERS.value} workers)",
                 f"{rate / 1e6:.2f} M tokens/s = {rate / _TRAIN_RATE.value:,.0f} x the train step's "
                 f"{_TRAIN_RATE.value:g} tokens/s"))
  result = dict(megabytes=size / 1e6, cores=os.cpu_count(), tokenizer=tok.kind, vocab_size=tok.vocab_size,
                tokenizer_train_s=train_tokenizer_s, prepare_s=prepare_s, prepare_mb_per_s=mb_per_s,
                prepare_tokens_per_s=tokens / prepare_s, prepare_cached_s=cached_s, num_workers=_NUM_WORKERS.value,
                train_tokens_per_sec=_TRAIN_RATE.value,
                **{f"pipeline_tokens_per_sec_{b}x{_SEQ}": r for b, r in rates.items()},
                pipeline_ratio=min(rates.values()) / _TRAIN_RATE.value)
  report(rows, result)


if __name__ == "__main__":
  app.run(main)
