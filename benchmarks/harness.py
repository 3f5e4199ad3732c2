"""lm-evaluation-harness requests per second: gptjax's LM (`gptjax.harness`) against the harness's own `hf` backend.

  python -m benchmarks.harness [--choice_docs=60 --rolling_docs=100 --generate_docs=100 --batch_size=16]

The same GPT-2 small-shaped model (random weights, 124M parameters, context 1024, float32) as a transformers
directory, scored by both backends on the same three local tasks: multiple choice (HellaSwag's shape: a context of
~60 words and four endings of 10-25 words), rolling log-likelihood (documents of ~300 words) and greedy
generate_until (prompts of ~50 words, up to 32 new tokens, a stop string). Each task runs once per backend, in a
fresh harness evaluation (compilation included; the model is loaded before), and the time inside the backend's
request methods is printed beside it (the rest, building the task's requests and metrics, is the harness's and the
same for both); requests per second count the harness's requests (one per ending for multiple choice). The words come from ../shared/data/tinyshakespeare.txt when it is
there, else from a synthetic vocabulary; the tokenizer is a byte-level BPE trained on them (the model keeps GPT-2's
50257-token vocabulary). The metrics of both backends are printed side by side: they must agree.
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks.common import report
from gptjax import evaluate, harness

_CHOICE_DOCS = flags.DEFINE_integer("choice_docs", 60, "Multiple-choice documents (4 requests each).")
_ROLLING_DOCS = flags.DEFINE_integer("rolling_docs", 100, "Rolling log-likelihood documents.")
_GENERATE_DOCS = flags.DEFINE_integer("generate_docs", 100, "generate_until prompts.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Requests per batch, both backends.")
_SHAKESPEARE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                            "tinyshakespeare.txt")


def _words() -> list[str]:
  if os.path.exists(_SHAKESPEARE):
    with open(_SHAKESPEARE, encoding="utf-8") as f:  # the benchmark's own fixed data file
      return f.read().split()
  rng = np.random.RandomState(0)
  return [f"w{int(i)}" for i in rng.zipf(1.3, 200_000) % 5000]


def write_tasks(directory: str, words: list[str]) -> None:
  """tiny_choice, tiny_rolling and tiny_generate task YAMLs with their JSONL data in `directory`."""
  rng = np.random.RandomState(0)

  def text(n: int) -> str:
    start = rng.randint(len(words) - n)
    return " ".join(words[start:start + n])

  docs = {"choice": [{"query": text(60), "choices": [" " + text(int(rng.randint(10, 26))) for _ in range(4)],
                      "label": int(rng.randint(4))} for _ in range(_CHOICE_DOCS.value)],
          "rolling": [{"text": text(300)} for _ in range(_ROLLING_DOCS.value)],
          "generate": [{"prompt": text(50), "answer": text(3)} for _ in range(_GENERATE_DOCS.value)]}
  for name, rows in docs.items():
    with open(os.path.join(directory, f"{name}.jsonl"), "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
  specs = {"tiny_choice": ("choice", "output_type: multiple_choice\ndoc_to_text: '{{query}}'\n"
                           "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
                           "  - metric: acc_norm\n"),
           "tiny_rolling": ("rolling", "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: "
                            "'{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n"),
           "tiny_generate": ("generate", "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: "
                             "'{{answer}}'\ngeneration_kwargs:\n  until: ['\\n\\n', '.']\n  max_gen_toks: 32\n"
                             "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")}
  for task, (name, spec) in specs.items():
    with open(os.path.join(directory, f"{task}.yaml"), "w", encoding="utf-8") as f:
      f.write(f"task: {task}\n" + data.format(os.path.join(directory, f"{name}.jsonl")) + spec)


def write_model(directory: str, words: list[str]) -> None:
  """GPT-2 small's shape with random weights, and a byte-level BPE trained on `words`, as transformers saves them."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator([" ".join(words[i:i + 1000]) for i in range(0, len(words), 1000)], vocab_size=8192,
                          special_tokens=["<|endoftext|>"], show_progress=False)
  bpe.save_model(directory)
  # GPT-2's 50257 entries (unused ones past the trained tokens), so that both backends normalise over the same ids.
  with open(os.path.join(directory, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  vocab.update({f"<|unused{i}|>": i for i in range(len(vocab), 50257)})
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f)
  torch.manual_seed(0)
  config = transformers.GPT2Config(bos_token_id=0, eos_token_id=0)  # GPT-2 small; id 0 is <|endoftext|> here
  transformers.GPT2LMHeadModel(config).save_pretrained(directory)


def timed(lm, task: str, task_dir: str) -> tuple[float, float, dict]:
  """(seconds of the whole evaluation, seconds in the backend's request methods, metrics)."""
  inside = [0.0]
  for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
    method = getattr(lm, name)

    def wrapped(*args, method=method, **kwargs):
      start = time.perf_counter()
      try:
        return method(*args, **kwargs)
      finally:
        inside[0] += time.perf_counter() - start
    setattr(lm, name, wrapped)  # the harness looks the request type's method up on the instance
  start = time.perf_counter()
  results = harness.run_tasks(lm, [task], include_path=task_dir, bootstrap_iters=0)
  return time.perf_counter() - start, inside[0], harness.headline(results)


def main(argv):
  del argv
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  words = _words()
  with tempfile.TemporaryDirectory() as tmp:
    task_dir, model_dir = os.path.join(tmp, "tasks"), os.path.join(tmp, "model")
    os.makedirs(task_dir)
    os.makedirs(model_dir)
    write_tasks(task_dir, words)
    write_model(model_dir, words)
    requests = {"tiny_choice": 4 * _CHOICE_DOCS.value, "tiny_rolling": _ROLLING_DOCS.value,
                "tiny_generate": _GENERATE_DOCS.value}
    harness.load_tasks(list(requests), task_dir)  # the harness's task index, built once (untimed) for both
    rows, result = [], {"torch_threads": torch.get_num_threads(), "batch_size": _BATCH_SIZE.value}
    for task, n in requests.items():
      params, graphdef, tokenizer, _ = evaluate.language_model(f"hf:{model_dir}")
      ours_s, ours_model_s, ours = timed(harness.GptjaxLM(params, graphdef, tokenizer, _BATCH_SIZE.value,
                                                          progress=False), task, task_dir)
      hf_model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
      hf_lm = HFLM(pretrained=hf_model, tokenizer=transformers.GPT2TokenizerFast.from_pretrained(model_dir),
                   batch_size=_BATCH_SIZE.value)
      hf_s, hf_model_s, theirs = timed(hf_lm, task, task_dir)
      rows.append((task, f"{n} requests: gptjax {ours_s:.1f} s ({n / ours_s:.2f}/s) | hf {hf_s:.1f} s "
                         f"({n / hf_s:.2f}/s) | ratio {hf_s / ours_s:.2f}x; in the backends' request methods "
                         f"{ours_model_s:.1f} s and {hf_model_s:.1f} s ({hf_model_s / ours_model_s:.2f}x)"))
      rows.append(("", f"metrics: gptjax {ours} | hf {theirs}"))
      result[task] = {"requests": n, "gptjax_s": ours_s, "hf_s": hf_s, "ratio": hf_s / ours_s,
                      "gptjax_model_s": ours_model_s, "hf_model_s": hf_model_s, "gptjax": ours, "hf": theirs}
    total_ours = sum(result[t]["gptjax_s"] for t in requests)
    total_hf = sum(result[t]["hf_s"] for t in requests)
    rows.append(("all tasks", f"{sum(requests.values())} requests: gptjax {total_ours:.1f} s | hf {total_hf:.1f} s |"
                              f" ratio {total_hf / total_ours:.2f}x"))
    result["ratio"] = total_hf / total_ours
    report(rows, result)


if __name__ == "__main__":
  app.run(main)
