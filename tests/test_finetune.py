"""Fine-tuning: the LoRA step (frozen base), classification data, metrics against hand-computed values, and a tiny
classifier that learns a separable task. LoRA's own math: tests/test_lora.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.data.tokenizer import CharTokenizer
from gptjax import config as config_lib, train
from gptjax.finetune import classify, lora, tasks, tuning
from gptjax.model import GPT
from tests.helpers import tiny_classification_config, tiny_config, tiny_gpt

D, C, VOCAB, T = 32, 2, 32, 12  # tiny_gpt's width and vocab; classes, sequence length


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
  """(graphdef, base params, train state, frozen, the loop's jitted step) of a classifier on tiny_gpt."""
  graphdef, params = tiny_gpt()
  params = jax.tree.map(jnp.copy, params)  # full fine-tuning donates them, and tiny_gpt's are cached
  head = classify.init_head(D, C, jax.random.key(5))
  model_cfg = nnx.merge(graphdef, params).cfg
  trainable, frozen = tuning.split_trainable(params, head, lora_cfg, jax.random.key(6), model_cfg)
  if lora_cfg is not None:  # the model with the adapters in its forward pass
    graphdef = nnx.split(nnx.eval_shape(lambda: GPT(lora_cfg.model(model_cfg), nnx.Rngs(0))))[0]
  config = tiny_config(learning_rate=learning_rate, min_learning_rate=learning_rate, warmup_steps=0, steps=100,
                       weight_decay=0.0)
  tx = train.make_optimizer(config)
  state = train.new_state(trainable, tx)
  step = tuning.one_device_step(config, graphdef, tx, state, frozen, classify.loss, lora_cfg)
  run = lambda state, batch: step(state, jax.tree.map(lambda x: x[None], batch), *([frozen] if frozen else []))
  return graphdef, params, state, frozen, run


def test_lora_step_changes_only_adapters_and_head():
  lora_cfg = lora.LoraConfig(rank=4, alpha=8.0)
  graphdef, params, state, frozen, step = _setup(lora_cfg)
  base_before = jax.tree.map(np.array, params)
  head_before, a_before = np.array(state["params"]["head"]["kernel"]), jax.tree.map(np.array, state["params"])
  # Adam keeps two moments per trainable parameter and none for the frozen base.
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  assert set(state["params"]) == {"lora", "head"} and moments == 2 * lora.count(state["params"])
  state, out = step(state, _separable_task(8))
  assert np.isfinite(out["train_loss"]) and out["grad_norm"] > 0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen["base"]), base_before)
  assert np.abs(state["params"]["head"]["kernel"] - head_before).max() > 0
  adapters = {path: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]["lora"])}
  assert len(adapters) == 8  # A and B of qkv, out, fc and proj (stacked over the layers)
  for path, leaf in adapters.items():
    # With B = 0 the gradient reaches B only; A moves from the second step on.
    before = dict(jax.tree_util.tree_leaves_with_path(a_before["lora"]))[path]
    if path[-1].key == "b":
      assert np.abs(leaf).max() > 0, path
    else:
      np.testing.assert_array_equal(leaf, before)


@pytest.mark.parametrize("lora_cfg", [None, lora.LoraConfig(rank=4, alpha=16.0)], ids=["full", "lora"])
def test_tiny_classifier_learns_a_separable_task(lora_cfg, tmp_path):
  # lr 1e-2 oscillated with LoRA under --xla_cpu_max_isa=AVX2 (64/64 -> 59/64 -> 64/64); 3e-3 converges everywhere.
  graphdef, _, state, frozen, step = _setup(lora_cfg, learning_rate=3e-3)
  data = _separable_task()
  predict = tuning.make_predict(graphdef, classify.loss, lora_cfg)
  assert (np.asarray(predict(state["params"], frozen, data)) != data["labels"]).any()
  for _ in range(100):  # 100% from step ~50 on AMD EPYC (AVX-512 and AVX2, fast math or not)
    state, out = step(state, data)
  examples = [classify.Example(f"row {i}", str(y), f"synthetic:{i}") for i, y in enumerate(data["labels"])]
  predictions = tuning.predict_all(predict, state["params"], frozen, data, ("tokens", "lengths", "labels"),
                                    batch_size=24)
  report, rows = tasks.make_task(tasks.add_task_config(config_lib.default_config(), "classify").task).report(
      examples, ["0", "1"], data, predictions, {})
  tasks.write_report(str(tmp_path), report, rows)
  # Learnt, with a margin for the CPU's float order: at most 3 of 64 rows wrong, and a low training loss.
  assert report["accuracy"] >= 0.95 and float(out["train_loss"]) < 0.2, (report, float(out["train_loss"]))
  confusion = np.array(json.loads((tmp_path / "report.json").read_text())["confusion"])
  assert confusion.sum(axis=1).tolist() == [32, 32] and np.trace(confusion) == round(64 * report["accuracy"])
  lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
  assert len(lines) == 64 and json.loads(lines[3]) == {"where": "synthetic:3", "text": "row 3", "label": "1",
                                                       "prediction": str(int(predictions[3]))}
  # Only the last real token is read: changing the padding changes nothing.
  padded = dict(data, tokens=np.where(np.arange(T) < data["lengths"][:, None], data["tokens"], 7))
  np.testing.assert_array_equal(predict(state["params"], frozen, padded), predict(state["params"], frozen, data))


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


