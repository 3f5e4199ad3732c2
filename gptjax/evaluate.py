"""Loss, perplexity and bits per byte of a model on text files; or a fine-tuned model's task metrics on a file.

  python -m gptjax.evaluate --workdir=runs/small --data='corpus/test/*.txt' [--step=N] [--batch_size=8] [--weights=int8]
  python -m gptjax.evaluate --workdir=runs/ner --data=test.txt [--out=DIR] [--base=BASE]   (fine-tuned)

`--workdir` is a run directory (its latest checkpoint) or an exported model; `--data` is a file, a directory, a
glob or a JSONL/Parquet file, as `data.path` (several: comma-separated). Each document is scored after an
end-of-text token, as documents follow each other in training data, and the text is cut into non-overlapping
windows of block_size tokens, each scored in one pass: like training's validation loss, a token sees the context
since its window began, not a full block_size of it (a sliding evaluation would cost block_size/stride times more).
End-of-text predictions are not scored, so the numbers measure the text alone.

Bits per byte = total nats / (ln 2 x the text's UTF-8 bytes): it does not depend on the tokenizer, so models
with different tokenizers compare. The last line printed is one JSON object with loss, perplexity,
bits_per_byte, tokens and bytes.
"""

import functools
import json
import math
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from tqdm import tqdm

from gptjax import cli, quantize
from gptjax.data import DataError


@functools.partial(jax.jit, static_argnames="graphdef")
def _token_nll(params, tokens_BT1, graphdef):
  """Negative log-likelihood (nats, float32) of each target tokens[:, 1:] given the tokens before it."""
  model = nnx.merge(graphdef, quantize.dequantize(params))
  logits_BTV = model.logits(model(tokens_BT1[:, :-1]))
  targets_BT = tokens_BT1[:, 1:]
  return jax.nn.logsumexp(logits_BTV, axis=-1) - jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]


def token_windows(tokenizer, texts: Iterable[str], window: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(tokens [W, window + 1], scored [W, window] targets to count, UTF-8 bytes of the texts).

  The stream is end-of-text, document, end-of-text, document, ...; window w holds tokens w*window ..
  (w+1)*window, so every target is in exactly one window; the last is padded with unscored zeros.
  """
  ids, scored, n_bytes = [], [], 0
  for text in texts:
    doc = np.asarray(tokenizer.encode(text), np.int32)
    ids += [[tokenizer.eos_id], doc]
    scored += [[False], np.ones(len(doc), bool)]
    n_bytes += len(text.encode("utf-8"))
  ids, scored = np.concatenate(ids), np.concatenate(scored)
  n_windows = max(-(-(len(ids) - 1) // window), 1)
  tokens = np.zeros(n_windows * window + 1, np.int32)
  tokens[:len(ids)] = ids
  targets = np.zeros(n_windows * window, bool)
  targets[:len(ids) - 1] = scored[1:]
  starts = np.arange(n_windows) * window
  return tokens[starts[:, None] + np.arange(window + 1)], targets.reshape(n_windows, window), n_bytes


def evaluate_texts(params, graphdef, tokenizer, texts: Iterable[str], batch_size: int = 8,
                   progress: bool = False, weights: str | None = None) -> dict:
  """{loss, perplexity, bits_per_byte, tokens, bytes} of the model on the texts (see the module docstring);
  `weights` ('bfloat16', 'int8') scores the model with its matrices stored narrow, as `gptjax.sample` decodes."""
  cfg = nnx.merge(graphdef, params).cfg
  params = quantize.quantize(params, weights)
  windows, scored, n_bytes = token_windows(tokenizer, texts, cfg.block_size)
  n_tokens = int(scored.sum())
  if n_tokens == 0:
    raise DataError("the texts hold no tokens to score; give non-empty text files.")
  # Whole batches only: one compilation; the padding rows score nothing.
  n_rows = -(-len(windows) // batch_size) * batch_size
  windows = np.concatenate([windows, np.zeros((n_rows - len(windows), windows.shape[1]), np.int32)])
  scored = np.concatenate([scored, np.zeros((n_rows - len(scored), scored.shape[1]), bool)])
  total = 0.0
  for start in tqdm(range(0, n_rows, batch_size), desc="evaluate", unit="batch", disable=not progress):
    nll_BT = jax.device_get(_token_nll(params, windows[start:start + batch_size], graphdef))
    total += float(np.sum(nll_BT, where=scored[start:start + batch_size], dtype=np.float64))
  loss = total / n_tokens
  return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": total / (math.log(2) * n_bytes),
          "tokens": n_tokens, "bytes": n_bytes}


def main(argv):
  del argv
  from gptjax import data, loader, paths
  from gptjax.finetune import job as finetune_job, store
  cli.quiet_libraries()
  f = flags.FLAGS
  if paths.path(os.path.join(f.workdir, "finetuned", store.TASK_FILE)).exists():  # a fine-tuned task model
    if len(f.data) != 1:
      raise app.UsageError("a fine-tuned model scores one file in its task's format: pass one --data file.")
    if f.weights:
      raise app.UsageError("--weights scores a language model; a fine-tuned task model is evaluated as trained.")
    out = f.out or os.path.join(f.workdir, "eval-" + os.path.basename(f.data[0]))
    report = finetune_job.evaluate_file(f.workdir, f.data[0], out, base=f.base)
    print(f"wrote {out}/report.json and predictions.jsonl")
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}))
    return
  loaded = loader.load_model(f.workdir, step=f.step)
  texts = [text for path in f.data for text, _ in data.open_corpus(path).documents()]
  result = evaluate_texts(loaded.params, loaded.graphdef, loaded.tokenizer, texts, f.batch_size, progress=True,
                          weights=f.weights)
  print(f"step {loaded.step} of {f.workdir}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
        f"{result['bits_per_byte']:.4f} bits/byte | {result['tokens']} tokens, {result['bytes']} bytes")
  print(json.dumps(result))


if __name__ == "__main__":
  # Defined here, not at import: the library above is imported by other code that has flags of its own.
  flags.DEFINE_string("workdir", None, "Run directory (latest checkpoint) or exported model.", required=True)
  flags.DEFINE_list("data", None, "Text to score: files, directories or globs, comma-separated.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest readable one).")
  flags.DEFINE_integer("batch_size", 8, "Windows of block_size tokens scored per batch.")
  flags.DEFINE_enum("weights", "", ["", "bfloat16", "int8"],
                    "Score with the weight matrices stored narrow, as `gptjax.sample --weights` decodes.")
  flags.DEFINE_string("out", None, "Fine-tuned models: directory for report.json and predictions.jsonl "
                      "(default <workdir>/eval-<data file name>).")
  flags.DEFINE_string("base", None, "Fine-tuned LoRA models: the base to put the adapters on (default: the one "
                      "they were trained from).")
  cli.run(main)
