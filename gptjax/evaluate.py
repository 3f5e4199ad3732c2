"""Loss, perplexity and bits per byte of a model on text files; lm-evaluation-harness tasks; or a fine-tuned
model's task metrics on a file.

  python -m gptjax.evaluate --workdir=runs/small --data='corpus/test/*.txt' [--step=N] [--batch_size=8] [--weights=int8]
  python -m gptjax.evaluate --workdir=runs/small --tasks=hellaswag,arc_easy [--num_fewshot=K] [--limit=N]
      [--include_path=DIR] [--output_path=DIR] [--log_samples]   (the harness: docs/evaluate.md)
  python -m gptjax.evaluate --workdir=runs/ner --data=test.txt [--out=DIR] [--base=BASE]   (fine-tuned)

With --tasks, the harness's table goes to standard error and the last line on standard output is its `results`
mapping as JSON (task -> 'metric,filter' -> value).

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
import sys
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from tqdm import tqdm

from gptjax import cli, config as config_lib, quantize, sharding
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


def language_model(workdir: str, step: int | None = None, mesh=None):
  """(params, graphdef, tokenizer, step) of any model that writes text: a run, an export, 'hf:NAME', or an SFT
  fine-tuning run (its adapters folded in); a classification or NER model is refused."""
  from gptjax import checkpoint, loader, paths  # pylint: disable=import-outside-toplevel
  from gptjax.finetune import store, tasks, tuning  # pylint: disable=import-outside-toplevel
  from gptjax.hf import HF_PREFIX  # pylint: disable=import-outside-toplevel
  if not workdir.startswith(HF_PREFIX) and paths.is_file(paths.join(workdir, "finetuned", store.TASK_FILE)):
    tuned = store.load(workdir, mesh)
    if not tasks.is_language_model(tuned.config.task):
      raise DataError(f"{workdir} holds a {tuned.config.task.kind} model, not a language model: the harness scores "
                      "text. Evaluate it on its task's data with --data, or pass the model it was fine-tuned from.")
    vocab = config_lib.check_vocab(tuned.base_config, tuned.tokenizer.vocab_size)
    _, graphdef, _ = checkpoint.inference_target(tuned.base_config, vocab, mesh)
    params = tuning.merged_params(tuned.trainable, tuned.frozen, tuned.lora_cfg)
    return params, graphdef, tuned.tokenizer, tuned.step
  loaded = loader.load_model(workdir, mesh, step)
  return loaded.params, loaded.graphdef, loaded.tokenizer, loaded.step


def inference_mesh():
  """Every device in one FSDP axis (the parameters split, never gathered on one host); None on one device."""
  if jax.device_count() == 1:
    return None
  config = config_lib.default_config()
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return sharding.make_mesh(config)


def _harness_main(f) -> None:
  """--tasks: the harness's table on stderr, its results as the last line of stdout, files under --output_path."""
  from gptjax import paths  # pylint: disable=import-outside-toplevel
  try:
    from gptjax import harness  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError(f"--tasks needs lm-evaluation-harness ({e}): pip install 'gptjax[eval]'.") from e
  from lm_eval.utils import make_table  # pylint: disable=import-outside-toplevel
  params, graphdef, tokenizer, step = language_model(f.workdir, f.step, inference_mesh())
  lm = harness.GptjaxLM(params, graphdef, tokenizer, f.batch_size, weights=f.weights or None)
  limit = None if f.limit is None else (int(f.limit) if f.limit >= 1 else f.limit)
  results = harness.run_tasks(lm, f.tasks, f.num_fewshot, limit, f.include_path, f.log_samples)
  print(f"step {step} of {f.workdir}", file=sys.stderr)
  print(make_table(results), file=sys.stderr)
  if f.output_path and jax.process_index() == 0:
    paths.makedirs(f.output_path)
    samples = results.pop("samples", {})
    paths.write_json(paths.join(f.output_path, "results.json"), json.loads(json.dumps(results, default=str)))
    for task, rows in samples.items():
      with paths.atomic_write(paths.join(f.output_path, f"samples_{task}.jsonl")) as out:
        out.writelines(json.dumps(row, default=str, ensure_ascii=False) + "\n" for row in rows)
  print(json.dumps(results["results"], default=str))


def main(argv):
  del argv
  from gptjax import data, loader, paths
  from gptjax.finetune import job as finetune_job, store
  cli.quiet_libraries()
  f = flags.FLAGS
  if bool(f.data) == bool(f.tasks):
    raise app.UsageError("give either --data (text files to score) or --tasks (lm-evaluation-harness tasks).")
  if f.tasks:
    cli.initialize_distributed()
    _harness_main(f)
    return
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
  flags.DEFINE_list("data", None, "Text to score: files, directories or globs, comma-separated.")
  flags.DEFINE_list("tasks", None, "lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy).")
  flags.DEFINE_integer("num_fewshot", None, "Harness: examples in each prompt (default: each task's own).")
  flags.DEFINE_float("limit", None, "Harness: at most this many documents per task (< 1: a fraction of them).")
  flags.DEFINE_string("include_path", None, "Harness: a directory of task YAML files (local copies of tasks).")
  flags.DEFINE_string("output_path", None, "Harness: directory for results.json (and samples_<task>.jsonl).")
  flags.DEFINE_bool("log_samples", False, "Harness: also write every scored document (with --output_path).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest readable one).")
  flags.DEFINE_integer("batch_size", 8, "Windows of block_size tokens, or harness requests, per batch.")
  flags.DEFINE_enum("weights", "", ["", "bfloat16", "int8"],
                    "Score with the weight matrices stored narrow, as `gptjax.sample --weights` decodes.")
  flags.DEFINE_string("out", None, "Fine-tuned models: directory for report.json and predictions.jsonl "
                      "(default <workdir>/eval-<data file name>).")
  flags.DEFINE_string("base", None, "Fine-tuned LoRA models: the base to put the adapters on (default: the one "
                      "they were trained from).")
  cli.define_distributed_flags()
  cli.run(main)
