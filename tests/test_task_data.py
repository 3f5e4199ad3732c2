"""Fine-tuning data from Hugging Face datasets ('hf:' specs) reads as the same examples as from files.

The `datasets` package is replaced by an in-memory stand-in: no network, and the package need not be installed.
"""

import json
import sys
import types

import pytest

from gptjax import config as config_lib
from gptjax.data.corpus import DataError
from gptjax.finetune import classify, hub, ner, sft, tasks


def ClassLabel(*names):  # pylint: disable=invalid-name  # stands for datasets.ClassLabel (what the readers use)
  return types.SimpleNamespace(names=list(names))


def List(feature):  # pylint: disable=invalid-name  # stands for datasets.List / datasets.Sequence
  return types.SimpleNamespace(feature=feature)


class Dataset(list):
  """A loaded split: its rows, and the features that describe its columns."""

  def __init__(self, rows: list[dict], features: dict):
    super().__init__(rows)
    self.features = features


@pytest.fixture
def hf_hub(monkeypatch):
  """{(name, config, split): Dataset} served by a stand-in `datasets.load_dataset`; the calls are recorded."""
  splits, calls = {}, []

  def load_dataset(name, config, split, streaming):
    calls.append((name, config, split, streaming))
    if (name, config, split) not in splits:
      raise ValueError(f"Unknown split {split!r}. Should be one of {sorted(s for n, _, s in splits if n == name)}.")
    return splits[name, config, split]
  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  return types.SimpleNamespace(splits=splits, calls=calls)


SENTENCES = ["it 's a charming journey . ", "the plot is nowhere . ", "a masterpiece four years in the making . "]
SST2_LABELS = [1, 0, 1]
SENTIMENT = ClassLabel("negative", "positive")


def test_classification_rows_read_as_the_file_does(hf_hub, tmp_path):
  hf_hub.splits["glue", "sst2", "validation"] = Dataset(
      [{"sentence": s, "label": y, "idx": i} for i, (s, y) in enumerate(zip(SENTENCES, SST2_LABELS))],
      {"sentence": None, "label": SENTIMENT, "idx": None})
  tsv = tmp_path / "dev.tsv"
  tsv.write_text("sentence\tlabel\n" + "".join(f"{s}\t{SENTIMENT.names[y]}\n" for s, y in zip(SENTENCES, SST2_LABELS)))
  config = tasks.add_task_config(config_lib.default_config(), "classify")
  from_hub = tasks.make_task(config.task).read("hf:glue:sst2@validation")
  from_file = classify.read_examples(str(tsv))
  assert [(e.text, e.label) for e in from_hub] == [(e.text, e.label) for e in from_file]
  assert [e.label for e in from_hub] == ["positive", "negative", "positive"]  # ClassLabel ids become their names
  assert [e.where for e in from_hub] == [f"hf:glue:sst2@validation:{i}" for i in range(3)]
  assert hf_hub.calls == [("glue", "sst2", "validation", False)]
  # Columns named by the config; a split without ClassLabel names keeps its values (GLUE's unlabelled -1).
  hf_hub.splits["stanfordnlp/sst2", None, "train"] = Dataset([{"review": "fine", "stars": -1}], {})
  config.task.update(text_field="review", label_field="stars")
  assert tasks.make_task(config.task).read("hf:stanfordnlp/sst2") == [
      classify.Example("fine", "-1", "hf:stanfordnlp/sst2@train:0")]


CONLL = [(["-DOCSTART-"], ["O"]), (["EU", "rejects", "German", "call"], ["B-ORG", "O", "B-MISC", "O"]),
         (["Peter", "Blackburn"], ["B-PER", "I-PER"])]
