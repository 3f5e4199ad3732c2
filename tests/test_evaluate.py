"""Evaluation: windows, and loss / perplexity / bits per byte against hand computations; the evaluate and sample
CLIs end to end on one tiny trained run."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gptjax import evaluate
from gptjax.data.tokenizer import CharTokenizer
from gptjax.model import GPT, GPTConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Multi-byte characters make bytes differ from characters (tokens, with a char tokenizer).
TEXTS = ["héllo wörld, " * 9, "a € sign and plain text " * 4, "z"]


@pytest.fixture(scope="module")
def tokenizer():
  return CharTokenizer.train(TEXTS)


def _model():
  cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, block_size=16)
  graphdef, state = nnx.split(GPT(cfg, nnx.Rngs(0)))
  return graphdef, nnx.to_pure_dict(state)


def test_windows_hold_every_target_once_and_skip_end_of_text(tokenizer):
  eos = tokenizer.eos_id
  w, o, r, l, d = tokenizer.encode("world")
  windows, scored, n_bytes = evaluate.token_windows(tokenizer, ["wor", "ld"], window=3)
  # Stream: eos w o r eos l d -> 6 targets in 2 windows of 3 (+1 overlapping token); eos targets unscored.
  np.testing.assert_array_equal(windows, [[eos, w, o, r], [r, eos, l, d]])
  np.testing.assert_array_equal(scored, [[1, 1, 1], [0, 1, 1]])
  assert n_bytes == 5
  windows, scored, _ = evaluate.token_windows(tokenizer, ["worl"], window=3)
  np.testing.assert_array_equal(windows, [[eos, w, o, r], [r, l, 0, 0]])  # the tail is padded
  np.testing.assert_array_equal(scored, [[1, 1, 1], [1, 0, 0]])


def test_zeroed_model_scores_the_uniform_loss(tokenizer):
  graphdef, params = _model()
  zeros = jax.tree.map(np.zeros_like, params)
  result = evaluate.evaluate_texts(zeros, graphdef, tokenizer, TEXTS, batch_size=4)
  n_tokens, n_bytes = sum(map(len, TEXTS)), sum(len(t.encode()) for t in TEXTS)
  assert (result["tokens"], result["bytes"]) == (n_tokens, n_bytes)
  np.testing.assert_allclose(result["loss"], math.log(64), rtol=1e-6)  # every id equally likely, padding too
  np.testing.assert_allclose(result["perplexity"], 64, rtol=1e-5)
  np.testing.assert_allclose(result["bits_per_byte"], n_tokens * 6 / n_bytes, rtol=1e-6)  # log2(64) = 6


def test_unigram_model_matches_a_hand_computation(tokenizer):
  # ln_f with scale 0 outputs its bias whatever the context: every position predicts softmax(wte @ bias).
  graphdef, params = _model()
  rng = np.random.RandomState(0)
  params["ln_f"]["scale"] = np.zeros(16, np.float32)
  params["ln_f"]["bias"] = rng.normal(size=16).astype(np.float32)
  params["wte"]["embedding"] = rng.normal(size=(64, 16)).astype(np.float32)
  logits = params["wte"]["embedding"].astype(np.float64) @ params["ln_f"]["bias"]
  log_probs = logits - np.log(np.exp(logits).sum())
  targets = np.concatenate([tokenizer.encode(t) for t in TEXTS])
  nats = -log_probs[targets].sum()
  result = evaluate.evaluate_texts(params, graphdef, tokenizer, TEXTS, batch_size=3)
  np.testing.assert_allclose(result["loss"], nats / len(targets), rtol=1e-5)
  np.testing.assert_allclose(result["bits_per_byte"], nats / math.log(2) / sum(len(t.encode()) for t in TEXTS),
                             rtol=1e-5)


def test_batch_size_does_not_change_the_result(tokenizer):
  graphdef, params = _model()
  one = evaluate.evaluate_texts(params, graphdef, tokenizer, TEXTS, batch_size=1)
  many = evaluate.evaluate_texts(params, graphdef, tokenizer, TEXTS, batch_size=5)
  assert one["tokens"] == many["tokens"]
  np.testing.assert_allclose(one["loss"], many["loss"], rtol=1e-6)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny trained run (as `python -m gptjax.main` leaves it) and a held-out text file."""
  from gptjax import config as config_lib, loop
  root = tmp_path_factory.mktemp("evaluate")
  rng = np.random.RandomState(0)
  words = "the quick brown fox jumps over a lazy dog while cats sleep on warm mats".split()
  (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(2000)))
  (root / "held_out.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(50)))
  c = config_lib.default_config()
  c.model.update(n_layer=1, n_head=2, n_embd=32, block_size=32)
  c.data.update(path=str(root / "corpus.txt"), vocab_size=300)
  c.train.update(steps=20, batch_size=8, eval_every=0, warmup_steps=2, learning_rate=3e-3)
  c.checkpoint.every_steps = 0
  c.log.update(samples=0, tensorboard=False)
  loop.run(c, str(root / "run"))
  return root


@pytest.mark.slow
def test_cli_prints_the_result_as_json_last(run):
  from gptjax import loader
  result = subprocess.run([sys.executable, "-m", "gptjax.evaluate", f"--workdir={run / 'run'}",
                           f"--data={run / 'held_out.txt'}", "--batch_size=4", "--weights=int8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  loaded = loader.load_model(str(run / "run"))
  score = lambda weights: evaluate.evaluate_texts(loaded.params, loaded.graphdef, loaded.tokenizer,
                                                  [(run / "held_out.txt").read_text()], weights=weights)
  expected, float32 = score("int8"), score(None)
  assert printed["tokens"] == expected["tokens"] and printed["bytes"] == expected["bytes"]
  np.testing.assert_allclose(printed["loss"], expected["loss"], rtol=1e-5)
  # --weights=int8 is what ran: not float32's loss, and within 3% of its perplexity.
  assert printed["loss"] != float32["loss"]
  assert abs(printed["perplexity"] / float32["perplexity"] - 1) < 0.03
  assert printed["loss"] < math.log(loaded.model_cfg.vocab_size) - 1  # trained: well below uniform
  assert "evaluate" in result.stderr  # the progress bar


@pytest.mark.slow
def test_sample_cli_streams_the_library_text(run):
  from gptjax import generate, loader
  loaded = loader.load_model(str(run / "run"))
  tok = loaded.tokenizer

  def sample(*flags):
    result = subprocess.run([sys.executable, "-m", "gptjax.sample", f"--workdir={run / 'run'}", "--prompt=the quick",
                             "--max_new_tokens=24", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens/s" in result.stderr
    assert ("| weights int8 (" in result.stderr) == ("--weights=int8" in flags)
    return result.stdout

  sampling = generate.Sampling(0.8, 200, 0.9, vocab_limit=tok.vocab_size, eos_id=tok.eos_id)
  expected = generate.generate_text(loaded.params, loaded.graphdef, tok, ["the quick"], 24, sampling, seed=5)
  first = sample("--seed=5", "--top_p=0.9")
  assert first == "the quick" + expected[0] + "\n"
  assert sample("--seed=5", "--top_p=0.9", "--chunk_tokens=3") == first  # same seed, same text
  narrow = generate.generate_text(loaded.params, loaded.graphdef, tok, ["the quick"], 24, sampling, seed=5,
                                  weights="int8")
  assert sample("--seed=5", "--top_p=0.9", "--weights=int8") == "the quick" + narrow[0] + "\n"
  two = sample("--seed=5", "--top_p=0.9", "--num_samples=2")
  assert two.startswith(first[:-1] + "\n---------------\nthe quick")  # a sample does not depend on the others