def test_head_reads_the_last_real_token_or_the_mean_of_the_real_tokens():
  rng = np.random.RandomState(0)
  h_BTD, lengths_B = rng.randn(3, T, D).astype(np.float32), np.array([1, 5, T], np.int32)
  head = {"kernel": rng.randn(D, C).astype(np.float32), "bias": rng.randn(C).astype(np.float32)}
  last = np.stack([h_BTD[b, n - 1] for b, n in enumerate(lengths_B)])
  mean = np.stack([h_BTD[b, :n].mean(0) for b, n in enumerate(lengths_B)])
  for pool, pooled in (("last", last), ("mean", mean)):
    np.testing.assert_allclose(classify.head_logits(head, jnp.asarray(h_BTD), jnp.asarray(lengths_B), pool),
                               pooled @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
  padded = h_BTD.copy()
  padded[0, 1:], padded[1, 5:] = 1e6, -1e6  # what sits after a row's text is never read
  np.testing.assert_allclose(classify.head_logits(head, jnp.asarray(padded), jnp.asarray(lengths_B), "mean"),
                             mean @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)


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


def test_fine_tuning_computes_in_the_configs_dtype_not_the_bases(tmp_path):
  """model.dtype is this run's choice (bfloat16 on a TPU): a float32 base fine-tuned with model.dtype=bfloat16 runs
  in bfloat16 (its losses differ from float32's by bf16 rounding, not by more)."""
  from gptjax import loop  # pylint: disable=import-outside-toplevel
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_classification_config(tmp_path)
    config.model.dtype = dtype
    config.log.update(every_steps=1, tensorboard=False)
    loop.run(config, str(tmp_path / dtype))
    metrics = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
    losses[dtype] = np.array([m["train_loss"] for m in metrics if "train_loss" in m])
  assert len(losses["float32"]) == 3
  assert not np.array_equal(losses["float32"], losses["bfloat16"])
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)


def test_fine_tuning_honours_row_groups(tmp_path, capsys):
  """model.row_groups is the run's: the classifier trains in two row groups, to the losses of one group."""
  from gptjax import loop  # pylint: disable=import-outside-toplevel
  losses = {}
  for groups in (1, 2):
    config = tiny_classification_config(tmp_path)
    config.model.row_groups = groups
    config.log.update(every_steps=1, tensorboard=False)
    loop.run(config, str(tmp_path / f"groups{groups}"))
    assert ("| row groups 2" in capsys.readouterr().out) == (groups == 2)
    rows = [json.loads(line) for line in (tmp_path / f"groups{groups}" / "metrics.jsonl").read_text().splitlines()]
    losses[groups] = [r[key] for r in rows for key in ("train_loss", "eval_loss") if key in r]
  assert len(losses[1]) >= 3
  np.testing.assert_allclose(losses[2], losses[1], rtol=2e-5)


def test_fine_tuning_honours_attention_and_eval_every_and_ranks_checkpoints_by_the_task_metric(tmp_path, capsys):
  """model.attention is the run's; train.eval_every=1 evaluates every step (0: every epoch); checkpoint.keep_best
  keeps the best by eval accuracy, so each evaluated step is saved with its metrics."""
  from gptjax import loop  # pylint: disable=import-outside-toplevel
  config = tiny_classification_config(tmp_path)
  config.model.attention = "xla"
  config.train.eval_every = 1
  config.checkpoint.update(keep=1, keep_best=1, every_steps=100)
  config.log.tensorboard = False
  loop.run(config, str(tmp_path / "run"))
  assert "| attention xla" in capsys.readouterr().out
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  accuracy = {r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}
  assert sorted(accuracy) == [1, 2, 3]
  best = max(sorted(accuracy, reverse=True), key=lambda step: accuracy[step])  # the latest of equals
  kept = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == sorted({best, 3})
  for step in kept:
    saved = json.loads((tmp_path / "run" / "checkpoints" / str(step) / "metrics" / "metrics").read_text())
    assert saved["eval_accuracy"] == accuracy[step]  # on disk: a resumed run still ranks it
