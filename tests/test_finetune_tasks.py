"""Fine-tuning tasks: NER alignment and metrics, SFT masks, readers' errors, and whole runs through the runner."""

import itertools
import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import task_config, tiny_config

from gptjax import checkpoint, evaluate, loader, loop
from gptjax.data import DataError
from gptjax.data.tokenizer import CharTokenizer
from gptjax.finetune import job as finetune_job, ner, sft, store, tasks, tuning
from gptjax.model import GPT, GPTConfig

WORDS = ["Paris", "London", "the", "went", "to", "Jim", "Mary", "cat", "big", "saw", "."]
TAGS = {"Paris": "B-LOC", "London": "B-LOC", "Jim": "B-PER", "Mary": "B-PER"}


def _char_tokenizer(text=" ".join(WORDS) + "EUrejctsGmanhiyo#:ASU\n"):
  return CharTokenizer.train([text])


def test_ner_labels_sit_on_each_words_last_or_first_subword():
  tok = _char_tokenizer()
  s = ner.Sentence(("EU", "rejects", "German"), ("B-ORG", "O", "B-MISC"), "f:1")
  labels = ["B-MISC", "B-ORG", "O"]
  ids = np.concatenate(tok.encode_batch([" EU", " rejects", " German"]))  # 3 + 8 + 7 characters
  # By default each word's label sits on its last subword, its last letter here (it has read the whole word).
  plain = ner.encode(tok, [s], labels, max_len=24, echo=False)
  np.testing.assert_array_equal(plain["tokens"][0, :18], ids)
  expected = np.full(24, ner.IGNORE)
  expected[[2, 10, 17]] = [1, 2, 0]
  np.testing.assert_array_equal(plain["labels"][0], expected)
  np.testing.assert_array_equal(plain["word_positions"][0], [2, 10, 17])
  # 'first': the first letter (the space before it is a token of its own here).
  first = ner.encode(tok, [s], labels, max_len=24, echo=False, subword="first")
  np.testing.assert_array_equal(first["tokens"], plain["tokens"])
  np.testing.assert_array_equal(first["word_positions"][0], [1, 4, 12])
  np.testing.assert_array_equal(first["labels"][0, [1, 4, 12]], [1, 2, 0])
  assert (first["labels"][0] != ner.IGNORE).sum() == 3
  # Echo: words EOS words; the labels move to the second copy, whose tokens have seen the whole sentence.
  echo = ner.encode(tok, [s], labels, max_len=40, echo=True)
  np.testing.assert_array_equal(echo["tokens"][0, :37], np.concatenate([ids, [tok.eos_id], ids]))
  assert echo["lengths"][0] == 37
  np.testing.assert_array_equal(np.flatnonzero(echo["labels"][0] != ner.IGNORE), [21, 29, 36])
  echo_first = ner.encode(tok, [s], labels, max_len=40, echo=True, subword="first")
  np.testing.assert_array_equal(np.flatnonzero(echo_first["labels"][0] != ner.IGNORE), [20, 23, 31])
  # Too long for two copies: the scored copy stays whole and the first copy keeps what fits (25 - 1 - 18 = 6).
  short = ner.encode(tok, [s], labels, max_len=25, echo=True)
  np.testing.assert_array_equal(short["tokens"][0], np.concatenate([ids[:6], [tok.eos_id], ids]))
  np.testing.assert_array_equal(short["word_positions"][0], [9, 17, 24])
  np.testing.assert_array_equal(short["labels"][0, [9, 17, 24]], [1, 2, 0])
  # A cut sentence keeps the words whose labelled subword fits; the rest are predicted 'O' and scored.
  cut = ner.encode(tok, [s], labels, max_len=9, echo=False, subword="first")
  np.testing.assert_array_equal(cut["word_positions"][0], [1, 4, -1])
  np.testing.assert_array_equal(ner.encode(tok, [s], labels, max_len=9, echo=False)["word_positions"][0], [2, -1, -1])
  log_probs = np.full((1, 9, 3), -5.0)
  log_probs[0, [1, 4], [1, 2]] = -0.1
  for constrained in (True, False):
    assert ner.word_predictions([s], cut["word_positions"], log_probs, labels, constrained) == [["B-ORG", "O", "O"]]


