"""Tests of the input formats (JSONL, Parquet, Hugging Face datasets, nanoGPT and llm.c token files), GPT-2's
byte-level BPE (ids compared with transformers'), the prepare command line, and the errors for bad input."""

import importlib
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from gptjax import config as config_lib
from gptjax import data
from tests.helpers import train_byte_level_bpe

prepare_lib = importlib.import_module("gptjax.data.prepare")  # the package's `prepare` is the function

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"
PARITY_TEXTS = ["Hello world's 123 ½ Ⅻ  x\n\n  y\t😀 é", "I'M don't we'll 'sx", "  leading\r\n\r\n  trailing   ",
                "中文字符和日本語のテキスト", "e\u0301 a\x1cb \x1c c x\x85y\u00a0z\u3000", "\x00\x01 tabs\t\tend\n",
                "numbers 3.14159 1,000,000 ٣٤ ²", "the the the then there",
                "IT'S 'LL ’s x" + " " * 30 + "y 👩\u200d👩\u200d👧 \t \t\n\u2028z 007 1e-3"]


def gpt2_byte_chars():
  """GPT-2's bytes_to_unicode table, as written in OpenAI's encoder.py."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_gpt2_files(directory, merges=("Ġ t", "h e", "Ġt he"), eos_id=None):
  """A hand-made GPT-2 vocab.json + merges.txt: the 256 byte tokens, the merges' results, then EOS."""
  os.makedirs(directory, exist_ok=True)
  vocab = {c: i for i, c in enumerate(gpt2_byte_chars())}
  for merge in merges:
    vocab["".join(merge.split(" "))] = len(vocab)
  vocab[EOS] = len(vocab) if eos_id is None else eos_id
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return str(directory)


@pytest.fixture
def gpt2_dir(tmp_path):
  return write_gpt2_files(tmp_path / "gpt2")


def test_gpt2_tokenizer_applies_merges_by_rank(gpt2_dir):
  tok = data.load_tokenizer(gpt2_dir)
  assert (tok.kind, tok.vocab_size, tok.eos_id) == ("gpt2", 260, 259)
  t, h, e = (gpt2_byte_chars().index(c) for c in "the")  # byte values: the tokens of single bytes
  np.testing.assert_array_equal(tok.encode(" the the"), [258, 258])
  np.testing.assert_array_equal(tok.encode("the"), [t, 257])  # 't' 'h' 'e' -> 't' 'he'; no 'Ġt' without a space
  np.testing.assert_array_equal(tok.encode(EOS)[:2], [gpt2_byte_chars().index("<"), gpt2_byte_chars().index("|")])
  for text in PARITY_TEXTS + [EOS + " never an EOS"]:
    assert tok.decode(tok.encode(text)) == text
  tok.save(os.path.join(gpt2_dir, "saved"))
  assert data.load_tokenizer(os.path.join(gpt2_dir, "saved")).fingerprint == tok.fingerprint


@pytest.fixture(scope="module")
def trained_bpe_dir(tmp_path_factory):
  return train_byte_level_bpe(str(tmp_path_factory.mktemp("bpe")), PARITY_TEXTS, vocab_size=700)


def test_gpt2_tokenizer_matches_transformers(trained_bpe_dir, monkeypatch):
  transformers = pytest.importorskip("transformers")
  reference = transformers.GPT2TokenizerFast.from_pretrained(trained_bpe_dir)
  tok = data.load_tokenizer(trained_bpe_dir)
  assert tok.vocab_size == len(reference) and tok.eos_id == reference.eos_token_id
  for text in PARITY_TEXTS + ["".join(PARITY_TEXTS)]:
    assert tok.encode(text).tolist() == reference.encode(text), text
    assert tok.decode(tok.encode(text)) == text
  # A literal '<|endoftext|>' in a document is text, as with split_special_tokens (tiktoken's encode_ordinary).
  text = f"end {EOS} start"
  assert tok.encode(text).tolist() == reference(text, split_special_tokens=True)["input_ids"]
  # A lone surrogate (a JSON escape) is not text that HF can encode: it becomes U+FFFD.
  assert tok.encode("a\ud800b").tolist() == reference.encode("a\ufffdb")
  # prepare cuts long documents into pieces that encode to the same ids.
  text = "\n".join(PARITY_TEXTS * 5) + "a\nb\r\nc\n d\n\ne"
  monkeypatch.setattr(prepare_lib, "_PIECE_CHARS", 10)
  pieces = [piece for piece, _ in prepare_lib._pieces(text)]
  assert len(pieces) > 20
  assert np.concatenate([tok.encode(p) for p in pieces]).tolist() == reference.encode(text)
  # Many texts at once, on threads, give each text's own ids.
  assert [x.tolist() for x in tok.encode_batch(PARITY_TEXTS * 3)] == [reference.encode(t) for t in PARITY_TEXTS * 3]


