"""Fine-tuning: LoRA adapters (identity at init, merge = unmerged math, frozen base), classification data,
metrics against hand-computed values, and a tiny classifier that learns a separable task."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.data.tokenizer import CharTokenizer
from gptjax import config as config_lib
from gptjax.finetune import classify, lora, tasks, trainer
from gptjax.model import GPT, GPTConfig

L, D, N, C, VOCAB, T = 2, 32, 4, 2, 32, 12


@functools.cache
def _model(scan_layers=True):
  """(graphdef, params) of a 2-layer GPT of width 32 (cached: eager NNX init takes seconds)."""
  cfg = GPTConfig(vocab_size=VOCAB, n_layer=L, n_head=N, n_embd=D, block_size=16, attention="xla",
                  scan_layers=scan_layers)
  graphdef, state = nnx.split(GPT(cfg, nnx.Rngs(0)))
  return graphdef, nnx.to_pure_dict(state)


def _random_b(adapters, seed=1):
  """Adapters with B random too, so the low-rank update is not zero."""
  key = jax.random.key(seed)
  return {path: {"a": ab["a"], "b": 0.1 * jax.random.normal(jax.random.fold_in(key, i), ab["b"].shape)}
          for i, (path, ab) in enumerate(sorted(adapters.items()))}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_at_init_leaves_outputs_unchanged(scan_layers):
  graphdef, params = _model(scan_layers)
  adapters = lora.init_adapters(params, ("qkv", "out", "fc", "proj"), 4, jax.random.key(1))
  assert len(adapters) == (4 if scan_layers else 4 * L)
  forward = jax.jit(lambda p: nnx.merge(graphdef, p)(jnp.arange(2 * T).reshape(2, T) % VOCAB))
  base_h = forward(params)
  np.testing.assert_array_equal(forward(lora.merge(params, adapters, alpha=8.0, rank=4)), base_h)
  assert np.abs(forward(lora.merge(params, _random_b(adapters), alpha=8.0, rank=4)) - base_h).max() > 1e-3


def test_merged_kernels_equal_the_unmerged_computation():
  """x through W + s*A@B, contracted as the model contracts each kernel, equals x@W + s*(x@A)@B, per layer."""
  _, params = _model()
  rank, alpha = 4, 8.0
  adapters = _random_b(lora.init_adapters(params, ("qkv", "out", "fc", "proj"), rank, jax.random.key(2)))
  merged = lora.merge(params, adapters, alpha, rank)
  x_BD = jax.random.normal(jax.random.key(3), (3, D))
  h_BF = jax.random.normal(jax.random.key(4), (3, 4 * D))
  contractions = {  # path: (input, the model's contraction of it with a layer's kernel)
      "blocks/attn/qkv_kernel": (x_BD, lambda x, w: jnp.einsum("bd,dcnh->bcnh", x, w)),
      "blocks/attn/out_kernel": (x_BD.reshape(3, N, D // N), lambda x, w: jnp.einsum("bnh,nhd->bd", x, w)),
      "blocks/mlp/fc/kernel": (x_BD, lambda x, w: x @ w),
      "blocks/mlp/proj/kernel": (h_BF, lambda x, w: x @ w)}
  at = lambda tree, path: functools.reduce(lambda node, name: node[name], path.split("/"), tree)
  for path, (x, contract) in contractions.items():
    for i in range(L):
      a_IR, b_RO = adapters[path]["a"][i], adapters[path]["b"][i]
      unmerged = contract(x, at(params, path)[i]).reshape(3, -1) + alpha / rank * (x.reshape(3, -1) @ a_IR) @ b_RO
      np.testing.assert_allclose(contract(x, at(merged, path)[i]).reshape(3, -1), unmerged, rtol=1e-5, atol=1e-5,
                                 err_msg=f"{path} layer {i}")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_trainable_parameter_count_matches_hand_computation(scan_layers):
  _, params = _model(scan_layers)
  rank = 4
  adapters = lora.init_adapters(params, ("qkv", "out", "fc", "proj"), rank, jax.random.key(0))
  # Per layer r * (in + out): qkv D -> 3D, out D -> D, fc D -> 4D, proj 4D -> D.
  per_layer = rank * ((D + 3 * D) + (D + D) + (D + 4 * D) + (4 * D + D))
  assert lora.count(adapters) == L * per_layer == 4096
  head = classify.init_head(D, C, jax.random.key(0))
  assert lora.count({"lora": adapters, "head": head}) == 4096 + D * C + C
  only_attention = lora.init_adapters(params, ("qkv", "out"), rank, jax.random.key(0))
  assert lora.count(only_attention) == L * rank * (4 * D + 2 * D)


def test_bad_lora_settings_are_rejected():
  _, params = _model()
  with pytest.raises(ValueError, match="subset of"):
    lora.init_adapters(params, ("qkv", "attn"), 4, jax.random.key(0))
  with pytest.raises(ValueError, match="rank"):
    lora.init_adapters(params, ("qkv",), 0, jax.random.key(0))
  _, unstacked = _model(scan_layers=False)
  with pytest.raises(ValueError, match="another model layout"):
    lora.merge(unstacked, lora.init_adapters(params, ("fc",), 2, jax.random.key(0)), 4.0, 2)


def _separable_task(n=64, seed=0):
  """Right-padded rows of random tokens 3..31 holding exactly one marker: token 1 (class 0) or 2 (class 1)."""
  rng = np.random.RandomState(seed)
  lengths_N = rng.randint(3, T + 1, n).astype(np.int32)
  labels_N = np.arange(n, dtype=np.int32) % C
  tokens_NT = rng.randint(3, VOCAB, (n, T)).astype(np.int32)
  for i in range(n):
    tokens_NT[i, rng.randint(lengths_N[i])] = 1 + labels_N[i]
    tokens_NT[i, lengths_N[i]:] = 0
  return {"tokens": tokens_NT, "lengths": lengths_N, "labels": labels_N}


def _setup(lora_cfg, learning_rate=3e-3):
  graphdef, params = _model()
  params = jax.tree.map(jnp.copy, params)  # full fine-tuning donates them, and _model's are cached
  head = classify.init_head(D, C, jax.random.key(5))
  trainable, frozen = trainer.split_trainable(params, head, lora_cfg, jax.random.key(6))
  tx = trainer.make_optimizer(learning_rate)
  return graphdef, params, trainer.new_state(trainable, tx), frozen, tx


def test_lora_step_changes_only_adapters_and_head():
  lora_cfg = trainer.LoraConfig(rank=4, alpha=8.0)
  graphdef, params, state, frozen, tx = _setup(lora_cfg)
  base_before = jax.tree.map(np.array, params)
  head_before, a_before = np.array(state["trainable"]["head"]["kernel"]), jax.tree.map(np.array, state["trainable"])
  # Adam keeps two moments per trainable parameter and none for the frozen base.
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  assert set(state["trainable"]) == {"lora", "head"} and moments == 2 * lora.count(state["trainable"])
  step = trainer.make_step(graphdef, tx, classify.loss, lora_cfg)
  state, out = step(state, frozen, _separable_task(8))
  assert np.isfinite(out["loss"]) and out["grad_norm"] > 0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen["base"]), base_before)
  assert np.abs(state["trainable"]["head"]["kernel"] - head_before).max() > 0
  for path, ab in state["trainable"]["lora"].items():
    # With B = 0 the gradient reaches B only; A moves from the second step on.
    assert np.abs(ab["b"]).max() > 0, path
    np.testing.assert_array_equal(ab["a"], a_before["lora"][path]["a"])


@pytest.mark.parametrize("lora_cfg", [None, trainer.LoraConfig(rank=4, alpha=16.0)], ids=["full", "lora"])
def test_tiny_classifier_learns_a_separable_task(lora_cfg, tmp_path):
  # lr 1e-2 oscillated with LoRA under --xla_cpu_max_isa=AVX2 (64/64 -> 59/64 -> 64/64); 3e-3 converges everywhere.
  graphdef, _, state, frozen, tx = _setup(lora_cfg, learning_rate=3e-3)
  data = _separable_task()
  step = trainer.make_step(graphdef, tx, classify.loss, lora_cfg)
  predict = trainer.make_predict(graphdef, classify.loss, lora_cfg)
  assert (np.asarray(predict(state["trainable"], frozen, data)) != data["labels"]).any()
  for _ in range(100):  # 100% from step ~50 on AMD EPYC (AVX-512 and AVX2, fast math or not)
    state, out = step(state, frozen, data)
  examples = [classify.Example(f"row {i}", str(y), f"synthetic:{i}") for i, y in enumerate(data["labels"])]
  predictions = trainer.predict_all(predict, state["trainable"], frozen, data, ("tokens", "lengths", "labels"),
                                    batch_size=24)
  report, rows = tasks.make_task(tasks.add_task_config(config_lib.default_config(), "classify").task).report(
      examples, ["0", "1"], data, predictions)
  tasks.write_report(str(tmp_path), report, rows)
  # Learnt, with a margin for the CPU's float order: at most 3 of 64 rows wrong, and a low training loss.
  assert report["accuracy"] >= 0.95 and float(out["loss"]) < 0.2, (report, float(out["loss"]))
  confusion = np.array(json.loads((tmp_path / "report.json").read_text())["confusion"])
  assert confusion.sum(axis=1).tolist() == [32, 32] and np.trace(confusion) == round(64 * report["accuracy"])
  lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
  assert len(lines) == 64 and json.loads(lines[3]) == {"where": "synthetic:3", "text": "row 3", "label": "1",
                                                       "prediction": str(int(predictions[3]))}
  # Only the last real token is read: changing the padding changes nothing.
  padded = dict(data, tokens=np.where(np.arange(T) < data["lengths"][:, None], data["tokens"], 7))
  np.testing.assert_array_equal(predict(state["trainable"], frozen, padded), predict(state["trainable"], frozen, data))


def test_metrics_against_hand_computed_values():
  labels = np.array([0, 0, 1, 1, 2, 2, 2])
  predictions = np.array([0, 1, 1, 1, 2, 0, 1])
  m = classify.metrics(labels, predictions, 4)
  assert m["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
  assert m["accuracy"] == pytest.approx(4 / 7)
  np.testing.assert_allclose(m["precision"], [1 / 2, 2 / 4, 1 / 1, 0])
  np.testing.assert_allclose(m["recall"], [1 / 2, 2 / 2, 1 / 3, 0])
  np.testing.assert_allclose(m["f1"], [1 / 2, 2 / 3, 1 / 2, 0])
  assert m["support"] == [2, 2, 3, 0]


def test_encode_texts_right_pads_and_truncates():
  tokenizer = CharTokenizer.train(["abcdef"])
  examples = [classify.Example(text, "x", f"f:{i}") for i, text in enumerate(["ab", "abcdef"])]
  tokens, lengths = classify.encode_texts(tokenizer, examples, max_len=4)
  eos = tokenizer.eos_id
  np.testing.assert_array_equal(tokens, [[0, 1, eos, eos], [0, 1, 2, 3]])
  np.testing.assert_array_equal(lengths, [2, 4])


def test_readers_give_examples_and_errors_name_file_and_line(tmp_path):
  tsv = tmp_path / "train.tsv"
  tsv.write_text('sentence\tlabel\na "quoted\tpos\n\nfine\tneg\n')
  examples = classify.read_examples(str(tsv))
  assert [(e.text, e.label, e.where) for e in examples] == [('a "quoted', "pos", f"{tsv}:2"),
                                                            ("fine", "neg", f"{tsv}:4")]
  labels = classify.label_vocab(examples)
  assert labels == ["neg", "pos"]
  jsonl = tmp_path / "dev.jsonl"
  jsonl.write_text('{"text": "good", "label": "pos"}\n{"text": "meh", "label": "neutral"}\n')
  with pytest.raises(classify.ClassifyDataError, match=f"{jsonl}:2: label 'neutral'"):
    classify.encode_labels(classify.read_examples(str(jsonl)), labels)
  csv_file = tmp_path / "dev.csv"
  csv_file.write_text('text,label\n"good,\nreally",pos\n  ,neg\n')
  # Line 4, not record 3: the quoted field spans lines 2-3.
  with pytest.raises(classify.ClassifyDataError, match=f"{csv_file}:4: the text is empty"):
    classify.read_examples(str(csv_file))
  with pytest.raises(classify.ClassifyDataError, match=f"{csv_file}:3: needs a text column"):
    classify.read_examples(str(csv_file), text_field="review")
  ragged = tmp_path / "ragged.tsv"
  ragged.write_text("sentence\tlabel\nx\ty\tz\n")
  with pytest.raises(classify.ClassifyDataError, match=f"{ragged}:2: 3 columns"):
    classify.read_examples(str(ragged))


def test_reads_sst2(shared_data):
  examples = classify.read_examples(str(shared_data / "sst2" / "dev.tsv"))
  with open(shared_data / "sst2" / "dev.tsv", encoding="utf-8") as f:
    assert len(examples) == sum(1 for line in f if line.strip()) - 1
  assert classify.label_vocab(examples) == ["0", "1"]