def test_bio_decoding_is_the_best_valid_sequence():
  """Viterbi under the BIO constraint equals brute force over every valid sequence; argmax may be invalid."""
  labels = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
  allowed = ner.bio_transitions(labels)
  valid = lambda seq: all(not labels[t].startswith("I-") or (i > 0 and labels[seq[i - 1]][2:] == labels[t][2:])
                          for i, t in enumerate(seq))
  rng = np.random.default_rng(0)
  for n_words in (1, 2, 4, 5):
    for _ in range(20):
      scores = np.log(rng.dirichlet(np.ones(5), n_words))
      best = max((seq for seq in itertools.product(range(5), repeat=n_words) if valid(seq)),
                 key=lambda seq: scores[np.arange(n_words), seq].sum())
      np.testing.assert_array_equal(ner.viterbi(scores, allowed), best)
  # "I-PER O I-LOC" by argmax; the best valid reading starts each entity with B-.
  scores = np.log(np.array([[0.1, 0.35, 0.05, 0.4, 0.1], [0.05, 0.05, 0.05, 0.05, 0.8],
                            [0.3, 0.05, 0.6, 0.0, 0.05]]) + 1e-9)
  assert [labels[t] for t in scores.argmax(-1)] == ["I-PER", "O", "I-LOC"]
  assert [labels[t] for t in ner.viterbi(scores, allowed)] == ["B-PER", "O", "B-LOC"]


def test_crf_viterbi_and_likelihood_equal_brute_force():
  """With learned transitions, Viterbi finds the best-scoring valid sequence and the CRF loss is exactly
  -log(exp(score(gold)) / sum over every sequence of exp(score)), per labelled word, padding rows and words ignored."""
  labels = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
  allowed = ner.bio_transitions(labels)
  rng = np.random.default_rng(1)
  transitions = rng.normal(size=(6, 5))
  score = lambda emit, seq: (transitions[-1, seq[0]] + emit[np.arange(len(seq)), seq].sum()
                             + sum(transitions[a, b] for a, b in zip(seq, seq[1:])))
  for n_words in (1, 3, 4):
    emit = rng.normal(size=(n_words, 5))
    every = list(itertools.product(range(5), repeat=n_words))
    best_valid = max((q for q in every if all(allowed[([5] + list(q))[i], t] for i, t in enumerate(q))),
                     key=lambda q: score(emit, q))
    np.testing.assert_array_equal(ner.viterbi(emit, allowed, transitions), best_valid)
    np.testing.assert_array_equal(ner.viterbi(emit, np.ones_like(allowed), transitions),
                                  max(every, key=lambda q: score(emit, q)))
  # The loss through a stand-in model whose hidden states are the emissions (identity head): two sentences of 3
  # and 2 words at scattered positions of T=6 tokens, and a row with no labelled word.
  emit_BTC = rng.normal(size=(3, 6, 5)).astype(np.float32)
  labels_BT = np.full((3, 6), ner.IGNORE)
  labels_BT[0, [1, 2, 5]] = [1, 3, 4]
  labels_BT[1, [0, 4]] = [0, 2]
  head = {"kernel": np.eye(5, dtype=np.float32), "bias": np.zeros(5, np.float32),
          "transitions": transitions.astype(np.float32)}
  loss, _ = ner.loss(lambda tokens, key: emit_BTC, head, {"tokens": None, "labels": labels_BT}, None)
  nll = 0.0
  for b, positions in ((0, [1, 2, 5]), (1, [0, 4])):
    emit = emit_BTC[b, positions].astype(np.float64)
    log_z = np.logaddexp.reduce([score(emit, q) for q in itertools.product(range(5), repeat=len(positions))])
    nll += log_z - score(emit, labels_BT[b, positions])
  np.testing.assert_allclose(float(loss), nll / 5, rtol=1e-5)
  # Without transitions: the mean per-word cross-entropy.
  plain = {k: head[k] for k in ("kernel", "bias")}
  loss, _ = ner.loss(lambda tokens, key: emit_BTC, plain, {"tokens": None, "labels": labels_BT}, None)
  log_p = emit_BTC - np.logaddexp.reduce(emit_BTC.astype(np.float64), axis=-1, keepdims=True)
  expected = -sum(log_p[b, t, labels_BT[b, t]] for b, t in zip(*np.nonzero(labels_BT != ner.IGNORE))) / 5
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_crf_transitions_start_as_the_training_tags_mutual_information():
  I = ner.IGNORE
  labels_NT = np.array([[I, 0, I, 1, 2, I], [2, I, 2, I, I, I], [I, I, I, I, I, I]])  # tags 0 1 2 / 2 2 / none
  head = ner.init_head(4, 3, jax.random.key(0), crf=True, train_labels_NT=labels_NT)
  counts = np.ones((4, 3))  # add-one; rows: after tag 0, 1, 2, at the start
  counts[0, 1] += 1
  counts[1, 2] += 1
  counts[2, 2] += 1
  counts[3, 0] += 1
  counts[3, 2] += 1
  # log P(tag | previous) - log P(tag): 0 where a tag follows another as often as it occurs at all.
  expected = np.log(counts / counts.sum(1, keepdims=True)) - np.log(counts.sum(0) / counts.sum())
  np.testing.assert_allclose(head["transitions"], expected, rtol=1e-5, atol=1e-6)
  assert head["transitions"][1, 2] > 0 > head["transitions"][1, 0]  # 1 -> 2 seen, 1 -> 0 never
  assert head["kernel"].shape == (4, 3) and not np.asarray(ner.init_head(4, 3, jax.random.key(0))["transitions"]).any()
  assert set(ner.init_head(4, 3, jax.random.key(0), crf=False)) == {"kernel", "bias"}


