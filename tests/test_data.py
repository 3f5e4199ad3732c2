"""Tests of the data path: exact tokenizer round-trips, corpora, prepare (caching, resuming, splits, mixtures),
token sets and Grain batches."""

import concurrent.futures
import importlib
import json
import os
import pickle

import numpy as np
import pytest

from gptjax import config as config_lib
from gptjax import data
from gptjax import paths
from gptjax.data import pipeline
from gptjax.data import tokenizer as tokenizer_lib

# The package exports the function `prepare`, which hides the module of the same name.
prepare_lib = importlib.import_module("gptjax.data.prepare")

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


def _texts(path, **kwargs):
  return [text for text, _ in data.open_corpus(str(path), **kwargs).documents()]


def test_open_corpus(tmp_path, caplog):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_bytes(b"bee\r\n")
  (tmp_path / "sub" / "a.md").write_bytes(b"ay \xff!")
  (tmp_path / "skip.py").write_text("not text")
  (tmp_path / "empty.txt").write_text("")
  assert _texts(tmp_path) == ["bee\r\n", "ay \ufffd!"]
  assert "a.md is not valid UTF-8: replaced 1 undecodable" in caplog.text
  assert _texts(tmp_path / "*.txt") == ["bee\r\n"]
  assert _texts(tmp_path / "skip.py") == ["not text"]
  assert _texts(tmp_path, max_documents=1) == ["bee\r\n"]
  corpus = data.open_corpus(str(tmp_path))
  assert corpus.num_documents == 2 and corpus.size_bytes == 5 + 5
  (tmp_path / "b.txt").write_bytes(b"bee!\r\n")
  assert data.open_corpus(str(tmp_path)).fingerprint != corpus.fingerprint  # the cache key follows the content


