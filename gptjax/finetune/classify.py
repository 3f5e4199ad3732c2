"""Sequence classification: labelled-text readers, a linear head on the last real token (or on the mean of the
real tokens), and the metrics.

Rows are right-padded, so a row's last real token sits at lengths_B - 1; causal attention means its hidden state
has seen the whole text (as GPT2ForSequenceClassification does). The mean over the real tokens reads every
position's state directly, without the last one having to gather the text.
"""

import csv
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import paths
from gptjax.errors import UserError
from gptjax.finetune import hub


# Column names tried, in order, when the caller names no text column (SST-2's is 'sentence').
TEXT_FIELDS = ("text", "sentence")


class ClassifyDataError(UserError, ValueError):
  """Bad classification data; the message names file:line and the fix."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled text and where it came from ('file:line', for error messages and predictions)."""
  text: str
  label: str
  where: str


def _rows(path: str):
  """(where, {column: value}) of a .tsv, .csv or .jsonl file ('file:line'; TSV/CSV have a header row) or of a
  Hugging Face dataset ('hf:NAME@SPLIT:ROW')."""
  if hub.is_hf(path):
    yield from hub.rows(path)
    return
  suffix = os.path.splitext(path)[1].lower()
  with paths.open_text(path, newline="") as f:
    if suffix == ".jsonl":
      for line_no, line in enumerate(f, 1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise ClassifyDataError(f"{path}:{line_no}: not valid JSON ({e}); each line must be one object.") from e
          if not isinstance(row, dict):
            raise ClassifyDataError(f"{path}:{line_no}: a JSON {type(row).__name__}, not an object; write one "
                                    '{"text": ..., "label": ...} object per line.')
          yield f"{path}:{line_no}", row
    elif suffix in (".tsv", ".csv"):
      # TSV is split on tabs only: SST-2's texts contain unbalanced quotes that csv quoting would swallow.
      if suffix == ".tsv":
        records = ((line_no, line.rstrip("\r\n").split("\t")) for line_no, line in enumerate(f, 1))
      else:
        reader = csv.reader(f)
        # line_num, not a count of records: a quoted CSV field may span lines.
        records = ((reader.line_num, values) for values in reader)
      _, header = next(records, (1, None))
      if header is None:
        raise ClassifyDataError(f"{path}:1: the file is empty; it needs a header row naming the columns.")
      for line_no, values in records:
        if values and any(v.strip() for v in values):
          if len(values) != len(header):
            raise ClassifyDataError(f"{path}:{line_no}: {len(values)} columns, the header has {len(header)} "
                                    f"({header}); quote or remove the stray separators.")
          yield f"{path}:{line_no}", dict(zip(header, values))
    else:
      raise ClassifyDataError(f"{path}: unknown format {suffix!r}; use a .tsv, .csv or .jsonl file, or an "
                              "'hf:NAME[:CONFIG][@SPLIT]' dataset.")


def read_examples(path: str, text_field: str | None = None, label_field: str = "label") -> list[Example]:
  """The labelled texts of a TSV/CSV/JSONL file or an 'hf:' dataset; a bad row is an error naming where it is."""
  examples = []
  for where, row in _rows(path):
    field = text_field or next((name for name in TEXT_FIELDS if name in row), None)
    if field not in row or label_field not in row:
      raise ClassifyDataError(f"{where}: needs a text column ({text_field or ' or '.join(TEXT_FIELDS)}) and a "
                              f"label column ({label_field}); found {sorted(row)}. Set "
                              "task.text_field/label_field.")
    text, label = row[field], str(row[label_field]).strip()
    if not isinstance(text, str) or not text.strip():
      raise ClassifyDataError(f"{where}: the text is empty (or not a string); remove the line or give it text.")
    if not label:
      raise ClassifyDataError(f"{where}: the label is empty; give every example a label.")
    # Stripped: SST-2's texts end in a space that would otherwise become a token of its own.
    examples.append(Example(text.strip(), label, where))
  if not examples:
    raise ClassifyDataError(f"{path}: holds no examples.")
  return examples


def label_vocab(train_examples: list[Example]) -> list[str]:
  """The training labels, sorted: class i is labels[i]."""
  return sorted({e.label for e in train_examples})


def encode_labels(examples: list[Example], labels: list[str]) -> np.ndarray:
  """Class ids [N] of examples; a label not seen in training is an error naming file:line."""
  index = {label: i for i, label in enumerate(labels)}
  for e in examples:
    if e.label not in index:
      raise ClassifyDataError(f"{e.where}: label {e.label!r} is not among the training labels {labels}; fix the "
                              "label or add examples of it to the training file.")
  return np.array([index[e.label] for e in examples], np.int32)


def encode_texts(tokenizer, examples: list[Example], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N, max_len] right-padded with EOS, lengths [N]); longer texts keep their first max_len tokens."""
  ids = tokenizer.encode_batch([e.text for e in examples])
  tokens_NT = np.full((len(ids), max_len), tokenizer.eos_id, np.int32)
  lengths_N = np.array([min(len(x), max_len) for x in ids], np.int32)
  for i, x in enumerate(ids):
    tokens_NT[i, :lengths_N[i]] = x[:max_len]
  if (lengths_N == 0).any():
    e = examples[int(np.argmin(lengths_N))]
    raise ClassifyDataError(f"{e.where}: the text {e.text!r} encodes to no tokens; remove the line.")
  return tokens_NT, lengths_N


def init_head(n_embd: int, num_classes: int, key: jax.Array) -> dict:
  """The head's params: kernel [D, C] ~ N(0, 0.02) (GPT-2's init), bias [C] zeros."""
  return {"kernel": 0.02 * jax.random.normal(key, (n_embd, num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}


POOLS = ("last", "mean")


def head_logits(head: dict, h_BTD: jax.Array, lengths_B: jax.Array, pool: str = "last") -> jax.Array:
  """float32 class logits [B, C] from the hidden state of each row's last real token (pool='last') or from the
  mean of its real tokens' states (pool='mean')."""
  if pool == "mean":
    real_BT1 = (jnp.arange(h_BTD.shape[1])[None, :] < lengths_B[:, None])[..., None]
    pooled_BD = jnp.where(real_BT1, h_BTD.astype(jnp.float32), 0.0).sum(1) / lengths_B[:, None]
  else:
    pooled_BD = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  return pooled_BD @ head["kernel"] + head["bias"]


