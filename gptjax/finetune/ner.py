"""Token classification (NER): the CoNLL reader, subword label alignment, a per-token head, entity metrics.

Each word is encoded on its own with a leading space (as in running text) and its label sits on one subword, by
default its last: a causal model's last subword of a word has read the whole word, while its first is often one
letter (" H" of " H|uss|ain" in an 8k BPE). `task.label_subword='first'` puts it on the first subword that is more
than that space, as BERT-style taggers do. The other subwords are ignored in the loss and in scoring.
A causal model's word has not seen what follows ("New" before "York"), so by default the sentence is given twice,
`echo`: words EOS words, and the labels sit on the second copy, whose tokens have seen the whole sentence (the trick
of "echo embeddings", Springer et al. 2024). The sequence costs twice the tokens; `task.echo=False` turns it off.
Where both copies do not fit max_len, the first copy is shortened, never the scored one.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import paths
from gptjax.errors import UserError
from gptjax.finetune import classify, hub

_TAG = re.compile(r"^(O|[BI]-\S+)$")
IGNORE = -1  # label of positions that are not scored (later subwords, the first copy, padding)


class ConllError(UserError, ValueError):
  """Bad token-classification data; the message names file:line and the fix."""


@dataclasses.dataclass(frozen=True)
class Sentence:
  """A sentence's words and BIO tags, and where it starts ('file:line')."""
  words: tuple[str, ...]
  tags: tuple[str, ...]
  where: str


def read_conll(path: str, words_field: str = "tokens", tags_field: str = "ner_tags") -> list[Sentence]:
  """Sentences of a CoNLL file or of an 'hf:' dataset (a row per sentence: a list of words, a list of BIO tags)."""
  sentences = list(_dataset_sentences(path, words_field, tags_field) if hub.is_hf(path) else _file_sentences(path))
  if not sentences:
    raise ConllError(f"{path}: holds no sentences; it needs 'WORD TAG' lines (a file) or rows with words (a dataset).")
  return sentences


def _file_sentences(path: str):
  """One 'WORD [other columns] TAG' line per word, blank lines between sentences.

  -DOCSTART- lines are skipped; the tag is the last column and must be BIO ('O', 'B-TYPE' or 'I-TYPE').
  """
  words, tags, start = [], [], 0
  with paths.open_text(path) as f:
    for line_no, line in enumerate(f, 1):
      columns = line.split()
      if columns and columns[0] == "-DOCSTART-":
        continue
      if not columns:
        if words:
          yield Sentence(tuple(words), tuple(tags), f"{path}:{start}")
        words, tags = [], []
        continue
      if len(columns) < 2:
        raise ConllError(f"{path}:{line_no}: {line.strip()!r} has one column; each line must be 'WORD TAG' "
                         "(word first, BIO tag last, other columns between), sentences separated by blank lines.")
      if not _TAG.match(columns[-1]):
        raise ConllError(f"{path}:{line_no}: tag {columns[-1]!r} is not BIO ('O', 'B-TYPE' or 'I-TYPE'); "
                         "the tag must be the last column.")
      start = start if words else line_no
      words.append(columns[0])
      tags.append(columns[-1])
  if words:
    yield Sentence(tuple(words), tuple(tags), f"{path}:{start}")


def _dataset_sentences(spec: str, words_field: str, tags_field: str):
  """A sentence per row: the row's `words_field` (words) and `tags_field` (BIO tags, or their ClassLabel ids)."""
  for where, row in hub.rows(spec):
    if words_field not in row or tags_field not in row:
      raise ConllError(f"{where}: needs a words column ({words_field!r}) and a tags column ({tags_field!r}); found "
                       f"{sorted(row)}. Set task.words_field/tags_field.")
    words, tags = row[words_field], row[tags_field]
    if not (isinstance(words, (list, tuple)) and isinstance(tags, (list, tuple)) and len(words) == len(tags)):
      raise ConllError(f"{where}: {words_field!r} and {tags_field!r} must be lists of equal length (a tag per "
                       f"word); found {words!r} and {tags!r}. Set task.words_field/tags_field.")
    if not words or words[0] == "-DOCSTART-":
      continue
    bad = next((t for t in tags if not isinstance(t, str) or not _TAG.match(t)), None)
    if bad is not None:
      raise ConllError(f"{where}: tag {bad!r} is not BIO ('O', 'B-TYPE' or 'I-TYPE'); task.tags_field="
                       f"{tags_field!r} must name a column of BIO tags (or of their ids, with ClassLabel names).")
    if not all(isinstance(w, str) and w.strip() for w in words):
      raise ConllError(f"{where}: {words_field!r} holds an empty or non-string word; fix the row.")
    yield Sentence(tuple(words), tuple(tags), where)


