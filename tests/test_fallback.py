"""'auto' attention on hardware we have not touched: a fused kernel it picked that does not compile falls back to
'xla' with one warning; an explicit 'pallas' or 'cudnn' still fails loudly.

The failing compile is real, not mocked: the device is reported as a TPU (so 'auto' picks splash as a Mosaic
kernel, which XLA:CPU cannot compile) or as a GPU (cuDNN's kernel, which needs cuDNN).
"""

import logging

import jax
import jax.numpy as jnp
import pytest

from gptjax import attention, loop, plan, sharding, train
from gptjax.model import GPTConfig
from tests.helpers import tiny_classification_config, tiny_config


def _fallback_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and "Continuing with model.attention='xla'" in r.getMessage()]


@pytest.mark.parametrize("platform, kernel, error", [
    ("tpu", "Pallas splash attention ('pallas')", "Only interpret mode is supported on CPU backend"),
    ("gpu", "cuDNN fused attention ('cudnn')", "cuDNN is not detected")])
def test_auto_falls_back_to_xla_with_one_warning_naming_kernel_shape_and_error(monkeypatch, caplog, platform,
                                                                               kernel, error):
  monkeypatch.setattr(attention, "device_platform", lambda: platform)
  mesh = sharding.make_mesh(tiny_config(mesh=(2, 2, 2)), jax.devices()[:8])
  assert attention.choose("auto", jnp.bfloat16, 8, 16, [16, 64, 300], mesh) == "xla"
  [warning] = _fallback_warnings(caplog)
  assert f"model.attention='auto' picked {kernel}, which does not compile on this {platform} device" in warning
  assert "8 heads of size 16, bfloat16 (batch 4, one row per data-parallel shard)" in warning
  assert error in warning
  # Explicit kernels are not checked: they fail where they are used.
  assert attention.choose("pallas" if platform == "tpu" else "cudnn", jnp.bfloat16, 8, 16, [16], mesh) != "xla"
  assert attention.choose("causal_blocks", jnp.bfloat16, 8, 16, [16], mesh) == "causal_blocks"
  assert len(_fallback_warnings(caplog)) == 1


def test_splash_is_probed_once_per_padded_length(monkeypatch):
  probed = []
  monkeypatch.setattr(attention, "device_platform", lambda: "tpu")
  monkeypatch.setattr(attention, "_compile_probe", lambda kernel, qkv, *_: probed.append((kernel, qkv.shape)))
  assert attention.choose("auto", jnp.float32, 4, 32, [16, 32, 128, 129, 256, 1000], None) == "pallas"
  # 16..128 pad to 128, 129 and 256 to 256, 1000 to 1024: the longest of each is compiled.
  assert probed == [("pallas", (1, 128, 4, 32)), ("pallas", (1, 256, 4, 32)), ("pallas", (1, 1000, 4, 32))]


@pytest.mark.parametrize("platform, kernel, error", [("tpu", "pallas", "Only interpret mode"),
                                                     ("gpu", "cudnn", "cuDNN is not detected")])
def test_explicit_fused_kernels_fail_loudly(monkeypatch, platform, kernel, error):
  monkeypatch.setattr(attention, "device_platform", lambda: platform)
  config = tiny_config(mesh=(2, 2, 2))
  config.model.update(attention=kernel, dtype="bfloat16")
  mesh = sharding.make_mesh(config, jax.devices()[:8])
  model_cfg = GPTConfig.from_config(config.model, 128).for_device(mesh)
  assert model_cfg.attention == kernel
  tx = train.make_optimizer(config)
  graphdef, abstract, shardings = train.abstract_state(config, model_cfg, mesh, tx)
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  with pytest.raises(Exception, match=error):
    step.lower(abstract, plan.abstract_batch(config, mesh, 2)).compile()


def _pretraining(tmp_path, corpus, name: str, attention_kind: str):
  config = tiny_config(steps=3, batch_size=8, mesh=(2, 2, 2), eval_every=0, eval_batches=2)
  config.model.attention = attention_kind
  config.data.update(path=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache"))
  config.log.update(samples=0, tensorboard=False, every_steps=1)
  return loop.run(config, str(tmp_path / name))


@pytest.mark.slow
def test_training_run_continues_with_xla_after_a_fused_kernel_fails(tmp_path, corpus, monkeypatch, caplog):
  reference = _pretraining(tmp_path, corpus, "xla", "xla")
  monkeypatch.setattr(attention, "device_platform", lambda: "tpu")
  run = _pretraining(tmp_path, corpus, "auto", "auto")
  [warning] = _fallback_warnings(caplog)
  assert "picked Pallas splash attention ('pallas')" in warning and "sequence length 16" in warning
  # The reference run's program: equal numbers, not merely close.
  assert (run.step, run.train_loss, run.val_loss) == (3, reference.train_loss, reference.val_loss)


@pytest.mark.slow
def test_fine_tuning_run_continues_with_xla_after_a_fused_kernel_fails(tmp_path, monkeypatch, caplog):
  config = tiny_classification_config(tmp_path)
  config.log.update(every_steps=1, tensorboard=False)
  reference = loop.run(config, str(tmp_path / "xla")).summary
  monkeypatch.setattr(attention, "device_platform", lambda: "tpu")
  summary = loop.run(config, str(tmp_path / "auto")).summary
  [warning] = _fallback_warnings(caplog)
  assert "picked Pallas splash attention ('pallas')" in warning and "sequence length 16" in warning
  assert summary["eval"] == reference["eval"] and summary["step"] == reference["step"] == 3