def test_open_corpus_errors(tmp_path):
  with pytest.raises(data.DataError, match="does not exist"):
    data.open_corpus(str(tmp_path / "missing.txt"))
  with pytest.raises(data.DataError, match="without"):
    data.open_corpus(str(tmp_path))
  with pytest.raises(data.DataError, match="matches no files"):
    data.open_corpus(str(tmp_path / "*.nothing"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(data.DataError, match="empty.txt is empty"):
    data.open_corpus(str(tmp_path / "empty.txt"))
  (tmp_path / "blank.txt").write_text("")
  with pytest.raises(data.DataError, match="all 2 files"):
    data.open_corpus(str(tmp_path))
  with pytest.raises(data.DataError, match="data.format"):
    data.open_corpus(str(tmp_path), fmt="csv")


def _documents_of(path, tok):
  """Texts of a token set, split at EOS."""
  tokens = data.open_tokens(path)[:]
  assert tokens[-1] == tok.eos_id
  cuts = np.flatnonzero(tokens == tok.eos_id)
  return [tok.decode(x) for x in np.split(tokens, cuts[:-1] + 1)]


def _config(path, kind, cache_dir="", **data_fields):
  config = config_lib.default_config()
  config.data.update(path=path, tokenizer=kind, vocab_size=400, cache_dir=cache_dir, **data_fields)
  return config


def _write_docs(directory, docs):
  directory.mkdir(exist_ok=True)
  for i, doc in enumerate(docs):
    (directory / f"doc{i:02d}.txt").write_bytes(doc.encode())
  return str(directory)


def test_prepare_round_trips_documents_and_caches(tmp_path, monkeypatch):
  docs = synthetic_documents(n=25)
  path = _write_docs(tmp_path / "corpus", docs)
  prepared = data.prepare(_config(path, "bpe"), str(tmp_path / "work"))
  train = _documents_of(prepared.train_path, prepared.tokenizer)
  val = _documents_of(prepared.val_path, prepared.tokenizer)
  assert val == docs[::10]  # every 10th document, from the first: spread over the corpus
  assert train == [d for i, d in enumerate(docs) if i % 10]
  assert prepared.train_tokens == len(data.open_tokens(prepared.train_path))
  with open(prepared.val_path) as f:
    manifest = json.load(f)
  assert manifest["shards"][0]["dtype"] == "uint16" and manifest["documents"] == len(val)
  assert manifest["tokens"] == prepared.val_tokens
  assert manifest["tokenizer_fingerprint"] == prepared.tokenizer.fingerprint

  monkeypatch.setattr(prepare_lib, "_encode", lambda *a: pytest.fail("token files rewritten despite the cache"))
  again = data.prepare(_config(path, "bpe"), str(tmp_path / "work"))
  assert (again.train_path, again.val_tokens) == (prepared.train_path, prepared.val_tokens)


def test_prepare_cuts_a_single_document(tmp_path):
  text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
  (tmp_path / "input.txt").write_text(text)
  prepared = data.prepare(_config(str(tmp_path / "input.txt"), "char", str(tmp_path / "cache")), "unused")
  (train,) = _documents_of(prepared.train_path, prepared.tokenizer)
  (val,) = _documents_of(prepared.val_path, prepared.tokenizer)
  assert train == text[:int(len(text) * 0.9)] and train + val == text


def test_prepare_with_a_separate_val_path(tmp_path):
  docs = synthetic_documents(n=6)
  config = _config(_write_docs(tmp_path / "train", docs[:4]), "char", val_path=_write_docs(tmp_path / "val", docs[4:]))
  prepared = data.prepare(config, str(tmp_path / "work"))
  assert _documents_of(prepared.train_path, prepared.tokenizer) == docs[:4]
  assert _documents_of(prepared.val_path, prepared.tokenizer) == docs[4:]


def test_prepare_rejects_a_vocab_larger_than_the_model(tmp_path):
  config = _config(_write_docs(tmp_path / "corpus", synthetic_documents(n=3)), "char")
  config.model.vocab_size = 10
  with pytest.raises(config_lib.ConfigError, match="model.vocab_size=10"):
    data.prepare(config, str(tmp_path / "work"))
  assert not [p for p in os.listdir(tmp_path / "work" / "data") if p.startswith("tokens-")]  # failed before encoding


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_long_documents_encode_in_exact_pieces(kind, cache_dir, monkeypatch):
  text = "".join(synthetic_documents(n=10)) + "x\r\ny\n  z\n\n\tw\r\n\r\nv"
  tok = data.train_tokenizer([text], kind, 400, cache_dir)
  monkeypatch.setattr(prepare_lib, "_PIECE_CHARS", 50)
  pieces = [piece for piece, _ in prepare_lib._pieces(text)]
  assert len(pieces) > 100 and "".join(pieces) == text
  np.testing.assert_array_equal(np.concatenate([tok.encode(p) for p in pieces]), tok.encode(text))


def _stream(prepared):
  return [data.open_tokens(p)[:] for p in (prepared.train_path, prepared.val_path)]


def test_prepare_resumes_after_an_interruption(tmp_path, monkeypatch):
  docs = synthetic_documents(n=40)
  path = _write_docs(tmp_path / "corpus", docs)
  monkeypatch.setattr(prepare_lib, "_CHUNK_CHARS", 2000)  # one task per ~2 documents
  monkeypatch.setattr(prepare_lib, "_SHARD_TOKENS", 1500)  # a shard per few tasks
  expected = _stream(data.prepare(_config(path, "char", str(tmp_path / "once")), "unused"))
  encode, calls, interrupt_at = prepare_lib._encode_chunk, [], [8]

  def interrupted(*args):
    calls.append(1)
    if len(calls) == interrupt_at[0]:
      raise KeyboardInterrupt
    return encode(*args)
  monkeypatch.setattr(prepare_lib, "_encode_chunk", interrupted)
  cache = tmp_path / "resumed"
  with pytest.raises(KeyboardInterrupt):
    data.prepare(_config(path, "char", str(cache)), "unused")
  (tokens_dir,) = cache.glob("tokens-*")
  with open(tokens_dir / "progress.json") as f:
    finished = json.load(f)["items"]
  assert 0 < finished < 40
  (tokens_dir / ".tmp-train.bin").write_bytes(b"half-written")  # what a crash mid-shard leaves...
  calls.clear()
  interrupt_at[0] = None
  resumed = data.prepare(_config(path, "char", str(cache)), "unused")
  assert not list(tokens_dir.glob(".tmp-*"))  # ...is removed, never taken as a shard
  assert len(calls) < 20  # only the documents after the finished shards were encoded again
  for got, want in zip(_stream(resumed), expected):
    np.testing.assert_array_equal(got, want)


def test_prepare_encodes_in_worker_processes(tmp_path, monkeypatch):
  path = _write_docs(tmp_path / "corpus", synthetic_documents(n=30))
  expected = _stream(data.prepare(_config(path, "bpe", str(tmp_path / "serial")), "unused"))
  monkeypatch.setattr(prepare_lib, "_CHUNK_CHARS", 3000)
  monkeypatch.setattr(prepare_lib, "_POOL_MIN_CHARS", 5000)  # the first tasks here, the rest in the pool
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  pools = []

  class Pool(concurrent.futures.ProcessPoolExecutor):
    def __init__(self, *args, **kwargs):
      pools.append(self)
      super().__init__(*args, **kwargs)
  monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
  pooled = _stream(data.prepare(_config(path, "bpe", str(tmp_path / "pooled")), "unused"))
  assert len(pools) == 1
  for got, want in zip(pooled, expected):
    np.testing.assert_array_equal(got, want)


def test_prepare_mixture(tmp_path):
  a = _write_docs(tmp_path / "a", ["alpha " * 300 + str(i) for i in range(12)])
  b = _write_docs(tmp_path / "b", ["beta " * 300 + str(i) for i in range(12)])
  prepared = data.prepare(_config("", "char", mixture=f"{a}:0.75, {b}:0.25"), str(tmp_path / "work"))
  with open(prepared.train_path) as f:
    manifest = json.load(f)
  assert [m["weight"] for m in manifest["mixture"]] == [0.75, 0.25]
  assert prepared.train_tokens == sum(len(data.open_tokens(os.path.join(os.path.dirname(prepared.train_path),
                                                                         m["path"]))) for m in manifest["mixture"])
  tok = prepared.tokenizer
  batch = next(data.train_batches(prepared.train_path, 64, 64, seed=0))
  from_a = sum("alpha" in tok.decode(row) for row in batch)
  assert from_a == 48  # 0.75 of 64 windows: Grain's mix interleaves exactly by weight
  assert len(data.eval_batches(prepared.val_path, 64, 8, 2, 0, 1)) == 2


def test_parse_mixture():
  assert data.parse_mixture("") == []
  assert data.parse_mixture("a.txt:0.7, hf:x/y:en:0.3") == [("a.txt", 0.7), ("hf:x/y:en", 0.3)]
  for bad in ("a.txt", "a.txt:x", "a.txt:0", ":1"):
    with pytest.raises(data.DataError, match="path:weight"):
      data.parse_mixture(bad)


def write_token_set(path, tokens):
  """A token set of one shard, as prepare writes it."""
  tokens = np.asarray(tokens, "<u2")
  tokens.tofile(path[:-5] + ".bin")
  shard = {"path": os.path.basename(path[:-5]) + ".bin", "offset": 0, "tokens": len(tokens), "dtype": "uint16",
           "bytes": tokens.nbytes}
  paths.write_json(path, {"tokens": len(tokens), "shards": [shard]})
  return path


@pytest.fixture()
def token_file(tmp_path):
  """A token set whose token i is i: window contents show where they came from."""
  return write_token_set(str(tmp_path / "train.json"), np.arange(10_001))


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_are_shifted_windows_and_deterministic(token_file):
  first = _take(data.train_batches(token_file, 16, 8, seed=0), 3)
  for batch in first:
    assert batch.shape == (8, 17) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch[:, 1:], batch[:, :-1] + 1)  # targets = inputs shifted by one
    assert np.all(batch[:, 0] % 16 == 0)
  same = _take(data.train_batches(token_file, 16, 8, seed=0), 3)
  other = _take(data.train_batches(token_file, 16, 8, seed=1), 3)
  np.testing.assert_array_equal(np.stack(first), np.stack(same))
  assert not np.array_equal(np.stack(first), np.stack(other))


def test_processes_read_their_rows_of_the_global_batches(token_file):
  # 624 windows: 39 global batches of 16 read exactly the first epoch, whoever reads them.
  single = np.concatenate(_take(data.train_batches(token_file, 16, 16, 0), 39))
  starts = single[:, 0]
  offset = starts[0] % 16  # the first epoch's shift
  assert sorted((starts - offset) // 16) == list(range(624))
  # Two processes, each feeding the rows its devices hold (here 0-7 and 8-15), read the same batches between them.
  halves = [np.stack(_take(data.train_batches(token_file, 16, 16, 0, rows=range(8 * p, 8 * p + 8)), 39))
            for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves, axis=1).reshape(-1, 17), single)


def test_train_batches_resume_from_state_on_other_rows(token_file):
  it = data.train_batches(token_file, 16, 8, seed=0)
  _take(it, 76)  # an epoch is 78 steps: the next batches cross into the second epoch
  state = it.get_state()
  assert state == {"rows": 76 * 8, "batch_size": 8}  # global: the same on every process
  expected = np.stack(_take(it, 4))
  resumed = data.train_batches(token_file, 16, 8, seed=0)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(resumed, 4)), expected)
  # Another number of processes: rows 2 and 3 of the same global batches (a micro-batch layout's part).
  part = data.train_batches(token_file, 16, 8, seed=0, rows=[2, 3])
  part.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(part, 4)), expected[:, 2:4])
  # A checkpoint from before positions were global: Grain's per-process state, plain or with worker processes.
  for legacy in ({"next_index": 76}, {"iterators_in_use_states": [{"next_index": 38}, {"next_index": 38}]}):
    old = data.train_batches(token_file, 16, 8, seed=0)
    old.set_state(legacy)
    np.testing.assert_array_equal(np.stack(_take(old, 4)), expected)
  with pytest.raises(ValueError, match="unknown data position"):
    old.set_state({"something": 1})


