"""Tests of the data path: exact tokenizer round-trips, caching, token files and Grain batches."""

import importlib
import json
import os
import pickle

import numpy as np
import pytest

from gptjax import config as config_lib
from gptjax import data
from gptjax.data import pipeline
from gptjax.data import tokenizer as tokenizer_lib

TRICKY = ["héllo wörld, naïve café", "中文字符和日本語のテキスト", "emoji 😀👍🏽🇫🇷 ok", "e\u0301 combining",
          "  leading", "trailing  ", "\t\tx\r\n y", "", "a\n\n\nb", "literal \u2581 block", "\x00 nul </s> <unk>"]
WORDS = ("the model reads tokens from a file and learns to predict the next one while the optimizer "
         "updates every weight of every layer in small steps def return class import").split()


def synthetic_documents(n=40, seed=0):
  """Small deterministic corpus with prose, indentation, CRLF lines and the tricky strings."""
  rng = np.random.default_rng(seed)
  syllables = ["".join(rng.choice(list("bcdfglmnprstvz"), 2)) + rng.choice(list("aeiou")) for _ in range(60)]
  words = WORDS + ["".join(rng.choice(syllables, 3)) for _ in range(300)]
  docs = []
  for i in range(n):
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 15))) for _ in range(20)]
    lines[i % 20] = "    " + lines[i % 20] + "\r"
    docs.append("\n".join(lines) + "\n" + TRICKY[i % len(TRICKY)])
  return docs


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_tokenizer_round_trips_exactly(kind, cache_dir):
  docs = synthetic_documents()
  tok = data.train_tokenizer(docs, kind, 400, cache_dir)
  assert tok.kind == kind
  unseen = []
  if kind != "char":
    assert len(tok.encode(docs[0])) < len(docs[0]) / 1.5  # learned merges, not bytes everywhere
    unseen = ["never seen: Ω ✓ 𝔘 ℵ \u2028 \ufeff"]  # byte fallback
  for text in TRICKY + ["".join(TRICKY)] + unseen:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and tok.eos_id not in ids
    assert tok.decode(ids) == text
    # EOS and ids of the padded model vocabulary are skipped.
    assert tok.decode(np.concatenate([ids, [tok.eos_id, tok.vocab_size, tok.vocab_size + 7]])) == text
  loaded = data.load_tokenizer(_only_dir(cache_dir, f"tokenizer-{kind}-"))
  assert loaded.fingerprint == tok.fingerprint and loaded.vocab_size == tok.vocab_size
  assert [list(x) for x in loaded.encode_batch(TRICKY)] == [list(tok.encode(t)) for t in TRICKY]


def _only_dir(parent, prefix):
  (name,) = [n for n in os.listdir(parent) if n.startswith(prefix)]
  return os.path.join(parent, name)


def test_char_tokenizer_rejects_unseen_characters(tmp_path):
  tok = data.train_tokenizer(["abc"], "char", 0, str(tmp_path))
  assert tok.vocab_size == 4
  with pytest.raises(data.DataError, match="'z'"):
    tok.encode("abz")


def test_tokenizer_cache_hit_does_not_retrain(tmp_path, monkeypatch):
  docs = synthetic_documents(n=20)
  first = data.train_tokenizer(docs, "bpe", 320, str(tmp_path))

  def fail(*args):
    raise AssertionError("retrained despite the cache")

  monkeypatch.setattr(tokenizer_lib.SentencePieceTokenizer, "train", fail)
  assert data.train_tokenizer(docs, "bpe", 320, str(tmp_path)).fingerprint == first.fingerprint


def test_tokenizer_vocab_too_large_for_corpus_is_capped_with_a_warning(tmp_path, caplog):
  tok = data.train_tokenizer(["a tiny corpus"] * 3, "bpe", 50000, str(tmp_path))
  assert 256 < tok.vocab_size < 50000  # byte fallback pieces plus what the corpus supports
  assert "requested data.vocab_size=50000" in caplog.text
  assert tok.decode(tok.encode("a tiny corpus, and unseen text")) == "a tiny corpus, and unseen text"


