"""The fine-tuning tasks behind one interface, and the config sections (`task`, `lora`) that choose them.

A task config is `default_config()` plus `add_task_config(c)`; `python -m gptjax.main` fine-tunes when the
config has a `task` section (see configs/sst2.py, configs/conll2003_ner.py, configs/sft.py).
"""

import dataclasses
import functools
import json
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from gptjax import paths
from gptjax.config import ConfigError, data_parallel_degree, default_config
from gptjax.data.corpus import parse_hf
from gptjax.finetune import classify, hub, lora, ner, sft

def add_task_config(c: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
  """Adds the documented `task` and `lora` sections to a config (in place) and returns it."""
  c.task = t = ml_collections.ConfigDict()
  # 'classify' (a label per text), 'ner' (a BIO tag per word, CoNLL files) or 'sft' (responses to prompts).
  t.kind = kind
  # Training and evaluation data: TSV/CSV/JSONL with text and label (classify), CoNLL (ner), JSONL (sft) files, or
  # Hugging Face datasets 'hf:NAME[:CONFIG][@SPLIT]' (e.g. 'hf:stanfordnlp/sst2@validation'; pip install datasets).
  t.train_path = ""
  t.eval_path = ""
  # Classification columns ('' text column = 'text' or 'sentence', whichever the file has).
  t.text_field = ""
  t.label_field = "label"
  # NER dataset columns ('hf:' data; CoNLL files have a word and a tag per line): a list of words per row, and
  # its BIO tags (names, or ids with ClassLabel names).
  t.words_field = "tokens"
  t.tags_field = "ner_tags"
  # SFT fields: prompt/response pairs, or a list of {'role', 'content'} turns.
  t.prompt_field = "prompt"
  t.response_field = "response"
  t.messages_field = "messages"
  # Tokens per example (0 = the model's block_size); longer examples are cut (and counted in the log).
  t.max_len = 0
  # NER: give the sentence twice and label the second copy, so each word's token has seen the whole sentence.
  t.echo = True
  # NER: the subword of each word that carries its label, 'last' (it has read the whole word; for causal models)
  # or 'first' (BERT-style).
  t.label_subword = "last"
  # NER: predict the most likely valid BIO tag sequence (I-X only after B-X or I-X; Viterbi over the words' tag
  # probabilities) instead of each word's most likely tag. The report holds the other decoding's numbers too.
  t.bio_decoding = True
  # Classification: the head reads the last real token's state ('last', as GPT2ForSequenceClassification) or the
  # mean of the real tokens' states ('mean').
  t.pool = "last"
  # NER: a linear-chain CRF over the words' tags: learned transition scores, trained on the sentence's tag sequence
  # and used when decoding (CoNLL-2003 dev entity F1 0.677 -> 0.784, benchmarks/RESULTS.md); False: each word's own
  # softmax.
  t.crf = True
  # Batches' worth of shuffled rows sorted by length together, so each batch holds rows of similar length and is
  # cut to a short bucket (1 = plain shuffled batches). CoNLL-2003 train with echo, batch 32, 32: 0.97M tokens run
  # per epoch instead of 2.65M (0.65M are not padding). Off by default: where lengths follow the content (the same
  # example repeated, one label's texts all short), a batch then holds near-copies and learns less per step.
  t.group_by_length = 1
  # Passes over the training file; sets train.steps (0 = use train.steps).
  t.epochs = 3.0
  # Rows per evaluation call.
  t.eval_batch_size = 64
  # SFT: greedy responses generated for this many eval rows into predictions.jsonl.
  t.generate = 8
  # Tokens generated per SFT response.
  t.generate_tokens = 128
  # Dropout while fine-tuning (-1 = the base model's).
  t.dropout = -1.0
  # Also write the fine-tuned GPT (LoRA merged into the base) as an export: workdir/merged.
  t.export_merged = True

  c.lora = lo = ml_collections.ConfigDict()
  # Adapter rank (AdaLoRA: the initial rank, peft's init_r=12); 0 = full fine-tuning (every base parameter trained).
  lo.rank = 0
  # 'lora' (x·W + s·(x·A)·B) or 'adalora' (x·W + s·((x·P)·Λ)·Q, ranks pruned to a budget; fields below).
  lo.method = "lora"
  # Scale numerator: s = alpha / rank.
  lo.alpha = 16.0
  # Comma-separated projections that get adapters: qkv, out (attention), fc, proj (MLP); also wte (the token
  # embedding, and so the LM head tied to it), which peft adapts when a user lists it.
  lo.targets = "qkv,out,fc,proj"
  # AdaLoRA (peft's defaults): average rank per adapter at the end; steps at the full budget first; final steps
  # with the mask fixed; steps between allocations; EMA rates of the sensitivity and of its uncertainty; the
  # weight of the orthogonality regulariser on P and Q.
  lo.target_r = 8
  lo.tinit = 0
  lo.tfinal = 0
  lo.deltaT = 1
  lo.beta1 = 0.85
  lo.beta2 = 0.85
  lo.orth_reg_weight = 0.5
  # The run starts from checkpoint.init_from: a run's workdir, an export, or 'hf:<GPT-2 dir or name>'; it saves
  # a checkpoint (what is trained, the optimizer, the data position) every 100 steps, and resumes from it.
  c.checkpoint.every_steps = 100
  # The task's metrics on task.eval_path every N steps; 0 = after every epoch. checkpoint.keep_best ranks the
  # checkpoints by them (accuracy, entity F1 or SFT loss): with keep_best > 0 each evaluated step is also saved.
  c.train.eval_every = 0
  return c


# The model fields a fine-tuning run chooses; the others are the base's (checkpoint.init_from) and must be left at
# their defaults.
RUN_MODEL_FIELDS = ("dtype", "attention", "remat", "row_groups")


def ranking(task_cfg) -> tuple[str, bool]:
  """(metric, higher is better) that checkpoint.keep_best ranks a task's checkpoints by."""
  return KINDS[task_cfg.kind].ranking


def validate(config, n_devices: int) -> None:
  """ConfigErrors naming the field and the fix for task, LoRA and AdaLoRA settings that cannot work, and for
  pretraining settings that fine-tuning takes from elsewhere. Only what needs the data (AdaLoRA's schedule against
  the run's steps) is left to `check_schedule`."""
  t = config.task
  if t.kind not in KINDS:
    raise ConfigError(f"task.kind={t.kind!r}: choose one of {tuple(KINDS)}.")
  for field in ("train_path", "eval_path"):
    if not t[field]:
      raise ConfigError(f"task.{field} is empty; give the {field.split('_')[0]} file or 'hf:' dataset.")
    if hub.is_hf(t[field]):
      parse_hf(t[field], f"task.{field}")
    elif not paths.is_file(t[field]):
      raise ConfigError(f"task.{field}={t[field]!r} does not exist; give an existing file or an 'hf:NAME' dataset.")
  if not config.checkpoint.init_from:
    raise ConfigError("checkpoint.init_from is empty: fine-tuning needs a base model (a run's workdir, an export "
                      "or 'hf:<GPT-2 dir or name>').")
  _validate_model_section(config)
  lora.validate(config.lora)
  if t.label_subword not in ("first", "last"):
    raise ConfigError(f"task.label_subword={t.label_subword!r}: use 'last' (causal models) or 'first'.")
  if t.pool not in classify.POOLS:
    raise ConfigError(f"task.pool={t.pool!r}: use one of {classify.POOLS}.")
  if t.group_by_length < 1:
    raise ConfigError(f"task.group_by_length={t.group_by_length}: use 1 (plain shuffled batches) or more.")
  if t.epochs < 0 or (t.epochs == 0 and config.train.steps <= 0):
    raise ConfigError(f"task.epochs={t.epochs}, train.steps={config.train.steps}: one of them must be positive.")
  if t.max_len < 0:
    raise ConfigError(f"task.max_len={t.max_len} must be >= 0 (0 = the base model's block_size).")
  if not (t.dropout == -1 or 0 <= t.dropout < 1):
    raise ConfigError(f"task.dropout={t.dropout} must be in [0, 1), or -1 for the base model's.")
  if t.generate < 0 or t.generate_tokens < 1:
    raise ConfigError(f"task.generate={t.generate} must be >= 0 and task.generate_tokens={t.generate_tokens} >= 1.")
  dp = data_parallel_degree(config, n_devices)
  if t.eval_batch_size <= 0 or t.eval_batch_size % dp:
    raise ConfigError(f"task.eval_batch_size={t.eval_batch_size} must be a positive multiple of the data-parallel "
                      f"degree {dp} (each device scores its rows), e.g. {max(dp, 64 // dp * dp)}.")
  if config.train.z_loss and t.kind == "ner" and t.crf:
    raise ConfigError(f"train.z_loss={config.train.z_loss} acts on a softmax's normaliser; a CRF head (task.crf=True) "
                      "normalises over whole tag sequences: set train.z_loss=0 or task.crf=False.")
  if config.train.micro_batch_size == -1:
    raise ConfigError("train.micro_batch_size=-1 (search the largest that fits) is for pretraining, whose batches "
                      "have one shape; a task's batches vary in length: give a number of rows per device (0 = the "
                      "whole per-device batch at once).")


def _validate_model_section(config) -> None:
  defaults = default_config().model
  for name, value in config.model.items():
    if name in RUN_MODEL_FIELDS or name not in defaults or value == defaults[name]:
      continue
    instead = ("task.dropout (-1 = the base's)" if name == "dropout" else
               "the base's (checkpoint.init_from); fine-tune another base to change it")
    raise ConfigError(f"model.{name}={value!r}: fine-tuning does not use it (its model is the base's, with only "
                      f"model.{', model.'.join(RUN_MODEL_FIELDS)} chosen by the run); it uses {instead}.")


def check_schedule(config, steps: int) -> None:
  """AdaLoRA's phases must fit the run's `steps` (known once the training file is read, for task.epochs)."""
  lo = config.lora
  if lo.rank and lo.method == "adalora" and lo.tinit + lo.tfinal >= steps:
    raise ConfigError(f"lora.tinit={lo.tinit} + lora.tfinal={lo.tfinal} leave no rank-pruning phase in this run's "
                      f"{steps} steps: lower them (their sum must be below {steps}) or train longer (task.epochs).")


@dataclasses.dataclass(frozen=True)
class Task:
  """What the runner needs of a task."""
  read: Callable[[str], list]  # path -> examples
  label_vocab: Callable[[list], list[str]]  # training examples -> labels ([] for sft)
  encode: Callable[..., dict]  # (tokenizer, examples, labels, max_len) -> {name: [N, ...]}
  # (n_embd, labels, key, the encoded training data or None when only the shapes matter) -> head params
  init_head: Callable[[int, int, jax.Array, dict | None], dict]
  loss: Callable  # (model, head, batch, dropout_key) -> (loss, predictions)
  # (examples, labels, arrays, predictions, head params as numpy) -> (metrics, rows)
  report: Callable[..., tuple[dict, list[dict]]]
  headline: tuple[str, ...]  # metric names printed after each evaluation
  batch_keys: tuple[str, ...]  # the arrays the loss reads
  token_predictions: bool = False  # predictions are [B, T, ...] (per token), not one per row


def _classify_report(examples, labels, data, predictions_N, head):
  del head
  report = {"examples": len(examples), "labels": labels, **classify.metrics(data["labels"], predictions_N,
                                                                               len(labels))}
  rows = [{"where": e.where, "text": e.text, "label": e.label, "prediction": labels[p]}
          for e, p in zip(examples, predictions_N)]
  return report, rows


def _ner_report(sentences, labels, data, log_probs_NTC, head, constrained=True):
  transitions = np.asarray(head["transitions"]) if "transitions" in head else None
  decode = functools.partial(ner.word_predictions, sentences, data["word_positions"], log_probs_NTC, labels)
  predicted = decode(constrained, transitions)
  cut = int(sum(len(s.words) for s in sentences) - (data["word_positions"] >= 0).sum())
  gold = [list(s.tags) for s in sentences]
  # Another decoding's headline numbers too, measured on every evaluation: what the CRF's transitions buy (each
  # word's own best tag), or without a CRF what the BIO constraint buys.
  other_name = "argmax" if constrained or transitions is not None else "bio"
  other = ner.metrics(gold, decode(other_name == "bio"))
  name = "+".join(n for n, on in (("crf", transitions is not None), ("bio", constrained)) if on) or "argmax"
  report = {"sentences": len(sentences), "labels": labels, "words_cut_by_max_len": cut, "decoding": name,
            **ner.metrics(gold, predicted), other_name: {k: other[k] for k in ("token_accuracy", "f1")}}
  rows = [{"where": s.where, "words": list(s.words), "tags": list(s.tags), "predicted": p}
          for s, p in zip(sentences, predicted)]
  return report, rows


def _sft_report(conversations, labels, data, per_row_N3, head):
  del labels, data, head
  rows = [{"where": c.where, "prompt": sft.prompt_text(c.turns[:-1]), "response": c.turns[-1][1],
           "response_loss": float(nats / max(n, 1))} for c, (nats, n, _) in zip(conversations, per_row_N3)]
  return {"conversations": len(conversations), **sft.metrics(per_row_N3)}, rows


def _classify_task(task_cfg) -> Task:
  return Task(read=lambda p: classify.read_examples(p, task_cfg.text_field or None, task_cfg.label_field),
              label_vocab=classify.label_vocab, encode=classify.arrays,
              init_head=lambda n_embd, n, key, data: classify.init_head(n_embd, n, key),
              # Saved before pooling was a choice: no 'pool' field, the last token.
              loss=functools.partial(classify.loss, pool=task_cfg.get("pool", "last")), report=_classify_report,
              headline=("accuracy",), batch_keys=("tokens", "lengths", "labels"))


def _ner_task(task_cfg) -> Task:
  return Task(read=lambda p: ner.read_conll(p, task_cfg.words_field, task_cfg.tags_field),
              label_vocab=ner.label_vocab,
              encode=lambda tok, ex, labels, n: ner.encode(tok, ex, labels, n, task_cfg.echo, task_cfg.label_subword),
              # Saved before the CRF existed: no 'crf' field, a plain head.
              init_head=lambda n_embd, n_tags, key, data: ner.init_head(
                  n_embd, n_tags, key, task_cfg.get("crf", False), None if data is None else data["labels"]),
              loss=ner.loss, report=functools.partial(_ner_report, constrained=task_cfg.bio_decoding),
              headline=("token_accuracy", "f1"), batch_keys=("tokens", "labels"), token_predictions=True)


def _sft_task(task_cfg) -> Task:
  return Task(read=lambda p: sft.read_conversations(p, task_cfg.prompt_field, task_cfg.response_field,
                                                    task_cfg.messages_field),
              label_vocab=lambda examples: [], encode=lambda tok, ex, labels, n: sft.encode(tok, ex, n),
              init_head=lambda n_embd, n_labels, key, data: {}, loss=sft.loss, report=_sft_report,
              headline=("loss", "token_accuracy"), batch_keys=("tokens", "targets"))


@dataclasses.dataclass(frozen=True)
class Kind:
  """A kind of fine-tuning task (`task.kind`): its Task from the config's `task` section, and what the loop asks."""
  make: Callable[..., Task]  # (task section) -> Task
  ranking: tuple[str, bool]  # the evaluation metric checkpoint.keep_best ranks by, and whether higher is better
  language_model: bool  # the model keeps its LM head: it generates, and the harness can evaluate it


# task.kind -> its kind: validation, the loop, evaluation and the tools read this table.
KINDS = {
    "classify": Kind(_classify_task, ranking=("eval_accuracy", True), language_model=False),
    "ner": Kind(_ner_task, ranking=("eval_f1", True), language_model=False),
    "sft": Kind(_sft_task, ranking=("eval_loss", False), language_model=True),
}


def make_task(task_cfg) -> Task:
  """The Task of a config's `task` section."""
  if task_cfg.kind not in KINDS:
    raise ConfigError(f"task.kind={task_cfg.kind!r}: choose one of {tuple(KINDS)}.")
  return KINDS[task_cfg.kind].make(task_cfg)


def is_language_model(task_cfg) -> bool:
  """Whether a task's model is a language model (SFT), not a classifier or tagger."""
  return KINDS[task_cfg.kind].language_model


def write_report(out_dir: str, report: dict, rows: list[dict]) -> None:
  """out_dir/report.json (metrics) and out_dir/predictions.jsonl (one row per example)."""
  paths.write_json(os.path.join(out_dir, "report.json"), report, indent=2)
  with paths.atomic_write(os.path.join(out_dir, "predictions.jsonl")) as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")