def label_vocab(sentences: list[Sentence]) -> list[str]:
  """The training tags, sorted: tag i is labels[i]."""
  return sorted({t for s in sentences for t in s.tags})


def encode(tokenizer, sentences: list[Sentence], labels: list[str], max_len: int, echo: bool = True,
           subword: str = "last") -> dict:
  """Batchable arrays of sentences.

  'tokens' [N, max_len] (right-padded with EOS), 'lengths' [N], 'labels' [N, max_len] (the tag id on each word's
  `subword` ('last' or 'first') of the scored copy, IGNORE elsewhere), 'word_positions' [N, W] (where word i's
  label sits, -1 for words cut off by max_len and for padding). A tag not in `labels` is an error naming file:line.
  """
  index = {tag: i for i, tag in enumerate(labels)}
  blank = {}  # token id -> whether it decodes to whitespace only
  longest = max(len(s.words) for s in sentences)
  arrays = {"tokens": np.full((len(sentences), max_len), tokenizer.eos_id, np.int32),
            "lengths": np.zeros(len(sentences), np.int32),
            "labels": np.full((len(sentences), max_len), IGNORE, np.int32),
            "word_positions": np.full((len(sentences), longest), -1, np.int32)}
  for n, s in enumerate(sentences):
    unknown = [t for t in s.tags if t not in index]
    if unknown:
      raise ConllError(f"{s.where}: tag {unknown[0]!r} is not among the training tags {labels}; fix the tag or add "
                       "examples of it to the training file.")
    pieces = tokenizer.encode_batch([" " + w for w in s.words])
    ids = np.concatenate(pieces).astype(np.int32)
    lengths = np.array([len(p) for p in pieces])
    starts = np.cumsum(lengths) - lengths
    label_at = (starts + lengths - 1 if subword == "last" else
                starts + [_first_visible(tokenizer, p, blank) for p in pieces])
    # The scored copy starts after the first one and its EOS. A sentence too long for both copies keeps the whole
    # scored copy and as much of the first as fits (its late words then see less of what follows them); only one
    # too long for a single copy loses words.
    copy_len = min(len(ids), max_len - 1 if echo else max_len)
    first_len = min(len(ids), max_len - 1 - copy_len) if echo else 0
    offset = first_len + 1 if echo else 0
    row = np.concatenate([ids[:first_len], [tokenizer.eos_id], ids[:copy_len]]) if echo else ids[:copy_len]
    arrays["tokens"][n, :len(row)] = row
    arrays["lengths"][n] = len(row)
    kept = label_at < copy_len
    positions = offset + label_at[kept]
    arrays["word_positions"][n, :kept.sum()] = positions
    arrays["labels"][n, positions] = [index[t] for t in np.array(s.tags)[kept]]
  return arrays


def _first_visible(tokenizer, piece_ids: np.ndarray, blank: dict) -> int:
  """Index of a word's first subword that is not only the leading space (a char-level or rare-word tokenization
  may give the space a token of its own, which cannot tell the word)."""
  for i, token in enumerate(piece_ids):
    if token not in blank:
      blank[token] = not tokenizer.decode([token]).strip()
    if not blank[token]:
      return i
  return 0


