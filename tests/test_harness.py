"""lm-evaluation-harness: the same numbers through gptjax as through the harness's own Hugging Face backend, on
local tasks of each request type (multiple choice, rolling log-likelihood, greedy generate_until), for an imported
transformers model and for a model trained by gptjax and exported; the `evaluate --tasks` command and its errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gptjax import config as config_lib, evaluate, hf, loop
from tests.helpers import save_hf_model, train_byte_level_bpe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
from gptjax import harness  # pylint: disable=wrong-import-position  # needs lm_eval
HFLM = pytest.importorskip("lm_eval.models.huggingface").HFLM  # needs accelerate (the peer extra)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"
CONTEXT = 64
WORDS = [f"word{i}" for i in range(40)] + ["the", "then", "there's", "wörd3", "a", "of"]
TASKS = ["tiny_choice", "tiny_rolling", "tiny_generate"]


def _sentence(rng, n) -> str:
  return " ".join(rng.choice(WORDS, n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """Three harness tasks in YAML, reading local JSON lines: one per request type."""
  directory = tmp_path_factory.mktemp("tasks")
  rng = np.random.RandomState(0)
  docs = {
      # Choices of different lengths, so acc and acc_norm (per byte) can differ.
      "choice": [{"query": _sentence(rng, 8), "choices": [" " + _sentence(rng, k) for k in (2, 5, 3, 7)],
                  "label": int(rng.randint(4))} for _ in range(12)],
      # Texts longer than the context: several rolling windows each.
      "rolling": [{"text": _sentence(rng, n)} for n in (20, 90, 150)],
      "generate": [{"prompt": _sentence(rng, n), "answer": "word1"} for n in (3, 12, 30, 5, 9)],
  }
  for name, rows in docs.items():
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory}/{{name}}.jsonl\ntest_split: test\n"
  (directory / "tiny_choice.yaml").write_text(
      "task: tiny_choice\n" + common.format(name="choice") +
      "output_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
      "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  (directory / "tiny_rolling.yaml").write_text(
      "task: tiny_rolling\n" + common.format(name="rolling") +
      "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
      "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
  (directory / "tiny_generate.yaml").write_text(
      "task: tiny_generate\n" + common.format(name="generate") +
      "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
      "generation_kwargs:\n  until: ['word word word']\n  max_gen_toks: 12\n  do_sample: false\n"
      "metric_list:\n  - metric: exact_match\n")
  return str(directory)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A random transformers GPT-2 (3 layers, context 64) with a byte-level BPE trained on the tasks' words."""
  bpe = train_byte_level_bpe(str(tmp_path_factory.mktemp("bpe")), [" ".join(WORDS)], vocab_size=300)
  directory = str(tmp_path_factory.mktemp("hf"))
  save_hf_model(directory, bpe, 3, 4, 32, CONTEXT, seed=1, eos_token=EOS)
  return directory


def _results(model, task_dir) -> dict:
  out = harness.run_tasks(model, TASKS, include_path=task_dir, log_samples=True, bootstrap_iters=0)
  generated = {d["doc"]["prompt"]: d["resps"][0][0] for d in out["samples"]["tiny_generate"]}
  return {**harness.headline(out), "generated": generated}


def _hf_backend(directory) -> "HFLM":
  model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
  return HFLM(pretrained=model, tokenizer=transformers.GPT2TokenizerFast.from_pretrained(directory), batch_size=4)


def _assert_same(ours: dict, theirs: dict):
  for task_metric in ("tiny_choice/acc", "tiny_choice/acc_norm", "tiny_generate/exact_match"):
    assert ours[task_metric] == theirs[task_metric], task_metric
  for task_metric in ("tiny_rolling/bits_per_byte", "tiny_rolling/byte_perplexity", "tiny_rolling/word_perplexity"):
    assert ours[task_metric] == pytest.approx(theirs[task_metric], rel=1e-4), task_metric
  assert ours["generated"] == theirs["generated"]
  assert any(text for text in ours["generated"].values())  # something was generated, not only stop strings


def _ours(path, batch_size=3) -> "harness.GptjaxLM":
  params, graphdef, tokenizer, _ = evaluate.language_model(path)
  return harness.GptjaxLM(params, graphdef, tokenizer, batch_size, progress=False)