def test_entity_metrics_count_partial_spans_wrong():
  gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
  predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
  m = ner.metrics(gold, predicted)
  assert m["token_accuracy"] == 6 / 7 and m["words"] == 7
  # Gold PER(0-1), LOC(3), ORG(0-2); predicted PER(0) is only part of its span: 2 of 3 right each way.
  assert m["precision"] == m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
  assert m["per_type"]["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
  assert m["per_type"]["ORG"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
  # seqeval's reading of sloppy BIO: I- after O starts an entity; a type change ends one; B- splits.
  assert ner.entities(["O", "I-LOC", "I-LOC", "I-PER", "B-PER", "B-PER", "I-PER"]) == {
      ("LOC", 1, 2), ("PER", 3, 3), ("PER", 4, 4), ("PER", 5, 6)}
  wrong_type = ner.metrics([["B-LOC", "I-LOC"]], [["B-ORG", "I-ORG"]])
  assert (wrong_type["token_accuracy"], wrong_type["f1"]) == (0.0, 0.0)


def test_conll_errors_name_file_and_line(tmp_path):
  good = tmp_path / "good.txt"
  good.write_text("-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\n\nPeter B-PER\n")
  sentences = ner.read_conll(str(good))
  assert [(s.words, s.tags, s.where) for s in sentences] == [
      (("EU", "rejects"), ("B-ORG", "O"), f"{good}:3"), (("Peter",), ("B-PER",), f"{good}:7")]
  one_column = tmp_path / "one.txt"
  one_column.write_text("EU B-ORG\nrejects\n")
  with pytest.raises(ner.ConllError, match=f"{one_column}:2: 'rejects' has one column"):
    ner.read_conll(str(one_column))
  bad_tag = tmp_path / "tag.txt"
  bad_tag.write_text("EU B-ORG\n\nx ORG\n")
  with pytest.raises(ner.ConllError, match=f"{bad_tag}:3: tag 'ORG' is not BIO"):
    ner.read_conll(str(bad_tag))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  with pytest.raises(ner.ConllError, match="holds no sentences"):
    ner.read_conll(str(empty))
  with pytest.raises(ner.ConllError, match=f"{good}:7: tag 'B-PER' is not among the training tags"):
    ner.encode(_char_tokenizer(), sentences, ["B-ORG", "O"], 16)


def test_sft_trains_on_responses_and_their_end_only(tmp_path):
  tok = _char_tokenizer()
  conversation = sft.Conversation((("user", "hi"), ("assistant", "yo")), "f:1")
  data = sft.encode(tok, [conversation], max_len=48)
  text = "### User:\nhi\n\n### Assistant:\n"
  n = len(text)
  np.testing.assert_array_equal(data["tokens"][0, :n + 3], np.concatenate([tok.encode(text), tok.encode("yo"),
                                                                           [tok.eos_id]]))
  np.testing.assert_array_equal(np.flatnonzero(data["targets"][0]), [n, n + 1, n + 2])  # 'y', 'o', EOS
  assert sft.prompt_text(conversation.turns[:-1]) == text
  with pytest.raises(sft.SftDataError, match="f:1: no response token fits in task.max_len=20"):
    sft.encode(tok, [conversation], max_len=20)

  rows = tmp_path / "chat.jsonl"
  rows.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + json.dumps(
      {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "r"}]}) + "\n")
  read = sft.read_conversations(str(rows))
  assert [c.turns for c in read] == [(("user", "a"), ("assistant", "b")),
                                     (("system", "s"), ("user", "u"), ("assistant", "r"))]
  assert read[1].where == f"{rows}:3"
  for row, message in [({"question": "a"}, ":1: needs 'prompt' and 'response'"),
                       ({"prompt": "a", "response": " "}, ":1: a assistant turn has empty"),
                       ({"messages": [{"role": "bot", "content": "x"}]}, ":1: role 'bot'"),
                       ({"messages": [{"role": "user", "content": "x"}]}, ":1: the last turn must be the assistant")]:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(sft.SftDataError, match=message):
      sft.read_conversations(str(bad))


