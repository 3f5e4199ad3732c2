"""Small configs and state builders shared by the tests."""

import functools
import json
import os
import shutil

import jax
import numpy as np
from flax import nnx

from gptjax import config as config_lib, sharding, train
from gptjax.model import GPT, GPTConfig


def tiny_config(n_layer=2, n_head=8, n_embd=64, block_size=16, batch_size=8, mesh=(1, 1, 1), **train_overrides):
  """A 2-layer GPT every mesh of 8 devices divides: heads 8, width 64, vocab 128."""
  c = config_lib.default_config()
  c.model.update(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_multiple=8)
  c.train.update({"batch_size": batch_size, "warmup_steps": 2, "steps": 20, "learning_rate": 1e-3, **train_overrides})
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return c


def quick_run_config(corpus, steps=8, **train):
  """A pretraining run of a 1-layer GPT on `corpus` that takes seconds: checkpoints every 4 steps, no samples."""
  c = config_lib.default_config()
  c.model.update(n_layer=1, n_head=2, n_embd=32, block_size=16)
  c.data.update(path=str(corpus), vocab_size=300)
  c.train.update({"steps": steps, "batch_size": 8, "eval_every": 0, "warmup_steps": 2, **train})
  c.checkpoint.every_steps = 4
  c.log.update(samples=0, tensorboard=False)
  return c


def task_config(kind: str, batch_size=8, mesh=(1, 1, 1), **train_overrides):
  """A fine-tuning config of `kind` with tiny_config's training settings (evaluated every epoch); the model is the
  base's (checkpoint.init_from)."""
  from gptjax.finetune import tasks  # pylint: disable=import-outside-toplevel
  c = tasks.add_task_config(config_lib.default_config(), kind)
  c.train.update({"batch_size": batch_size, "warmup_steps": 2, "steps": 20, "learning_rate": 1e-3, **train_overrides})
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return c


def build(config, vocab=128, n_devices=None):
  """(graphdef, state, shardings, mesh, tx) for `config` on its mesh over the first devices."""
  explicit = [config.mesh[a] for a in config_lib.MESH_AXES]
  devices = jax.devices()[:n_devices or (int(np.prod(explicit)) if -1 not in explicit else None)]
  mesh = sharding.make_mesh(config, devices)
  tx = train.make_optimizer(config)
  graphdef, state, shardings = train.init_state(config, GPTConfig.from_config(config.model, vocab), mesh, tx)
  return graphdef, state, shardings, mesh, tx


def random_tokens(shape, vocab=128, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def train_byte_level_bpe(directory: str, texts: list[str], vocab_size: int) -> str:
  """vocab.json + merges.txt of a small byte-level BPE trained by HF tokenizers (a transformers dependency)."""
  import pytest
  tokenizers = pytest.importorskip("tokenizers")
  bpe = tokenizers.ByteLevelBPETokenizer()
  corpus = " ".join(texts) * 3 + " ".join(f"word{i} wörd{i % 7} the then there's" for i in range(400))
  bpe.train_from_iterator([corpus], vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                          show_progress=False)
  bpe.save_model(directory)
  return directory


def vocab_of(bpe_dir) -> int:
  """The number of tokens in a vocab.json."""
  with open(os.path.join(bpe_dir, "vocab.json")) as f:
    return len(json.load(f))


def save_hf_model(directory, bpe_dir, n_layer, n_head, n_embd, context, seed=0, eos_token: str | None = None):
  """A randomly initialised transformers GPT2LMHeadModel (every parameter perturbed: no zero bias hides a bug) and
  its tokenizer files, written as transformers writes them; `eos_token` makes generation stop there, as GPT-2's."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  with open(os.path.join(bpe_dir, "vocab.json")) as f:
    vocab = json.load(f)
  eos = vocab[eos_token] if eos_token else None
  config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=context, n_embd=n_embd, n_layer=n_layer,
                                   n_head=n_head, bos_token_id=eos, eos_token_id=eos)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(directory)
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(bpe_dir, name), directory)
  return model


@functools.cache
def tiny_gpt(scan_layers=True):
  """(graphdef, params) of a 2-layer GPT: width 32, 4 heads, vocab 32, context 16 (cached: eager NNX init takes
  seconds)."""
  cfg = GPTConfig(vocab_size=32, n_layer=2, n_head=4, n_embd=32, block_size=16, attention="xla",
                  scan_layers=scan_layers)
  graphdef, state = nnx.split(GPT(cfg, nnx.Rngs(0)))
  return graphdef, nnx.to_pure_dict(state)


def tiny_classification_config(tmp_path):
  """A classification config that fine-tunes a tiny character-level base (exported to tmp_path/base) on 24 rows of
  'ab'-strings labelled short or long, on a (2, 2, 2) mesh: the fine-tuning loop end to end in seconds."""
  from gptjax import checkpoint  # pylint: disable=import-outside-toplevel
  from gptjax.data.tokenizer import CharTokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = CharTokenizer.train(["abcdefgh "])
  base_config = tiny_config()
  params = nnx.to_pure_dict(nnx.state(GPT(GPTConfig.from_config(base_config.model, 16), nnx.Rngs(0))))
  base = checkpoint.write_export(str(tmp_path / "base"), params, base_config, tokenizer, step=0)
  rows = [f"{'ab' * n}\t{'long' if n > 3 else 'short'}\n" for n in range(1, 7)]
  (tmp_path / "train.tsv").write_text("text\tlabel\n" + "".join(rows * 4))
  config = task_config("classify", batch_size=8, mesh=(2, 2, 2))
  config.task.update(train_path=str(tmp_path / "train.tsv"), eval_path=str(tmp_path / "train.tsv"), epochs=1,
                     eval_batch_size=8, export_merged=False)
  config.checkpoint.init_from = base
  return config