def test_imported_model_scores_as_the_harness_hf_backend(hf_dir, task_dir):
  theirs = _results(_hf_backend(hf_dir), task_dir)
  ours = _results(_ours(f"hf:{hf_dir}"), task_dir)
  _assert_same(ours, theirs)
  # The scores are of a model, not of chance: the rolling log-likelihood equals the model's own sum.
  assert 0 < ours["tiny_rolling/bits_per_byte"] < 20


def test_gptjax_trained_model_scores_as_its_hf_export(hf_dir, task_dir, tmp_path):
  corpus = tmp_path / "corpus.txt"
  rng = np.random.RandomState(1)
  corpus.write_text("\n".join(_sentence(rng, 30) for _ in range(200)))
  c = config_lib.default_config()
  c.model.update(n_layer=3, n_head=4, n_embd=32, block_size=CONTEXT)
  c.data.path = str(corpus)
  c.train.update(steps=40, batch_size=8, eval_every=0, eval_batches=1, warmup_steps=0, learning_rate=1e-2)
  c.log.update(samples=0, tensorboard=False)
  c.checkpoint.init_from = f"hf:{hf_dir}"
  loop.run(c, str(tmp_path / "run"))
  hf.export_hf(str(tmp_path / "run"), str(tmp_path / "exported"))
  theirs = _results(_hf_backend(str(tmp_path / "exported")), task_dir)
  ours = _results(_ours(str(tmp_path / "run"), batch_size=5), task_dir)
  _assert_same(ours, theirs)
  # The trained model writes words, and the stop string cuts them.
  assert all(text == " " for text in ours["generated"].values()), ours["generated"]  # " word word word ..." cut
  assert ours["tiny_choice/acc"] != ours["tiny_choice/acc_norm"]


def test_score_tokens_equals_a_direct_sum(hf_dir):
  """The batched, bucketed scorer (shared contexts run once) against one unpadded forward pass per request."""
  lm = _ours(f"hf:{hf_dir}", batch_size=4)
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = nnx.merge(lm.graphdef, lm.params)
  rng = np.random.RandomState(2)
  tokens = lambda n: rng.randint(0, 300, n).tolist()
  shared, long_shared = tokens(40), tokens(60)
  # Alone: one-token context, longer than the window (cut on the left); shared contexts (run once for their
  # continuations), one of whose pairs is too long to share and runs alone.
  pairs = [(tokens(5), tokens(3)), (tokens(1), tokens(1)), (tokens(70), tokens(4)), (shared, tokens(3)),
           (shared, tokens(17)), (shared, tokens(1)), (long_shared, tokens(2)), (long_shared, tokens(4)),
           (long_shared, tokens(9))]
  for (context, continuation), (logprob, greedy) in zip(pairs, lm.score_tokens(pairs)):
    window = (context + continuation)[-(CONTEXT + 1):]
    logits = np.asarray(model.logits(model(np.asarray([window[:-1]], np.int32))))[0, :, :300]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    rows = np.arange(len(window) - 1)[-len(continuation):]
    targets = np.asarray(window[1:])[-len(continuation):]
    assert logprob == pytest.approx(float(logp[rows, targets].sum()), rel=1e-5)
    assert greedy == bool((logits[rows].argmax(-1) == targets).all())


def _evaluate(*args, env=None):
  return subprocess.run([sys.executable, "-m", "gptjax.evaluate", *args], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})},
                        timeout=600)


@pytest.mark.slow
def test_command_prints_the_harness_results(hf_dir, task_dir, tmp_path):
  out = tmp_path / "out"
  run = _evaluate(f"--workdir=hf:{hf_dir}", "--tasks=tiny_choice,tiny_rolling", f"--include_path={task_dir}",
                  "--limit=4", "--batch_size=4", f"--output_path={out}", "--log_samples")
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(run.stdout.strip().splitlines()[-1])
  assert set(results) == {"tiny_choice", "tiny_rolling"}
  assert 0 <= results["tiny_choice"]["acc,none"] <= 1 and results["tiny_rolling"]["bits_per_byte,none"] > 0
  assert "|tiny_choice" in run.stderr.replace(" ", "")  # the harness's table
  assert json.loads((out / "results.json").read_text())["results"] == results
  assert len((out / "samples_tiny_choice.jsonl").read_text().splitlines()) == 4
  # An unknown task: one error line (a task whose data cannot be read: test_harness_settings_are_validated).
  run = _evaluate(f"--workdir=hf:{hf_dir}", f"--include_path={task_dir}", "--tasks=no_such_task")
  assert run.returncode == 2 and "error: unknown harness task(s) no_such_task" in run.stderr, run.stderr[-2000:]


