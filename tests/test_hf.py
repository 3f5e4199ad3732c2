"""Hugging Face GPT-2 interop: logits and greedy tokens equal transformers' on random local models, exact round
trips both ways, the tokenizer's ids, sharded import, init_from='hf:...', the command line, and the errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gptjax import checkpoint, config as config_lib, generate, hf, loader, loop, sharding
from gptjax.data import tokenizer as tokenizer_lib
from tests.helpers import random_tokens, save_hf_model, train_byte_level_bpe, vocab_of

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"
TEXTS = ["Hello world's 123 ½ Ⅻ  x\n\n  y\t😀 é", "I'M don't we'll 'sx", "  the then there   \r\n",
         "中文字符 and numbers 3.14159"]
# (n_layer, n_head, n_embd): odd head counts; every model has context 77 and the tokenizer's vocabulary (301).
SHAPES = [(2, 3, 48), (3, 5, 40), (4, 1, 24)]
CONTEXT = 77


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  """A 301-token byte-level BPE: not a multiple of 128, so the import pads it."""
  directory = train_byte_level_bpe(str(tmp_path_factory.mktemp("bpe")), TEXTS, vocab_size=301)
  assert vocab_of(directory) == 301
  return directory


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, bpe_dir):
  """{shape: (directory, torch model)} for every shape in SHAPES."""
  out = {}
  for seed, shape in enumerate(SHAPES):
    directory = str(tmp_path_factory.mktemp("hf"))
    out[shape] = directory, save_hf_model(directory, bpe_dir, *shape, CONTEXT, seed=seed)
  return out


def _our_logits(loaded, tokens_BT, vocab) -> np.ndarray:
  model = nnx.merge(loaded.graphdef, loaded.params)
  return np.asarray(model.logits(model(tokens_BT)))[..., :vocab]


def _hf_logits(model, tokens_BT) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens_BT), dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("shape", SHAPES)
def test_imported_logits_equal_transformers(hf_models, shape):
  directory, reference = hf_models[shape]
  vocab = reference.config.vocab_size
  assert vocab % 128
  loaded = loader.load_model(f"hf:{directory}")
  cfg = loaded.model_cfg
  assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (*shape, CONTEXT, 384)
  assert loaded.step == 0 and loaded.tokenizer.vocab_size == vocab
  np.testing.assert_array_equal(np.asarray(loaded.params["wte"]["embedding"])[vocab:], 0)
  for tokens in (random_tokens((2, CONTEXT), vocab, seed=1), random_tokens((3, 20), vocab, seed=2)):
    diff = np.abs(_our_logits(loaded, tokens, vocab) - _hf_logits(reference, tokens)).max()
    assert diff < 1e-4, diff


def test_greedy_generation_equals_transformers(hf_models):
  directory, reference = hf_models[SHAPES[0]]
  loaded = loader.load_model(f"hf:{directory}")
  # Prompts of at most 32 tokens (padded to 32) + 30 new tokens fit the context: no window slide, which HF lacks.
  prompts = [loaded.tokenizer.encode(text).tolist()[:32] for text in TEXTS]
  # One batch, left-padded to a common length: each row must still match HF on its prompt alone.
  ours = generate.generate_batch(loaded.params, loaded.graphdef, prompts, 30,
                                 generate.Sampling(temperature=0, vocab_limit=loaded.tokenizer.vocab_size))
  for prompt, row in zip(prompts, ours):
    with torch.no_grad():
      theirs = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert row.tolist() == theirs[0, len(prompt):].tolist()


def test_tokenizer_ids_equal_transformers(hf_models, tmp_path):
  directory, _ = hf_models[SHAPES[0]]
  tok = loader.load_model(f"hf:{directory}").tokenizer
  reference = transformers.GPT2TokenizerFast.from_pretrained(directory)
  assert (tok.kind, tok.vocab_size, tok.eos_id) == ("gpt2", len(reference), reference.convert_tokens_to_ids(EOS))
  for text in TEXTS + ["".join(TEXTS)]:
    assert tok.encode(text).tolist() == reference.encode(text), text
  # A directory with only transformers' tokenizer.json gives the same tokenizer.
  only_json = tmp_path / "only_json"
  reference.save_pretrained(only_json)
  for name in ("vocab.json", "merges.txt"):
    (only_json / name).unlink(missing_ok=True)
  assert hf._hf_tokenizer(str(only_json)).fingerprint == tok.fingerprint


def _state(model) -> dict:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_round_trips_are_exact(hf_models, tmp_path):
  directory, reference = hf_models[SHAPES[1]]
  loaded = loader.load_model(f"hf:{directory}")
  # HF -> gptjax export (command line) -> HF (command line): transformers reads back its own weights bitwise.
  for args in (["import", f"--hf={directory}", f"--out={tmp_path / 'export'}"],
               ["export", f"--workdir={tmp_path / 'export'}", f"--out={tmp_path / 'back'}"]):
    subprocess.run([sys.executable, "-m", "gptjax.hf", *args], cwd=REPO, check=True, capture_output=True, timeout=120)
  back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
  assert back.config.architectures == ["GPT2LMHeadModel"]
  jax.tree.map(np.testing.assert_array_equal, _state(back), _state(reference))
  # import(export(x)) == x, tokenizer included.
  again = loader.load_model(f"hf:{tmp_path / 'back'}")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.params), jax.device_get(loaded.params))
  assert again.tokenizer.fingerprint == loaded.tokenizer.fingerprint
  exported_tok = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "back")
  assert exported_tok.eos_token == EOS and exported_tok.encode(TEXTS[0]) == loaded.tokenizer.encode(TEXTS[0]).tolist()
  # bfloat16 both ways: transformers reads our bf16 file, we read it back.
  hf.export_hf(f"hf:{directory}", str(tmp_path / "bf16"), dtype="bfloat16")
  bf16 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
  for name, value in bf16.state_dict().items():
    torch.testing.assert_close(value, reference.state_dict()[name].to(torch.bfloat16), rtol=0, atol=0)
  reread = loader.load_model(f"hf:{tmp_path / 'bf16'}")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b).astype(jax.numpy.bfloat16)
                                                         .astype(np.float32)),
               jax.device_get(reread.params), jax.device_get(loaded.params))


def test_other_weight_files_load_the_same(hf_models, tmp_path):
  directory, reference = hf_models[SHAPES[0]]
  expected = jax.device_get(loader.load_model(f"hf:{directory}").params)
  # pytorch_model.bin (old-style names without 'transformer.', the tied head and the attention-mask buffers).
  as_bin = _copy(directory, tmp_path / "bin")
  (as_bin / "model.safetensors").unlink()
  state = reference.transformer.state_dict() | {"lm_head.weight": reference.lm_head.weight,
                                                "h.0.attn.bias": torch.ones(1, 1, CONTEXT, CONTEXT)}
  torch.save(state, as_bin / "pytorch_model.bin")
  # model.safetensors.index.json over two shards.
  sharded = _copy(directory, tmp_path / "sharded")
  tensors = {name: np.array(t) for name, t in hf._read_safetensors(str(sharded / "model.safetensors")).items()}
  (sharded / "model.safetensors").unlink()
  weight_map = {name: f"model-0000{i % 2 + 1}-of-00002.safetensors" for i, name in enumerate(tensors)}
  for file in set(weight_map.values()):
    hf._write_safetensors(str(sharded / file), {n: t for n, t in tensors.items() if weight_map[n] == file})
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  for other in (as_bin, sharded):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(hf.import_hf(str(other)).params), expected)


@pytest.mark.devices(8)
def test_sharded_import_matches_one_device(hf_models):
  directory, _ = hf_models[SHAPES[0]]
  c = config_lib.default_config()
  c.mesh.update(data=1, fsdp=4, tensor=2)
  mesh = sharding.make_mesh(c, jax.devices()[:8])
  sharded = loader.load_model(f"hf:{directory}", mesh)
  single = loader.load_model(f"hf:{directory}")
  fc = sharded.params["blocks"]["mlp"]["fc"]["kernel"]  # [L, D_fsdp, F_tensor]
  assert fc.sharding.mesh.size == 8 and fc.addressable_shards[0].data.shape == (2, 48 // 4, 4 * 48 // 2)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded.params), jax.device_get(single.params))


def test_hub_names_are_downloaded(hf_models, monkeypatch):
  hub = pytest.importorskip("huggingface_hub")
  directory, _ = hf_models[SHAPES[2]]
  calls = []
  monkeypatch.setattr(hub, "snapshot_download", lambda name, allow_patterns: calls.append(name) or directory)
  assert loader.load_model("hf:someone/gpt2-tiny").model_cfg.n_layer == SHAPES[2][0]
  assert calls == ["someone/gpt2-tiny"]

  def offline(name, allow_patterns):
    raise OSError("no network")
  monkeypatch.setattr(hub, "snapshot_download", offline)
  with pytest.raises(hf.HFError, match="cannot be downloaded from the Hugging Face Hub .*no network"):
    loader.load_model("hf:gpt2")


def test_init_from_hf_fine_tunes_and_exports(hf_models, tmp_path):
  directory, reference = hf_models[SHAPES[0]]
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(TEXTS * 300))
  c = config_lib.default_config()
  n_layer, n_head, n_embd = SHAPES[0]
  c.model.update(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=CONTEXT)
  c.data.path = str(corpus)
  c.train.update(steps=1, batch_size=8, eval_every=0, eval_batches=1, warmup_steps=0, learning_rate=1e-3)
  c.log.update(samples=0, tensorboard=False)
  c.checkpoint.init_from = f"hf:{directory}"
  loop.run(c, str(tmp_path / "run"))
  tuned = loader.load_model(str(tmp_path / "run"))
  source = loader.load_model(f"hf:{directory}")
  assert tuned.step == 1 and tuned.tokenizer.fingerprint == source.tokenizer.fingerprint
  delta = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), tuned.params, source.params)
  assert 0 < max(jax.tree.leaves(delta)) < 1e-2  # trained one small step away from GPT-2's weights
  # The fine-tuned run exports to transformers with the same logits (padding rows, now trained, are cut off).
  hf.export_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
  exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
  vocab = reference.config.vocab_size
  tokens = random_tokens((2, 30), vocab, seed=3)
  assert np.abs(_our_logits(tuned, tokens, vocab) - _hf_logits(exported, tokens)).max() < 1e-4


def test_export_with_another_tokenizer_writes_no_tokenizer_files(hf_models, tmp_path, monkeypatch):
  directory, reference = hf_models[SHAPES[0]]
  loaded = loader.load_model(f"hf:{directory}")
  chars = tokenizer_lib.CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz .,"])
  monkeypatch.setattr(checkpoint, "load_saved", lambda path, step=None: dataclasses.replace(loaded, tokenizer=chars))
  hf.export_hf("runs/chars", str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
  exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
  assert exported.config.vocab_size == chars.vocab_size == 30
  tokens = random_tokens((2, 10), chars.vocab_size)
  assert np.abs(_hf_logits(exported, tokens) - _hf_logits(reference, tokens)[..., :30]).max() < 1e-5


def _copy(directory, tmp_path, **config_changes):
  out = tmp_path / "copy"  # tmp_path may not exist yet: copytree creates the parents
  shutil.copytree(directory, out)
  if config_changes:
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | config_changes))
  return out


@pytest.mark.parametrize("change, message", [
    (dict(model_type="llama"), "model_type='llama'.*only GPT-2"),
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(n_inner=100), "n_inner=100"),
    (dict(n_positions=64), r"wpe.weight has shape \(77, 48\), but config.json .* needs \(64, 48\)"),
    (dict(n_layer=3), r"the weights lack 'h\.2\."),
    (dict(vocab_size=200), "tokenizer has 301 tokens but config.json's vocab_size is 200"),
])
def test_config_errors(hf_models, tmp_path, change, message):
  directory, _ = hf_models[SHAPES[0]]
  with pytest.raises(hf.HFError, match=message):
    hf.import_hf(str(_copy(directory, tmp_path, **change)))


@pytest.mark.parametrize("missing, message", [
    ("config.json", "has no config.json"), ("model.safetensors", "has no weights"),
    ("vocab.json", "has no tokenizer")])
def test_missing_files(hf_models, tmp_path, missing, message):
  directory, _ = hf_models[SHAPES[0]]
  copy = _copy(directory, tmp_path)
  (copy / missing).unlink()
  with pytest.raises(hf.HFError, match=message):
    hf.import_hf(str(copy))
  with pytest.raises(hf.HFError, match="is not a directory"):
    hf.import_hf(str(tmp_path / "nowhere"))


def test_unknown_tensors_and_bias_free_models_are_refused(hf_models, tmp_path, monkeypatch):
  directory, _ = hf_models[SHAPES[0]]
  copy = _copy(directory, tmp_path)
  tensors = {name: np.array(t) for name, t in hf._read_safetensors(str(copy / "model.safetensors")).items()}
  hf._write_safetensors(str(copy / "model.safetensors"), tensors | {"score.weight": np.zeros((2, 48), np.float32)})
  with pytest.raises(hf.HFError, match=r"does not have: \['score.weight'\]"):
    hf.import_hf(str(copy))
  loaded = loader.load_model(f"hf:{directory}")
  no_bias = dataclasses.replace(loaded, model_cfg=dataclasses.replace(loaded.model_cfg, bias=False))
  monkeypatch.setattr(checkpoint, "load_saved", lambda path, step=None: no_bias)
  with pytest.raises(hf.HFError, match="model.bias=False"):
    hf.export_hf("runs/no_bias", str(tmp_path / "out"))