def init_head(n_embd: int, n_tags: int, key: jax.Array, crf: bool = True, train_labels_NT=None) -> dict:
  """A per-token tag head (classify.init_head); with `crf`, also the tag transition scores 'transitions' [C + 1, C]
  (row c: the score of each tag after tag c; the last row: at the sentence start).

  Transitions start at the pointwise mutual information of consecutive training tags (`encode`'s 'labels'),
  log P(tag | previous) / P(tag), add-one smoothed; zeros without them. From zero, 3 epochs of AdamW steps of 1e-3
  move them to |0.5| at most (CoNLL-2003), far from the log-odds they need (B-PER after B-PER: about -5). The
  tag's own frequency is left out (it would count twice: the emissions' bias learns it)."""
  head = classify.init_head(n_embd, n_tags, key)
  if not crf:
    return head
  if train_labels_NT is None:
    return dict(head, transitions=jnp.zeros((n_tags + 1, n_tags), jnp.float32))
  counts = np.ones((n_tags + 1, n_tags))
  for row in np.asarray(train_labels_NT):
    tags = row[row != IGNORE]
    if len(tags):
      counts[n_tags, tags[0]] += 1
      np.add.at(counts, (tags[:-1], tags[1:]), 1)
  pmi = np.log(counts / counts.sum(1, keepdims=True)) - np.log(counts.sum(0) / counts.sum())
  return dict(head, transitions=jnp.asarray(pmi, jnp.float32))


def loss(model, head: dict, batch: dict, dropout_key: jax.Array | None, z_loss: float = 0.0
         ) -> tuple[jax.Array, jax.Array]:
  """(mean loss per labelled word, tag log-probabilities [B, T, C]) of {'tokens', 'labels', ...}.

  The loss is each word's cross-entropy, or with a CRF head (a 'transitions' entry) the linear-chain CRF's
  negative log-likelihood of the sentence's tag sequence, over its words in order. The log-probabilities are the
  words' own (emission) scores either way; `word_predictions` adds the transitions when decoding.
  """
  logits_BTC = model(batch["tokens"], dropout_key).astype(jnp.float32) @ head["kernel"] + head["bias"]
  labels_BT = batch["labels"]
  scored_BT = labels_BT != IGNORE
  words = jnp.maximum(scored_BT.sum(), 1)
  if "transitions" in head:
    nll = _crf_nll(logits_BTC, labels_BT, scored_BT, head["transitions"])
  else:
    nll = (classify.cross_entropy(logits_BTC, jnp.where(scored_BT, labels_BT, 0), z_loss) * scored_BT).sum()
  return nll / words, jax.nn.log_softmax(logits_BTC)


def _crf_nll(logits_BTC, labels_BT, scored_BT, transitions):
  """Summed -log p(tags | sentence) of a linear-chain CRF whose emissions are the labelled positions' logits."""
  # Each row's labelled positions first, in sentence order: word w of row b sits at order_BW[b, w].
  order_BW = jnp.argsort(~scored_BT, axis=1, stable=True)
  emit_BWC = jnp.take_along_axis(logits_BTC, order_BW[..., None], axis=1)
  real_BW = jnp.arange(labels_BT.shape[1]) < scored_BT.sum(1, keepdims=True)
  tags_BW = jnp.where(real_BW, jnp.take_along_axis(labels_BT, order_BW, 1), 0)
  start_C, step_CC = transitions[-1], transitions[:-1]
  # The gold sequence's score: its emissions and its transitions (padding words add nothing).
  emitted = jnp.take_along_axis(emit_BWC, tags_BW[..., None], -1)[..., 0]
  moved = step_CC[tags_BW[:, :-1], tags_BW[:, 1:]]
  gold_B = start_C[tags_BW[:, 0]] + (emitted * real_BW).sum(1) + (moved * real_BW[:, 1:]).sum(1)

  def forward(alpha_BC, inputs):  # log of the summed scores of every sequence ending in each tag
    emit_BC, real_B = inputs
    new_BC = jax.nn.logsumexp(alpha_BC[:, :, None] + step_CC, axis=1) + emit_BC
    return jnp.where(real_B[:, None], new_BC, alpha_BC), None
  alpha_BC, _ = jax.lax.scan(forward, start_C + emit_BWC[:, 0], (emit_BWC[:, 1:].swapaxes(0, 1), real_BW[:, 1:].T))
  has_words_B = real_BW[:, 0]
  return ((jax.nn.logsumexp(alpha_BC, -1) - gold_B) * has_words_B).sum()