def _base_model(tmp_path, tokenizer, block_size=64):
  """An export of a random tiny GPT with `tokenizer`: the starting point of the runs below."""
  c = tiny_config(block_size=block_size)
  vocab = -(-tokenizer.vocab_size // 8) * 8
  params = nnx.to_pure_dict(nnx.state(GPT(GPTConfig.from_config(c.model, vocab), nnx.Rngs(0))))
  return checkpoint.write_export(str(tmp_path / "base"), params, c, tokenizer, step=0)


def _finetune(config, workdir):
  """(summary.json's contents, eval/report.json's) of a fine-tuning run through the one loop."""
  summary = loop.run(config, str(workdir)).summary
  return summary, json.loads((workdir / "eval" / "report.json").read_text())


def _write_conll(path, n, seed):
  rnd = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      f.writelines(f"{w} {TAGS.get(w, 'O')}\n" for w in rnd.choices(WORDS, k=6))
      f.write("\n")
  return str(path)


def _ner_config(tmp_path, base, rank, mesh=(-1, 1, 1), method="lora"):
  c = task_config("ner", batch_size=8, learning_rate=6e-3, mesh=mesh)
  c.task.update(train_path=_write_conll(tmp_path / "train.txt", 64, 0),
                eval_path=_write_conll(tmp_path / "dev.txt", 16, 1), epochs=4, eval_batch_size=8)
  c.checkpoint.init_from = base
  c.lora.update(rank=rank, method=method, target_r=max(rank // 2, 1))
  c.log.update(every_steps=8, tensorboard=False)
  return c


@pytest.mark.devices(8)
@pytest.mark.parametrize("rank, mesh, method", [(0, (-1, 1, 1), "lora"), (4, (2, 2, 2), "lora"),
                                                (6, (-1, 1, 1), "adalora")],
                         ids=["full-data8", "lora-2x2x2", "adalora-data8"])
def test_ner_run_learns_saves_and_reloads(tmp_path, rank, mesh, method):
  tok = _char_tokenizer()
  base = _base_model(tmp_path, tok)
  workdir = tmp_path / "run"
  summary, report = _finetune(_ner_config(tmp_path, base, rank, mesh, method), workdir)
  assert report["token_accuracy"] >= 0.95 and report["f1"] >= 0.9, report
  assert summary["eval"]["f1"] == report["f1"] and summary["eval_f1"] == report["f1"]
  assert len((workdir / "eval" / "predictions.jsonl").read_text().splitlines()) == 16

  tuned = store.load(str(workdir))
  # LoRA saves only what it trained: adapters and head, a fraction of the base.
  assert set(tuned.trainable) == ({"lora", "head"} if rank else {"base", "head"})
  if rank:
    assert summary["trainable_parameters"] < summary["base_parameters"] / 5
  # Scoring the saved model on the eval file reproduces the run's report exactly.
  again = finetune_job.evaluate_file(str(workdir), str(tmp_path / "dev.txt"), str(tmp_path / "again"))
  assert again == json.loads(json.dumps(report))
  # The merged export is the tuned GPT: same hidden states as base + adapters.
  merged = loader.load_model(str(workdir / "merged"))
  tokens = ner.encode(tok, ner.read_conll(str(tmp_path / "dev.txt")), report["labels"], 64)["tokens"][:4]
  hidden = lambda graphdef, params: np.asarray(nnx.merge(graphdef, params)(tokens))
  np.testing.assert_allclose(hidden(merged.graphdef, merged.params),
                             hidden(tuned.graphdef, tuning.model_params(tuned.trainable, tuned.frozen,
                                                                         tuned.lora_cfg)), atol=1e-5)
  if rank:  # adapters only fit the tokenizer (and base) they were trained with
    other = _base_model(tmp_path / "other", _char_tokenizer("abc"))
    with pytest.raises(ValueError, match="not the .* the adapters were trained on"):
      store.load(str(workdir), base=other)


def test_sft_and_classification_runs(tmp_path):
  tok = _char_tokenizer()
  base = _base_model(tmp_path, tok)
  pairs = [{"prompt": w, "response": w[::-1][:3]} for w in WORDS]
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs * 8))
  (tmp_path / "dev.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  c = task_config("sft", batch_size=8, learning_rate=3e-3, mesh=(-1, 1, 1))
  c.task.update(train_path=str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "dev.jsonl"), epochs=4,
                eval_batch_size=8, generate=2, generate_tokens=6)
  c.checkpoint.init_from = base
  c.log.update(every_steps=10, tensorboard=False)
  summary, report = _finetune(c, tmp_path / "sft")
  evals = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
           if "eval_loss" in line]
  # A random model's loss is ln(vocab) = 3.5 nats; the responses are learned (0.66 -> 0.80 accuracy, seed 0).
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < np.log(tok.vocab_size), evals
  assert evals[-1]["eval_token_accuracy"] >= 0.75, evals
  assert report["tokens"] == sum(len(p["response"]) + 1 for p in pairs)  # response + EOS
  rows = [json.loads(line) for line in (tmp_path / "sft" / "eval" / "predictions.jsonl").read_text().splitlines()]
  assert rows[0]["prompt"] == "### User:\nParis\n\n### Assistant:\n" and "generated" in rows[1]
  assert "generated" not in rows[2]
  # As a language model (gptjax.evaluate --tasks, the harness): the tuned weights as a plain GPT.
  params, graphdef, lm_tok, step = evaluate.language_model(str(tmp_path / "sft"))
  tuned = store.load(str(tmp_path / "sft"))
  tokens = np.asarray([tok.encode("### User:\nParis")], np.int32)
  logits = lambda model: np.asarray(model.logits(model(tokens)))
  np.testing.assert_allclose(logits(nnx.merge(graphdef, params)), logits(nnx.merge(
      tuned.graphdef, tuning.model_params(tuned.trainable, tuned.frozen, tuned.lora_cfg))), atol=1e-4)
  assert lm_tok.fingerprint == tok.fingerprint and step == tuned.step

  (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(
      f"{w} {w[0]}\t{'name' if w[0].isupper() else 'other'}\n" for w in WORDS * 16))
  c = task_config("classify", batch_size=8, learning_rate=1e-2, mesh=(-1, 1, 1))
  c.task.update(train_path=str(tmp_path / "train.tsv"), eval_path=str(tmp_path / "train.tsv"), epochs=3,
                eval_batch_size=8)
  c.checkpoint.init_from = base
  c.lora.rank = 4
  c.log.update(every_steps=10, tensorboard=False)
  report = _finetune(c, tmp_path / "cls")[1]
  assert report["accuracy"] == 1.0 and report["labels"] == ["name", "other"], report
  with pytest.raises(DataError, match="holds a classify model, not a language model"):
    evaluate.language_model(str(tmp_path / "cls"))