TINY_RUN = ["--config=configs/quickstart.py", "--config.model.n_layer=1", "--config.model.n_head=2",
            "--config.model.n_embd=32", "--config.model.block_size=32", "--config.data.vocab_size=300",
            "--config.train.batch_size=8", "--config.train.eval_every=0", "--config.train.eval_batches=1",
            "--config.log.every_steps=3", "--config.log.samples=0", "--config.train.warmup_steps=1",
            "--config.checkpoint.every_steps=3"]


def _main(*args):
  return subprocess.run([sys.executable, "-m", "gptjax.main", *TINY_RUN, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


@pytest.mark.slow
def test_harness_in_the_training_loop_logs_and_resumes(task_dir, tmp_path):
  from gptjax import plot  # pylint: disable=import-outside-toplevel
  corpus = tmp_path / "corpus.txt"
  rng = np.random.RandomState(3)
  corpus.write_text("\n".join(_sentence(rng, 20) for _ in range(300)))
  workdir = tmp_path / "run"
  harness_flags = [f"--workdir={workdir}", f"--config.data.path={corpus}", "--config.eval.harness_tasks=tiny_choice",
                   "--config.eval.harness_every=3", "--config.eval.harness_limit=6",
                   f"--config.eval.harness_include_path={task_dir}"]
  first = _main(*harness_flags, "--config.train.steps=6")
  assert first.returncode == 0, first.stderr[-3000:]
  resumed = _main(*harness_flags, "--config.train.steps=9")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = {r["step"]: r for r in rows if "harness/tiny_choice/acc" in r}
  # Every 3 steps and at each run's end (6, then 9 after the resume).
  assert sorted(logged) == [3, 6, 9]
  for row in logged.values():
    assert set(row) >= {"harness/tiny_choice/acc", "harness/tiny_choice/acc_norm"}
    assert 0 <= row["harness/tiny_choice/acc"] <= 1 and round(row["harness/tiny_choice/acc"] * 6) == pytest.approx(
        row["harness/tiny_choice/acc"] * 6)  # a fraction of the 6 documents
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["harness/tiny_choice/acc_norm"] == logged[9]["harness/tiny_choice/acc_norm"]
  assert len(plot.figure(str(workdir)).axes) >= 2  # the harness curve below the loss


def test_harness_settings_are_validated(task_dir, tmp_path):
  """Refused before any work (`loop.validate`, which `python -m gptjax.main` runs first)."""
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "gone.yaml").write_text((pathlib.Path(task_dir) / "tiny_choice.yaml").read_text().replace(
      "tiny_choice", "gone").replace("choice.jsonl", "missing.jsonl"))
  c = config_lib.default_config()
  c.eval.update(harness_tasks="nope", harness_every=3, harness_include_path=str(broken))
  with pytest.raises(harness.TaskError, match="unknown harness task"):
    loop.validate(c, 1)
  # A task whose data cannot be read (as HellaSwag without a network) is named, with the fix.
  c.eval.harness_tasks = "gone"
  with pytest.raises(harness.TaskError, match="the data of harness task 'gone' cannot be read.*--include_path"):
    loop.validate(c, 1)
  c = config_lib.default_config()
  c.eval.harness_tasks = "tiny_choice"
  with pytest.raises(config_lib.ConfigError, match="go together"):
    config_lib.validate(c, 1)
  c.eval.update(harness_tasks="", harness_every=5)
  with pytest.raises(config_lib.ConfigError, match="go together"):
    config_lib.validate(c, 1)
  c.eval.update(harness_tasks="tiny_choice", harness_limit=-1)
  with pytest.raises(config_lib.ConfigError, match="harness_limit=-1"):
    config_lib.validate(c, 1)