def word_predictions(sentences: list[Sentence], word_positions_NW: np.ndarray, log_probs_NTC: np.ndarray,
                     labels: list[str], constrained: bool = True, transitions: np.ndarray | None = None
                     ) -> list[list[str]]:
  """Each sentence's predicted tags, one per word: the best sequence (Viterbi) of the words' scores plus the
  CRF's `transitions` [C + 1, C] where given, among valid BIO sequences if `constrained`; or, with neither, each
  word's most likely tag. A word cut off by max_len is predicted 'O'."""
  allowed = bio_transitions(labels) if constrained else np.ones((len(labels) + 1, len(labels)), bool)
  sequence = constrained or transitions is not None
  out = []
  for s, positions, log_probs_TC in zip(sentences, word_positions_NW, log_probs_NTC):
    positions = positions[:len(s.words)]
    kept = positions[positions >= 0]
    scores_WC = log_probs_TC[kept]
    tags = viterbi(scores_WC, allowed, transitions) if sequence else scores_WC.argmax(-1)
    out.append([labels[t] for t in tags] + ["O"] * (len(s.words) - len(kept)))
  return out


def bio_transitions(labels: list[str]) -> np.ndarray:
  """allowed [C + 1, C]: row c says which tags may follow tag c; the last row is the sentence start. I-X may only
  follow B-X or I-X (as the data is annotated in IOB2); every other tag may follow anything."""
  allowed = np.ones((len(labels) + 1, len(labels)), bool)
  for j, tag in enumerate(labels):
    if tag.startswith("I-"):
      allowed[:, j] = [prev in ("B-" + tag[2:], tag) for prev in labels] + [False]
  return allowed


def viterbi(scores_WC: np.ndarray, allowed: np.ndarray, transitions: np.ndarray | None = None) -> np.ndarray:
  """The tag ids [W] with the largest summed score (the words' scores plus `transitions` [C + 1, C] between
  consecutive tags, the last row at the start) among sequences that `allowed` permits (bio_transitions)."""
  if not len(scores_WC):
    return np.zeros(0, np.int64)
  penalty = np.where(allowed, 0.0 if transitions is None else transitions, -np.inf)
  best_C = scores_WC[0] + penalty[-1]
  back_WC = np.zeros(scores_WC.shape, np.int64)
  for w in range(1, len(scores_WC)):
    candidates_CC = best_C[:, None] + penalty[:-1]  # [previous, current]
    back_WC[w] = candidates_CC.argmax(0)
    best_C = candidates_CC.max(0) + scores_WC[w]
  tags = [int(best_C.argmax())]
  for w in range(len(scores_WC) - 1, 0, -1):
    tags.append(int(back_WC[w, tags[-1]]))
  return np.array(tags[::-1])


def entities(tags) -> set[tuple[str, int, int]]:
  """(type, first, last) word spans of a BIO sequence, as seqeval reads them.

  An entity ends at O, at B-, or where the type changes; an I- that does not continue an entity of its type
  starts one (seqeval's default, lenient about I- after O).
  """
  spans, kind, first = set(), None, 0
  for i, tag in enumerate(list(tags) + ["O"]):
    prefix, _, tag_type = tag.partition("-")
    if kind is not None and (prefix != "I" or tag_type != kind):
      spans.add((kind, first, i - 1))
      kind = None
    if prefix == "B" or (prefix == "I" and kind is None):
      kind, first = tag_type, i
  return spans


def _prf(true_positives: int, predicted: int, gold: int) -> dict:
  precision = true_positives / predicted if predicted else 0.0
  recall = true_positives / gold if gold else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1, "support": gold}


def metrics(gold: list[list[str]], predicted: list[list[str]]) -> dict:
  """Token accuracy over words and entity-level micro precision/recall/F1 (exact spans), plus per entity type."""
  words = sum(len(g) for g in gold)
  correct = sum(g == p for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps))
  gold_spans = {(n,) + e for n, tags in enumerate(gold) for e in entities(tags)}
  predicted_spans = {(n,) + e for n, tags in enumerate(predicted) for e in entities(tags)}
  hits = gold_spans & predicted_spans
  per_type = {}
  for kind in sorted({e[1] for e in gold_spans | predicted_spans}):
    count = lambda spans: sum(e[1] == kind for e in spans)  # pylint: disable=cell-var-from-loop
    per_type[kind] = _prf(count(hits), count(predicted_spans), count(gold_spans))
  return {"token_accuracy": correct / max(words, 1), "words": words,
          **_prf(len(hits), len(predicted_spans), len(gold_spans)), "per_type": per_type}