def test_train_batches_in_worker_processes(token_file):
  expected = _take(data.train_batches(token_file, 16, 8, seed=0), 4)
  it = data.train_batches(token_file, 16, 8, seed=0, num_workers=1)
  got = _take(it, 2)
  state = it.get_state()
  it.close()
  resumed = data.train_batches(token_file, 16, 8, seed=0, num_workers=1)
  resumed.set_state(state)
  got += _take(resumed, 2)
  resumed.close()
  np.testing.assert_array_equal(np.stack(got), np.stack(expected))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_mixture_batches_follow_the_weights_and_resume(tmp_path, num_workers):
  write_token_set(str(tmp_path / "a.json"), np.arange(3000))  # windows of a start below 3000...
  write_token_set(str(tmp_path / "b.json"), np.arange(20_000, 21_000))  # ...those of b at 20000 and above
  mixture = str(tmp_path / "mix.json")
  paths.write_json(mixture, {"mixture": [{"path": "a.json", "weight": 0.2}, {"path": "b.json", "weight": 0.8}]})
  expected = np.concatenate(_take(data.train_batches(mixture, 16, 10, seed=3), 40))
  assert (expected[:, 0] >= 20_000).sum() == 0.8 * len(expected)
  assert len(np.unique(expected[:, 0])) > 190  # b's 61 windows repeat, each epoch with a new shift
  it = data.train_batches(mixture, 16, 10, seed=3, num_workers=num_workers)
  got = _take(it, 25)
  state = it.get_state()
  del it
  resumed = data.train_batches(mixture, 16, 10, seed=3, num_workers=num_workers)
  resumed.set_state(state)
  got += _take(resumed, 15)
  del resumed
  np.testing.assert_array_equal(np.concatenate(got), expected)