def test_bad_task_configs_are_rejected(tmp_path):
  c = task_config("ner")
  with pytest.raises(ValueError, match="task.train_path is empty"):
    tasks.validate(c, 1)
  c.task.update(train_path=str(tmp_path / "missing.txt"), eval_path=str(tmp_path / "missing.txt"))
  with pytest.raises(ValueError, match="missing.txt' does not exist"):
    tasks.validate(c, 1)
  (tmp_path / "t.txt").write_text("EU B-ORG\n")
  c.task.update(train_path=str(tmp_path / "t.txt"), eval_path=str(tmp_path / "t.txt"))
  with pytest.raises(ValueError, match="checkpoint.init_from is empty"):
    tasks.validate(c, 1)
  c.checkpoint.init_from = "somewhere"
  c.task.label_subword = "middle"
  with pytest.raises(ValueError, match="task.label_subword='middle': use 'last'"):
    tasks.validate(c, 1)
  c.task.label_subword = "last"
  c.task.pool = "max"
  with pytest.raises(ValueError, match=r"task.pool='max': use one of \('last', 'mean'\)"):
    tasks.validate(c, 1)
  c.task.pool = "last"
  c.train.z_loss = 1e-4
  with pytest.raises(ValueError, match=r"a CRF head \(task.crf=True\) normalises over whole tag sequences"):
    tasks.validate(c, 1)
  c.train.z_loss = 0.0
  c.task.kind = "qa"
  with pytest.raises(ValueError, match="task.kind='qa'"):
    tasks.validate(c, 1)