NER_TAGS = ClassLabel("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def test_ner_rows_read_as_the_conll_file_does(hf_hub, tmp_path):
  hf_hub.splits["conll2003", None, "train"] = Dataset(
      [{"id": str(i), "tokens": words, "pos_tags": [0] * len(words),
        "ner_tags": [NER_TAGS.names.index(t) for t in tags]} for i, (words, tags) in enumerate(CONLL)],
      {"id": None, "tokens": List(None), "pos_tags": [ClassLabel("NNP", "VBZ")], "ner_tags": List(NER_TAGS)})
  conll = tmp_path / "train.txt"
  conll.write_text("\n".join("".join(f"{w} NNP {t}\n" for w, t in zip(words, tags)) for words, tags in CONLL))
  config = tasks.add_task_config(config_lib.default_config(), "ner")
  from_hub = tasks.make_task(config.task).read("hf:conll2003")
  from_file = ner.read_conll(str(conll))
  assert [(s.words, s.tags) for s in from_hub] == [(s.words, s.tags) for s in from_file] == [
      (tuple(w), tuple(t)) for w, t in CONLL[1:]]
  assert [s.where for s in from_hub] == ["hf:conll2003@train:1", "hf:conll2003@train:2"]  # row 0: -DOCSTART-
  # A sequence of class ids in the old list form is named too; tags given as names are read as they are.
  assert next(hub.rows("hf:conll2003"))[1]["pos_tags"] == ["NNP"]
  hf_hub.splits["user/ner", None, "test"] = Dataset([{"words": ["Peter"], "labels": ["B-PER"]}], {})
  config.task.update(words_field="words", tags_field="labels")
  assert tasks.make_task(config.task).read("hf:user/ner@test") == [
      ner.Sentence(("Peter",), ("B-PER",), "hf:user/ner@test:0")]


def test_sft_rows_read_as_the_jsonl_file_does(hf_hub, tmp_path):
  rows = [{"prompt": "Name a colour.", "response": "Blue.", "messages": None},
          {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}], "prompt": None, "response": None}]
  hf_hub.splits["user/chat", None, "train"] = Dataset(rows, {})
  jsonl = tmp_path / "train.jsonl"
  jsonl.write_text("".join(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n" for row in rows))
  config = tasks.add_task_config(config_lib.default_config(), "sft")
  from_hub = tasks.make_task(config.task).read("hf:user/chat")
  assert [c.turns for c in from_hub] == [c.turns for c in sft.read_conversations(str(jsonl))]
  assert from_hub[1].where == "hf:user/chat@train:1"


def test_errors_name_the_columns_and_the_field_to_set(hf_hub):
  hf_hub.splits["glue", "sst2", "train"] = Dataset([{"sentence": "ok", "label": 1, "idx": 0}],
                                                    {"label": SENTIMENT})
  with pytest.raises(classify.ClassifyDataError, match=r"hf:glue:sst2@train:0: needs a text column \(review\) .*"
                     r"found \['idx', 'label', 'sentence'\]\. Set task.text_field/label_field"):
    classify.read_examples("hf:glue:sst2", text_field="review")
  hf_hub.splits["conll2003", None, "train"] = Dataset([{"tokens": ["EU"], "ner_tags": [3]}], {})
  with pytest.raises(ner.ConllError, match=r"hf:conll2003@train:0: needs a words column \('words'\) and a tags "
                     r"column \('ner_tags'\); found \['ner_tags', 'tokens'\]\. Set task.words_field/tags_field"):
    ner.read_conll("hf:conll2003", words_field="words")
  with pytest.raises(ner.ConllError, match="tag 3 is not BIO .* task.tags_field='ner_tags' must name"):
    ner.read_conll("hf:conll2003")  # class ids without ClassLabel names
  with pytest.raises(sft.SftDataError, match=r"hf:glue:sst2@train:0: needs 'prompt' and 'response', or "
                     r"'messages'; found \['idx', 'label', 'sentence'\]"):
    sft.read_conversations("hf:glue:sst2")
  with pytest.raises(DataError, match=r"task.train_path/eval_path='hf:glue:sst2@dev': the Hugging Face dataset "
                     r"'glue' \(config sst2, split 'dev'\) does not load \(ValueError: Unknown split 'dev'. Should be "
                     r"one of \['train'\]"):
    classify.read_examples("hf:glue:sst2@dev")


def test_missing_datasets_package_and_bad_specs(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(DataError, match="'hf:conll2003' needs the Hugging Face datasets package .*pip install datasets"):
    ner.read_conll("hf:conll2003")
  config = tasks.add_task_config(config_lib.default_config(), "ner")
  config.task.update(train_path="hf:conll2003", eval_path="hf:@validation")
  with pytest.raises(DataError, match=r"task.eval_path='hf:@validation': name a dataset"):
    tasks.validate(config, 1)
  # 'hf:' specs need no file (nor the package) to validate: the next check is the base model's.
  config.task.eval_path = "hf:conll2003@validation"
  with pytest.raises(ValueError, match="checkpoint.init_from is empty"):
    tasks.validate(config, 1)