def test_bad_tokenizer_directories(tmp_path):
  with pytest.raises(data.DataError, match="vocab.json \\+ merges.txt"):
    data.load_tokenizer(str(tmp_path))
  write_gpt2_files(tmp_path / "bad_merge", merges=("Ġ t", "x y"))
  with open(tmp_path / "bad_merge" / "merges.txt", "a") as f:
    f.write("q\n")
  with pytest.raises(data.DataError, match="merges.txt: merge 3 'q'"):
    data.load_tokenizer(str(tmp_path / "bad_merge"))
  write_gpt2_files(tmp_path / "twice", merges=("Ġ t", "h e", "Ġt he", "Ġ the"))
  with pytest.raises(data.DataError, match="merge 4 'Ġ the' makes the token of merge 3 again"):
    data.load_tokenizer(str(tmp_path / "twice"))
  directory = write_gpt2_files(tmp_path / "no_eos")
  with open(os.path.join(directory, "vocab.json")) as f:
    vocab = json.load(f)
  del vocab[EOS]
  vocab["€"] = len(vocab)  # a character that is not one of GPT-2's byte characters
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with pytest.raises(data.DataError, match="no '<\\|endoftext\\|>' token; .* has the token '€', which is not made"):
    data.load_tokenizer(directory)


def _config(path, cache_dir, **data_fields):
  config = config_lib.default_config()
  config.data.update(path=path, cache_dir=str(cache_dir), **data_fields)
  return config


def _documents_of(path, tok):
  tokens = data.open_tokens(path)[:]
  cuts = np.flatnonzero(tokens == tok.eos_id)
  return [tok.decode(x) for x in np.split(tokens, cuts[:-1] + 1)]


def _write_jsonl(path, records):
  with open(path, "wb") as f:
    for record in records:
      f.write(record if isinstance(record, bytes) else json.dumps(record).encode() + b"\n")
  return str(path)


def test_jsonl_round_trip_with_a_text_field(tmp_path, gpt2_dir, caplog):
  docs = [f"document {i}: the then\nline two ünïcode" for i in range(12)]
  records = [{"content": d, "id": i} for i, d in enumerate(docs)]
  path = _write_jsonl(tmp_path / "docs.jsonl", records[:5] + [b"\n", b'{"content": "bad \xff byte"}\n'] + records[5:])
  prepared = data.prepare(_config(path, tmp_path, text_field="content", tokenizer="gpt2", tokenizer_path=gpt2_dir),
                          "unused")
  expected = docs[:5] + ["bad \ufffd byte"] + docs[5:]
  val = _documents_of(prepared.val_path, prepared.tokenizer)
  train = _documents_of(prepared.train_path, prepared.tokenizer)
  assert val == expected[::10] and train == [d for i, d in enumerate(expected) if i % 10]
  assert "docs.jsonl is not valid UTF-8: replaced 1 undecodable byte sequences" in caplog.text


def test_jsonl_errors_name_the_line(tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"body": "no text field"}])
  with pytest.raises(data.DataError, match=r"bad.jsonl:2: the record has no 'text' field \(it has \['body'\]\)"):
    list(data.open_corpus(path).documents())
  path = _write_jsonl(tmp_path / "broken.jsonl", [{"text": "fine"}, b"{not json\n"])
  with pytest.raises(data.DataError, match="broken.jsonl:2: not JSON"):
    list(data.open_corpus(path).documents())
  path = _write_jsonl(tmp_path / "number.jsonl", [{"text": 7}])
  with pytest.raises(data.DataError, match="number.jsonl:1: field 'text' is int"):
    list(data.open_corpus(path).documents())


def test_a_failed_prepare_loses_nothing(tmp_path):
  good = _write_jsonl(tmp_path / "good.jsonl", [{"text": f"doc {i}"} for i in range(20)])
  first = data.prepare(_config(good, tmp_path / "cache", tokenizer="char"), "unused")
  bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}] * 20 + [{"oops": 1}])
  with pytest.raises(data.DataError, match="bad.jsonl:21"):
    data.prepare(_config(bad, tmp_path / "cache", tokenizer="char"), "unused")
  again = data.prepare(_config(good, tmp_path / "cache", tokenizer="char"), "unused")
  assert (again.train_path, again.train_tokens) == (first.train_path, first.train_tokens)
  assert _documents_of(again.train_path, again.tokenizer)[0] == "doc 1"


