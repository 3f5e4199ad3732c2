"""Config validation rejects impossible settings with a message that names the field and the fix."""

import pathlib
import runpy

import pytest

from gptjax import config as config_lib
from gptjax.config import ConfigError, validate
from tests.helpers import tiny_config

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_validates(path):
  config = runpy.run_path(str(path))["get_config"]()
  validate(config, n_devices=1)


def test_gpt2_small_has_the_real_shape():
  config = runpy.run_path(str(CONFIGS[0].parent / "gpt2_small.py"))["get_config"]()
  m = config.model
  assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)
  assert config_lib.check_vocab(config, 50257) == 50304
  assert config.train.batch_size * m.block_size == 524288
  assert config.train.micro_batch_size == -1  # fitted to device memory at start-up
  config.train.micro_batch_size = 16
  assert config_lib.grad_accum_steps(config, 8) == 4  # 512 / (16 x 8)


# The numbers the four configs/gpt2_SIZE.py files hard-coded before configs/gpt2.py: n_layer, n_head, n_embd, peak lr.
GPT2_SHAPES = {"small": (12, 12, 768, 6e-4), "medium": (24, 16, 1024, 3e-4), "large": (36, 20, 1280, 2.5e-4),
               "xl": (48, 25, 1600, 2e-4)}


@pytest.mark.parametrize("size", GPT2_SHAPES)
def test_gpt2_sizes_equal_the_old_per_size_files(size):
  config = runpy.run_path(str(CONFIGS[0].parent / "gpt2.py"))["get_config"](size)
  assert config == runpy.run_path(str(CONFIGS[0].parent / f"gpt2_{size}.py"))["get_config"]()
  n_layer, n_head, n_embd, lr = GPT2_SHAPES[size]
  assert (config.model.n_layer, config.model.n_head, config.model.n_embd) == (n_layer, n_head, n_embd)
  assert (config.model.block_size, config.model.vocab_size, config.data.vocab_size) == (1024, 50304, 50257)
  t = config.train
  assert (t.steps, t.batch_size, t.micro_batch_size, t.warmup_steps, t.weight_decay, t.eval_every) == \
      (19073, 512, -1, 715, 0.1, 250)
  assert (t.learning_rate, t.min_learning_rate) == pytest.approx((lr, lr / 10), rel=1e-12)
  # Only the shape and the learning rate tell the sizes apart.
  small = runpy.run_path(str(CONFIGS[0].parent / "gpt2_small.py"))["get_config"]()
  small.model.update(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
  small.train.update(learning_rate=t.learning_rate, min_learning_rate=t.min_learning_rate)
  assert config == small


def test_gpt2_default_and_unknown_size():
  get_config = runpy.run_path(str(CONFIGS[0].parent / "gpt2.py"))["get_config"]
  assert get_config() == get_config("small")
  with pytest.raises(ConfigError, match=r"configs/gpt2.py:xxl is not a GPT-2 size; use one of small, medium, "):
    get_config("xxl")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.model.update(n_embd=100, n_head=12), "n_embd=100 is not divisible by model.n_head=12"),
    (lambda c: c.mesh.update(data=3, fsdp=1, tensor=1), "needs 3 devices but 8 are present"),
    (lambda c: c.mesh.update(data=-1, fsdp=3, tensor=1), "not divisible by the fixed degrees' product 3"),
    (lambda c: c.mesh.update(data=-1, fsdp=-1), "at most one degree may be -1"),
    (lambda c: c.train.update(batch_size=12), "batch_size=12 must be a multiple"),
    (lambda c: c.train.update(batch_size=16, micro_batch_size=3), "multiple of train.micro_batch_size"),
    (lambda c: c.model.update(attention="flash"), "model.attention='flash'"),
    (lambda c: c.model.update(dropout=1.0), "model.dropout=1.0"),
    (lambda c: c.model.update(row_groups=0), "model.row_groups=0 must be positive"),
    (lambda c: c.data.update(tokenizer="wordpiece"), "data.tokenizer='wordpiece'"),
    (lambda c: c.train.update(steps=0), "train.steps=0"),
    (lambda c: c.train.update(spike_skip=0.5), "spike_skip is a factor above 1"),
    (lambda c: c.train.update(spike_skip=3.0, spike_window=0), "spike_window=0"),
    (lambda c: c.train.update(z_loss=-1e-4), "train.z_loss=-0.0001: use 0 (off) or a positive value"),
    (lambda c: c.train.update(dropout_rng="philox"), "train.dropout_rng='philox'"),
])
def test_validation_errors(change, message):
  config = tiny_config(mesh=(-1, 1, 1))
  change(config)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate(config, n_devices=8)


def test_tokenizer_larger_than_model_vocab():
  config = tiny_config()
  config.model.vocab_size = 256
  with pytest.raises(ConfigError, match="tokenizer has 300 tokens but model.vocab_size=256"):
    config_lib.check_vocab(config, 300)
  config.model.vocab_size = 0
  assert config_lib.check_vocab(config, 300) == 304  # rounded up to vocab_multiple=8