def test_token_windows_pickle_without_the_memmap(token_file):
  windows = pipeline.TokenWindows(token_file, 16)
  np.testing.assert_array_equal(windows[3], np.arange(48, 65))
  pickled = pickle.dumps(windows)
  assert len(pickled) < 1000  # the tokens stay on disk
  copy = pickle.loads(pickled)
  assert len(copy) == 624  # (10000 - 16) // 16: room for the per-epoch offset
  np.testing.assert_array_equal(copy[3], windows[3])


def test_a_batch_larger_than_an_epoch_repeats_windows_with_a_warning(token_file, caplog):
  batches = data.train_batches(token_file, 2000, 8, seed=0)  # 4 windows per epoch
  batch = next(batches)
  assert "each step repeats windows" in caplog.text
  assert batch.shape == (8, 2001) and len({row.tobytes() for row in batch[:, :100]}) <= 8


def test_eval_batches(token_file):
  batches = data.eval_batches(token_file, 16, 8, num_batches=100, shard_index=1, shard_count=2)
  again = data.eval_batches(token_file, 16, 8, num_batches=100, shard_index=1, shard_count=2)
  np.testing.assert_array_equal(np.stack(batches), np.stack(again))
  assert batches[0].shape == (8, 17) and batches[0].dtype == np.int32
  np.testing.assert_array_equal(batches[0][:, 0], np.arange(1, 16, 2) * 16)
  np.testing.assert_array_equal(batches[-1][:, 1:], batches[-1][:, :-1] + 1)  # wrapped around, still windows
  with pytest.raises(data.DataError, match="block_size"):
    data.eval_batches(token_file, 20_000, 1, 1, 0, 1)