def test_builtin_documents():
  docs = data.builtin_documents()
  assert len(docs) > 1000 and sum(map(len, docs)) > 1_000_000
  assert len(set(docs)) == len(docs)
  assert data.builtin_documents() == docs


def test_read_documents(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_bytes(b"bee\r\n")
  (tmp_path / "sub" / "a.md").write_bytes(b"ay \xff!")
  (tmp_path / "skip.py").write_text("not text")
  (tmp_path / "empty.txt").write_text("")
  assert data.read_documents(str(tmp_path)) == ["bee\r\n", "ay \ufffd!"]
  assert data.read_documents(str(tmp_path / "*.txt")) == ["bee\r\n"]
  assert data.read_documents(str(tmp_path / "skip.py")) == ["not text"]


def test_read_documents_errors(tmp_path):
  with pytest.raises(data.DataError, match="does not exist"):
    data.read_documents(str(tmp_path / "missing.txt"))
  with pytest.raises(data.DataError, match="without"):
    data.read_documents(str(tmp_path))
  with pytest.raises(data.DataError, match="matches no files"):
    data.read_documents(str(tmp_path / "*.nothing"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(data.DataError, match="empty"):
    data.read_documents(str(tmp_path / "empty.txt"))


def _documents_of(path, tok):
  """Texts of a token file, split at EOS."""
  tokens = np.asarray(data.open_tokens(path))
  assert tokens[-1] == tok.eos_id
  cuts = np.flatnonzero(tokens == tok.eos_id)
  return [tok.decode(x) for x in np.split(tokens, cuts[:-1] + 1)]


def _config(path, kind, cache_dir=""):
  config = config_lib.default_config()
  config.data.path = path
  config.data.tokenizer = kind
  config.data.vocab_size = 400
  config.data.cache_dir = cache_dir
  return config


def test_prepare_splits_by_document_and_caches(tmp_path, monkeypatch):
  docs = synthetic_documents(n=12)
  for i, doc in enumerate(docs):
    (tmp_path / f"doc{i:02d}.txt").write_bytes(doc.encode())
  prepared = data.prepare(_config(str(tmp_path), "bpe"), str(tmp_path / "work"))
  train = _documents_of(prepared.train_path, prepared.tokenizer)
  val = _documents_of(prepared.val_path, prepared.tokenizer)
  assert train + val == docs and len(val) >= 1
  assert prepared.train_tokens == len(data.open_tokens(prepared.train_path))
  with open(prepared.val_path[:-4] + ".json") as f:
    sidecar = json.load(f)
  assert sidecar["dtype"] == "uint16" and sidecar["documents"] == len(val)
  assert sidecar["tokens"] == prepared.val_tokens
  assert sidecar["tokenizer_fingerprint"] == prepared.tokenizer.fingerprint

  # The package exports the function `prepare`, which hides the module of the same name.
  monkeypatch.setattr(importlib.import_module("gptjax.data.prepare"), "_write_tokens",
                      lambda *a: pytest.fail("token files rewritten despite the cache"))
  again = data.prepare(_config(str(tmp_path), "bpe"), str(tmp_path / "work"))
  assert (again.train_path, again.val_tokens) == (prepared.train_path, prepared.val_tokens)


def test_prepare_cuts_a_single_document(tmp_path):
  text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
  (tmp_path / "input.txt").write_text(text)
  prepared = data.prepare(_config(str(tmp_path / "input.txt"), "char", str(tmp_path / "cache")), "unused")
  (train,) = _documents_of(prepared.train_path, prepared.tokenizer)
  (val,) = _documents_of(prepared.val_path, prepared.tokenizer)
  assert train == text[:int(len(text) * 0.9)] and train + val == text


@pytest.fixture()
def token_file(tmp_path):
  """A token file whose token i is i: window contents show where they came from."""
  path = str(tmp_path / "train.bin")
  np.arange(10_001, dtype="<u2").tofile(path)
  with open(str(tmp_path / "train.json"), "w") as f:
    json.dump({"dtype": "uint16", "tokens": 10_001}, f)
  return path


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_are_shifted_windows_and_deterministic(token_file):
  first = _take(data.train_batches(token_file, 16, 8, seed=0, shard_index=0, shard_count=1), 3)
  for batch in first:
    assert batch.shape == (8, 17) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch[:, 1:], batch[:, :-1] + 1)  # targets = inputs shifted by one
    assert np.all(batch[:, 0] % 16 == 0)
  same = _take(data.train_batches(token_file, 16, 8, seed=0, shard_index=0, shard_count=1), 3)
  other = _take(data.train_batches(token_file, 16, 8, seed=1, shard_index=0, shard_count=1), 3)
  np.testing.assert_array_equal(np.stack(first), np.stack(same))
  assert not np.array_equal(np.stack(first), np.stack(other))


def test_train_batches_shards_are_disjoint(token_file):
  # 625 windows: 2 shards x 8 rows x 39 steps = 624 stay inside the first epoch.
  starts = [np.concatenate(_take(data.train_batches(token_file, 16, 8, 0, s, 2), 39))[:, 0] for s in (0, 1)]
  assert len(set(starts[0])) == len(set(starts[1])) == 312
  assert not set(starts[0]) & set(starts[1])
  # Together the shards read what one process with their combined batch reads.
  single = np.concatenate(_take(data.train_batches(token_file, 16, 16, 0, 0, 1), 39))[:, 0]
  assert set(single) == set(starts[0]) | set(starts[1])


def test_train_batches_resume_from_state(token_file):
  it = data.train_batches(token_file, 16, 8, seed=0, shard_index=0, shard_count=1)
  _take(it, 76)  # an epoch is 78 steps: the next batches cross into the second epoch
  state = it.get_state()
  expected = _take(it, 4)
  resumed = data.train_batches(token_file, 16, 8, seed=0, shard_index=0, shard_count=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(resumed, 4)), np.stack(expected))


def test_train_batches_in_worker_processes(token_file):
  expected = _take(data.train_batches(token_file, 16, 8, seed=0, shard_index=0, shard_count=1), 4)
  it = data.train_batches(token_file, 16, 8, seed=0, shard_index=0, shard_count=1, num_workers=1)
  got = _take(it, 2)
  state = it.get_state()
  it.close()
  resumed = data.train_batches(token_file, 16, 8, seed=0, shard_index=0, shard_count=1, num_workers=1)
  resumed.set_state(state)
  got += _take(resumed, 2)
  resumed.close()
  np.testing.assert_array_equal(np.stack(got), np.stack(expected))


def test_token_windows_pickle_without_the_memmap(token_file):
  windows = pipeline.TokenWindows(token_file, 16)
  np.testing.assert_array_equal(windows[3], np.arange(48, 65))
  pickled = pickle.dumps(windows)
  assert len(pickled) < 1000  # the tokens stay on disk
  copy = pickle.loads(pickled)
  assert len(copy) == 624  # (10000 - 16) // 16: room for the per-epoch offset
  np.testing.assert_array_equal(copy[3], windows[3])


def test_train_batches_too_few_windows(token_file):
  with pytest.raises(data.DataError, match="train.batch_size"):
    data.train_batches(token_file, 2000, 8, seed=0, shard_index=0, shard_count=1)


def test_eval_batches(token_file):
  batches = data.eval_batches(token_file, 16, 8, num_batches=100, shard_index=1, shard_count=2)
  again = data.eval_batches(token_file, 16, 8, num_batches=100, shard_index=1, shard_count=2)
  np.testing.assert_array_equal(np.stack(batches), np.stack(again))
  assert batches[0].shape == (8, 17) and batches[0].dtype == np.int32
  np.testing.assert_array_equal(batches[0][:, 0], np.arange(1, 16, 2) * 16)
  np.testing.assert_array_equal(batches[-1][:, 1:], batches[-1][:, :-1] + 1)  # wrapped around, still windows
  with pytest.raises(data.DataError, match="block_size"):
    data.eval_batches(token_file, 20_000, 1, 1, 0, 1)