def test_evaluate_cli_scores_a_fine_tuned_model(tmp_path):
  base = _base_model(tmp_path, _char_tokenizer())
  workdir = tmp_path / "run"
  c = _ner_config(tmp_path, base, rank=2)
  c.task.epochs = 1
  loop.run(c, str(workdir))
  out = subprocess.run([sys.executable, "-m", "gptjax.evaluate", f"--workdir={workdir}",
                        f"--data={tmp_path / 'dev.txt'}", f"--out={tmp_path / 'cli'}"],
                       capture_output=True, text=True, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["token_accuracy"] == json.loads((workdir / "eval" / "report.json").read_text())["token_accuracy"]
  assert (tmp_path / "cli" / "predictions.jsonl").exists()


def test_length_grouped_batches_cover_each_epoch_and_resume():
  """group_by_length: each epoch still holds every row once; a batch's rows are neighbours in length within their
  draw; the order is the seed's and resumes from the iterator's state."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 200, 64).astype(np.int32)
  arrays = {"tokens": np.zeros((64, 256), np.int32), "lengths": lengths, "labels": np.arange(64, dtype=np.int32)}
  take = lambda it, n: [next(it)["labels"] for _ in range(n)]
  batches = take(finetune_job.train_batches(arrays, ("tokens", "lengths", "labels"), 4, seed=3, group=4), 32)
  for epoch in (batches[:16], batches[16:]):  # 64 rows / 4 per batch
    assert sorted(np.concatenate(epoch)) == list(range(64))
  for start in range(0, 32, 4):  # one draw of 16 rows: its 4 batches are disjoint length ranges
    spans = sorted((lengths[b].min(), lengths[b].max()) for b in batches[start:start + 4])
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))
  plain = take(finetune_job.train_batches(arrays, ("tokens", "lengths", "labels"), 4, seed=3), 16)
  padded = lambda bs: sum(tuning.bucket_length(lengths[b], 256) for b in bs)
  assert padded(batches[:16]) < padded(plain)
  it = finetune_job.train_batches(arrays, ("tokens", "lengths", "labels"), 4, seed=3, group=4)
  take(it, 5)
  resumed = finetune_job.train_batches(arrays, ("tokens", "lengths", "labels"), 4, seed=3, group=4)
  resumed.set_state(it.get_state())
  np.testing.assert_array_equal(np.stack(take(resumed, 6)), np.stack(batches[5:11]))