def cross_entropy(logits_NC: jax.Array, labels_N: jax.Array, z_loss: float = 0.0) -> jax.Array:
  """Softmax cross-entropy of each row (any leading shape) against its integer label, plus PaLM's z-loss
  z_loss * log(Z)^2 (train.z_loss)."""
  lse_N = jax.nn.logsumexp(logits_NC, -1)
  nll_N = lse_N - jnp.take_along_axis(logits_NC, labels_N[..., None], -1)[..., 0]
  return nll_N + z_loss * jnp.square(lse_N) if z_loss else nll_N


def loss(model, head: dict, batch: dict, dropout_key: jax.Array | None, pool: str = "last", z_loss: float = 0.0
         ) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy (+ train.z_loss's term), predicted classes [B]) of a batch {'tokens', 'lengths', 'labels'}."""
  logits_BC = head_logits(head, model(batch["tokens"], dropout_key), batch["lengths"], pool)
  return cross_entropy(logits_BC, batch["labels"], z_loss).mean(), logits_BC.argmax(-1)


def metrics(labels_N: np.ndarray, predictions_N: np.ndarray, num_classes: int) -> dict:
  """Accuracy, per-class precision/recall/F1/support and the confusion matrix [true, predicted].

  A class never predicted has precision 0, one never present recall 0 (as sklearn's zero_division=0).
  """
  confusion_CC = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion_CC, (labels_N, predictions_N), 1)
  true_positive_C = np.diag(confusion_CC).astype(np.float64)
  predicted_C, support_C = confusion_CC.sum(0), confusion_CC.sum(1)
  precision_C = np.divide(true_positive_C, predicted_C, out=np.zeros(num_classes), where=predicted_C > 0)
  recall_C = np.divide(true_positive_C, support_C, out=np.zeros(num_classes), where=support_C > 0)
  both_C = precision_C + recall_C
  f1_C = np.divide(2 * precision_C * recall_C, both_C, out=np.zeros(num_classes), where=both_C > 0)
  return {"accuracy": float(true_positive_C.sum() / max(len(labels_N), 1)), "precision": precision_C.tolist(),
          "recall": recall_C.tolist(), "f1": f1_C.tolist(), "support": support_C.tolist(),
          "confusion": confusion_CC.tolist()}


def arrays(tokenizer, examples: list[Example], labels: list[str], max_len: int) -> dict:
  """The batchable arrays {'tokens' [N, T], 'lengths' [N], 'labels' [N]} of examples."""
  tokens_NT, lengths_N = encode_texts(tokenizer, examples, max_len)
  return {"tokens": tokens_NT, "lengths": lengths_N, "labels": encode_labels(examples, labels)}