def test_parquet_documents(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  docs = [f"row {i} text" for i in range(30)]
  pq.write_table(pa.table({"id": list(range(30)), "body": docs}), tmp_path / "a.parquet", row_group_size=7)
  corpus = data.open_corpus(str(tmp_path), text_field="body")
  assert corpus.files == ((str(tmp_path / "a.parquet"), "parquet"),) and corpus.num_documents == 30
  pairs = list(corpus.documents())
  assert [t for t, _ in pairs] == docs and sum(n for _, n in pairs) == corpus.size_bytes
  with pytest.raises(data.DataError, match="no column 'text'.*'body'"):
    list(data.open_corpus(str(tmp_path)).documents())
  pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "b.parquet")
  with pytest.raises(data.DataError, match="b.parquet: row 1 of column 'text' is NoneType"):
    list(data.open_corpus(str(tmp_path / "b.parquet")).documents())


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
  (tmp_path / "a.parquet").write_bytes(b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(data.DataError, match=r"pip install 'gptjax\[parquet\]'"):
    list(data.open_corpus(str(tmp_path)).documents())


def test_hugging_face_streaming(tmp_path, monkeypatch):
  calls = []
  docs = [f"streamed document {i}" for i in range(50)]

  def load_dataset(name, config, split, streaming):
    calls.append((name, config, split, streaming))
    return iter([{"text": d} for d in docs])
  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  prepared = data.prepare(_config("hf:user/set:en@train", tmp_path, tokenizer="char", max_documents=20), "unused")
  assert calls[0] == ("user/set", "en", "train", True)
  train = _documents_of(prepared.train_path, prepared.tokenizer)
  val = _documents_of(prepared.val_path, prepared.tokenizer)
  assert val == docs[:20:10] and len(train) == 18
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(data.DataError, match="pip install datasets"):
    list(data.open_corpus("hf:user/other").documents())


def _write_llmc(path, tokens, version=1):
  header = np.zeros(256, "<i4")
  header[:3] = (20240520, version, len(tokens))
  with open(path, "wb") as f:
    f.write(header.tobytes())
    f.write(np.asarray(tokens, "<u2" if version == 1 else "<u4").tobytes())
  return str(path)


def _gpt2_config(path, tmp_path, gpt2_dir, **data_fields):
  return _config(str(path), tmp_path / "cache", tokenizer="gpt2", tokenizer_path=gpt2_dir, **data_fields)


def test_nanogpt_files_are_read_in_place(tmp_path, gpt2_dir):
  rng = np.random.default_rng(0)
  train, val = rng.integers(0, 259, 5000).astype("<u2"), rng.integers(0, 259, 700).astype("<u2")
  (tmp_path / "owt").mkdir()
  train.tofile(tmp_path / "owt" / "train.bin")
  val.tofile(tmp_path / "owt" / "val.bin")
  prepared = data.prepare(_gpt2_config(tmp_path / "owt", tmp_path, gpt2_dir), "unused")
  np.testing.assert_array_equal(data.open_tokens(prepared.train_path)[:], train)
  np.testing.assert_array_equal(data.open_tokens(prepared.val_path)[:], val)
  with open(prepared.train_path) as f:
    (shard,) = json.load(f)["shards"]
  assert shard["path"] == str(tmp_path / "owt" / "train.bin")  # read where it is, not copied
  batch = next(data.train_batches(prepared.train_path, 32, 4, seed=0))
  runs = np.lib.stride_tricks.sliding_window_view(train, 33)
  for row in batch:  # every row is a contiguous run of the file
    assert (runs == row).all(axis=1).any()


def test_nanogpt_single_file_splits_at_a_document_boundary(tmp_path, gpt2_dir):
  tokens = np.tile(np.append(np.arange(1, 50), 259), 40).astype("<u2")  # 40 documents ending in EOS
  tokens.tofile(tmp_path / "train.bin")
  prepared = data.prepare(_gpt2_config(tmp_path / "train.bin", tmp_path, gpt2_dir), "unused")
  train, val = (data.open_tokens(p)[:] for p in (prepared.train_path, prepared.val_path))
  np.testing.assert_array_equal(np.concatenate([train, val]), tokens)
  assert train[-1] == 259 and len(val) == 4 * 50  # the last 10%, whole documents


def test_llmc_shards_are_read_in_place(tmp_path, gpt2_dir):
  rng = np.random.default_rng(1)
  parts = [rng.integers(0, 259, n) for n in (1000, 777)]
  (tmp_path / "fineweb").mkdir()
  for i, part in enumerate(parts):
    _write_llmc(tmp_path / "fineweb" / f"fineweb_train_{i + 1:06d}.bin", part)
  val = rng.integers(0, 259, 300)
  _write_llmc(tmp_path / "fineweb" / "fineweb_val_000000.bin", val)
  prepared = data.prepare(_gpt2_config(tmp_path / "fineweb", tmp_path, gpt2_dir), "unused")
  stream = data.open_tokens(prepared.train_path)
  np.testing.assert_array_equal(stream[:], np.concatenate(parts))
  np.testing.assert_array_equal(stream.read(990, 20), np.concatenate(parts)[990:1010])  # across the two files
  np.testing.assert_array_equal(data.open_tokens(prepared.val_path)[:], val)
  assert prepared.train_tokens == 1777


def test_token_file_errors(tmp_path, gpt2_dir):
  np.arange(10, dtype="<u2").tofile(tmp_path / "train.bin")
  with pytest.raises(data.DataError, match="data.tokenizer_path"):
    data.prepare(_config(str(tmp_path / "train.bin"), tmp_path / "cache"), "unused")
  big = write_gpt2_files(tmp_path / "big", eos_id=70_000)
  with pytest.raises(data.DataError, match="train.bin holds uint16 ids but the gpt2 tokenizer has 70001 tokens"):
    data.prepare(_gpt2_config(tmp_path / "train.bin", tmp_path, big), "unused")
  np.array([1, 2, 300, 259] * 10, "<u2").tofile(tmp_path / "other.bin")
  with pytest.raises(data.DataError, match="other.bin holds token id 300 but the gpt2 tokenizer has only 260"):
    data.prepare(_gpt2_config(tmp_path / "other.bin", tmp_path, gpt2_dir), "unused")
  (tmp_path / "odd.bin").write_bytes(b"abc")
  with pytest.raises(data.DataError, match="odd.bin has an odd size"):
    data.prepare(_gpt2_config(tmp_path / "odd.bin", tmp_path, gpt2_dir), "unused")
  path = _write_llmc(tmp_path / "cut.bin", np.arange(100))
  with open(path, "r+b") as f:
    f.truncate(1024 + 150)
  with pytest.raises(data.DataError, match="cut.bin: its llm.c header says 100 uint16 tokens.*truncated"):
    data.prepare(_gpt2_config(path, tmp_path, gpt2_dir), "unused")
  with pytest.raises(data.DataError, match="not an llm.c token shard"):
    data.prepare(_gpt2_config(tmp_path / "train.bin", tmp_path, gpt2_dir, format="llmc"), "unused")
  (tmp_path / "notes.txt").write_text("text")
  with pytest.raises(data.DataError, match="mixes token files"):
    data.open_corpus(str(tmp_path / "*.*"))


def test_token_set_changed_after_prepare(tmp_path, gpt2_dir):
  np.array([1, 2, 3, 259] * 100, "<u2").tofile(tmp_path / "train.bin")
  prepared = data.prepare(_gpt2_config(tmp_path / "train.bin", tmp_path, gpt2_dir), "unused")
  np.array([1, 2, 259] * 10, "<u2").tofile(tmp_path / "train.bin")
  with pytest.raises(data.DataError, match="train.bin has 60 bytes but .* lists it with 800"):
    data.open_tokens(prepared.train_path)


def test_tokenizer_kind_must_match_the_loaded_one(tmp_path, gpt2_dir):
  (tmp_path / "a.txt").write_text("some text " * 50)
  with pytest.raises(data.DataError, match="holds a gpt2 tokenizer but data.tokenizer='bpe'"):
    data.prepare(_config(str(tmp_path / "a.txt"), tmp_path, tokenizer_path=gpt2_dir), "unused")


def test_prepare_command_line(tmp_path):
  (tmp_path / "input.txt").write_text("To be, or not to be, that is the question.\n" * 200)
  args = [sys.executable, "-m", "gptjax.prepare", "--config=configs/shakespeare_char.py",
          f"--config.data.path={tmp_path / 'input.txt'}", f"--workdir={tmp_path / 'run'}"]
  out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
  assert "tokenizer: char, 18 tokens" in out and "train: 7,741 tokens" in out and "val:   861 tokens" in out
  assert list((tmp_path / "run" / "data").glob("tokens-*/train-00000.bin"))
