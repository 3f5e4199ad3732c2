"""gptjax.tpu: accelerator types -> libtpu topologies, the chips' figures, and a missing libtpu as one clear error;
the micro-batch search when the (TPU) compiler answers only "out of memory"."""

import re

import pytest

from gptjax import errors, plan, tpu


@pytest.mark.parametrize("accelerator, topology, chips", [
    ("v5e-1", "v5e:1x1", 1), ("v5litepod-8", "v5e:2x4", 8), ("v5e-16", "v5e:4x4", 16), ("v5e-256", "v5e:16x16", 256),
    ("v6e-8", "v6e:2x4", 8), ("v5p-8", "v5:2x2x1", 4), ("v5p-16", "v5:2x2x2", 8), ("v5p-64", "v5:2x4x4", 32),
    ("v5p-128", "v5:4x4x4", 64), ("v4-32", "v4:2x2x4", 16), ("V5P-256", "v5:4x4x8", 128)])
def test_accelerator_types_map_to_the_slices_topology(accelerator, topology, chips):
  slice_ = tpu.parse(accelerator)
  assert (slice_.topology, slice_.chips) == (topology, chips)


@pytest.mark.parametrize("accelerator, message", [
    ("v5e", "is not an accelerator type"), ("v9-8", "unknown TPU generation 'v9'"),
    ("v5p-6", "count TensorCores (2 per chip) in powers of two"), ("v5e-3", "count chips in powers of two")])
def test_bad_accelerator_types_say_what_is_accepted(accelerator, message):
  with pytest.raises(errors.UserError, match=re.escape(message)):
    tpu.parse(accelerator)


def test_a_missing_libtpu_is_one_error_naming_the_extra(monkeypatch):
  monkeypatch.setattr(tpu, "available", lambda: False)
  with pytest.raises(errors.UserError, match=r"TPU compiler, which is not installed: pip install -e \"\.\[tpu\]\""):
    tpu.devices("v5e-1")


@pytest.mark.skipif(not tpu.available(), reason=f"libtpu is not installed ({tpu.EXTRA})")
@pytest.mark.parametrize("accelerator, kind", [("v5e-1", "TPU v5 lite"), ("v5p-16", "TPU v5"), ("v4-8", "TPU v4"),
                                               ("v6e-8", "TPU v6 lite")])
def test_compile_only_devices_are_one_per_chip(accelerator, kind):
  devices = tpu.devices(accelerator)
  assert len(devices) == tpu.parse(accelerator).chips
  assert {(d.platform, d.device_kind) for d in devices} == {("tpu", kind)}


def test_micro_batch_search_bisects_when_the_compiler_only_says_out_of_memory(monkeypatch):
  """The TPU compiler refuses a step larger than HBM without its size: the search must still find the largest."""
  compiled = []

  def fake_step_bytes(config, graphdef, abstract, shardings, mesh, tx, micro):
    compiled.append(micro)
    return float("inf") if micro > 8 else 1000 + 100 * micro

  monkeypatch.setattr(plan, "step_memory_bytes", fake_step_bytes)
  config = plan.config_lib.default_config()
  config.train.update(batch_size=512, micro_batch_size=-1)

  class Mesh:  # one device
    size = 1
    shape = {"data": 1, "fsdp": 1, "tensor": 1}
  assert plan.fit_micro_batch(config, None, {}, None, Mesh(), None, memory_bytes=10**6) == 8
  assert len(compiled) <= 5, compiled  # of 10 candidates (1, 2, 4, ..., 512)
  compiled.clear()
  assert plan.fit_micro_batch(config, None, {}, None, Mesh(), None, memory_bytes=int(1450 / plan.HEADROOM)) == 4
