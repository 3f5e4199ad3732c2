"""The planner: micro-batch fitting, per-device memory against placed arrays, suggestions, measured variants, and
the lowering check for a TPU or a GPU (`--platform`)."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gptjax import config as config_lib, plan, sharding, tpu, train
from gptjax.model import GPTConfig
from tests.helpers import build, tiny_config


@pytest.mark.devices(8)
def test_fit_micro_batch_follows_compiled_memory(monkeypatch):
  config = tiny_config(batch_size=32, micro_batch_size=-1, mesh=(2, 1, 1), block_size=64)
  mesh = sharding.make_mesh(config, sharding.jax.devices()[:2])
  tx = train.make_optimizer(config)
  args = (config, *train.abstract_state(config, GPTConfig.from_config(config.model, 128), mesh, tx), mesh, tx)
  sizes = {m: plan.step_memory_bytes(*args, m) for m in (4, 8)}
  assert sizes[8] > sizes[4]
  # Room for a little more than the micro-batch-4 step: 4 is chosen, not 8 or 16.
  room = sizes[4] + (sizes[8] - sizes[4]) // 2
  monkeypatch.setattr(plan, "device_memory_bytes", lambda: int(room / plan.HEADROOM))
  assert plan.fit_micro_batch(*args) == 4
  monkeypatch.setattr(plan, "device_memory_bytes", lambda: 10**12)
  assert plan.fit_micro_batch(*args) == 16  # the whole per-shard batch: no accumulation
  monkeypatch.setattr(plan, "device_memory_bytes", lambda: 1000)
  with pytest.raises(config_lib.ConfigError, match="even a micro-batch of 1 sequence"):
    plan.fit_micro_batch(*args)


def _planned(**kwargs):
  config = tiny_config(**kwargs)
  config.data.vocab_size = 128  # the vocabulary `build` gives the model
  return config, plan.analyze(config, sharding.jax.devices()[:8])


@pytest.mark.devices(8)
@pytest.mark.parametrize("fsdp", [1, 2, 4, 8])
def test_planned_parameter_memory_falls_with_fsdp_and_matches_placed_arrays(fsdp):
  config, plan_ = _planned(batch_size=8, mesh=(8 // fsdp, fsdp, 1))
  _, full = _planned(batch_size=8, mesh=(8, 1, 1))
  # ~1/fsdp: only the small biases over `heads`/`mlp` (not `embed`) stay whole on every device.
  for key in ("params_bytes", "optimizer_bytes"):
    assert full[key] / fsdp <= plan_[key] <= 1.1 * full[key] / fsdp + 64, (key, plan_[key], full[key])
  _, state, _, _, _ = build(config)
  placed = sum(leaf.addressable_shards[0].data.nbytes for leaf in sharding.jax.tree.leaves(state["params"]))
  assert plan_["params_bytes"] == placed


@pytest.mark.devices(8)
def test_fsdp_keeps_activations_split_over_the_batch():
  """Without the batch constraint GSPMD replicated the batch under FSDP (8x the temporaries)."""
  _, base = _planned(batch_size=16, mesh=(8, 1, 1), block_size=64)
  _, fsdp = _planned(batch_size=16, mesh=(1, 8, 1), block_size=64)
  assert fsdp["temp_bytes"] < 2 * base["temp_bytes"]


@pytest.mark.devices(8)
def test_variants_are_compiled_only_when_the_plan_does_not_fit():
  config = tiny_config(batch_size=8, mesh=(1, 2, 1), block_size=64)
  config.data.vocab_size = 128
  devices = sharding.jax.devices()[:2]
  base = plan.analyze(config, devices)
  assert plan.variants(config, devices, base, hbm_bytes=10**12) == []
  hbm = int(0.9 * base["total_bytes"] / plan.HEADROOM)  # just too small for the plan
  rows = {(r["dtype"], r["remat"]): r for r in plan.variants(config, devices, base, hbm)}
  assert set(rows) == {("float32", "dots"), ("float32", "full"), ("bfloat16", "none"), ("bfloat16", "dots"),
                       ("bfloat16", "full")}
  # Each row is its own compile: remat keeps fewer activations; state (arguments) is unchanged.
  assert rows["float32", "full"]["temp_bytes"] < rows["float32", "dots"]["temp_bytes"] < 0.8 * base["temp_bytes"]
  for row in rows.values():
    assert row["fits"] == (row["total_bytes"] <= plan.HEADROOM * hbm)
    assert row["total_bytes"] - row["temp_bytes"] == base["total_bytes"] - base["temp_bytes"]
  assert rows["float32", "full"]["fits"] and rows["float32", "full"]["max_micro_batch"] >= base["micro_batch"]


@pytest.mark.devices(8)
def test_suggested_state_follows_the_rules_including_indivisible_degrees():
  config, base = _planned(batch_size=8, mesh=(8, 1, 1), n_embd=48, n_head=8)
  rows = {r["fsdp"]: r for r in plan.suggest(config, base, n_devices=64, hbm_bytes=10**12)}
  assert sorted(rows) == [1, 2, 4, 8, 16, 32, 64]
  np.testing.assert_allclose(rows[1]["state_gib"] * 2**30, base["params_bytes"] + base["optimizer_bytes"])
  # ~1/fsdp while fsdp divides embed=48; at 32 and 64 the embed dimension stays whole on every device.
  for fsdp in (2, 4, 8, 16):
    assert not rows[fsdp]["replicated"]
    assert rows[1]["state_gib"] / fsdp <= rows[fsdp]["state_gib"] <= 1.2 * rows[1]["state_gib"] / fsdp
  assert rows[32]["replicated"] and rows[64]["replicated"] and rows[32]["state_gib"] > rows[16]["state_gib"]
  assert rows[16]["max_micro_batch"] >= rows[1]["max_micro_batch"] > 0


def _plan_cli(*args):
  return subprocess.run([sys.executable, "-m", "gptjax.plan", *args], cwd=pathlib.Path(__file__).parents[1],
                        capture_output=True, text=True, timeout=300)


def test_cli_lowers_the_train_step_for_a_tpu_and_reports_the_kernel():
  result = _plan_cli("--config=configs/quickstart.py", "--mesh=2,2,2", "--platform=tpu",
                     "--config.model.dtype=bfloat16")
  assert result.returncode == 0, result.stderr[-3000:]
  assert ("train step for tpu on mesh {'data': 2, 'fsdp': 2, 'tensor': 2}, model.attention: auto -> pallas: "
          "lowered; attention as lowered: pallas splash (Mosaic tpu_custom_call)") in result.stdout
  assert json.loads(result.stdout.splitlines()[-1])["ok"]


def test_cli_reports_a_step_that_does_not_lower_and_fails():
  result = _plan_cli("--config=configs/quickstart.py", "--mesh=1,8,1", "--platform=cuda",
                     "--config.model.attention=pallas")
  assert result.returncode == 1
  assert "FAILED: ConfigError: model.attention='pallas' is a TPU kernel and the platform is 'cuda'" in result.stdout


def test_cuda_check_names_the_kernel_it_could_not_lower_here():
  config = tiny_config(batch_size=8, mesh=(8, 1, 1))
  config.model.dtype = "bfloat16"
  report = plan.check_lowering(config, sharding.jax.devices()[:8], "cuda")
  assert report["ok"] and report["attention"] == "auto -> xla", report
  assert report["note"].startswith("cudnn lowers only on a machine with cuDNN")
  assert report["lowered"] == "XLA ops (no fused-attention custom call)"



needs_libtpu = pytest.mark.skipif(not tpu.available(), reason=f"libtpu is not installed ({tpu.EXTRA})")


@needs_libtpu
def test_cli_tpu_says_the_state_alone_exceeds_one_chip_and_how_many_chips_of_fsdp_hold_it():
  result = _plan_cli("--config=configs/gpt2_xl.py", "--tpu=v5e-1", "--config.model.dtype=bfloat16")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["state_exceeds_chip"] and not report["fits"] and not report["compiled"]
  # GPT-2 XL: 1.56B parameters, fp32 master weights + two Adam moments = 12 bytes each, on one chip.
  assert 17.3 * 2**30 < report["params_bytes"] + report["optimizer_bytes"] < 17.5 * 2**30
  assert report["fsdp_needed"]["fsdp"] == 4
  assert "RESOURCE_EXHAUSTED" in report["compiler_error"]
  assert "it needs FSDP over at least 4 chips" in result.stdout and "--tpu=v5e-4" in result.stdout


@needs_libtpu
def test_cli_tpu_compiles_the_step_for_a_slice_with_fsdp_and_reports_the_compilers_numbers():
  result = _plan_cli("--config=configs/quickstart.py", "--tpu=v5p-8", "--config.model.dtype=bfloat16",
                     "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--anatomy")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert report["attention"] == "auto -> pallas" and report["mosaic_kernels"] > 0
  assert report["fits"] and report["total_bytes"] == (report["argument_bytes"] + report["temp_bytes"] +
                                                      report["output_bytes"])
  # The arguments are this chip's quarter of the state (as placed by the rules) and its rows of the batch, laid out
  # in the TPU's tiles: small arrays (biases, LayerNorm scales of 192) are padded to whole tiles.
  state = report["params_bytes"] + report["optimizer_bytes"]
  assert state <= report["argument_bytes"] <= 1.5 * state
  assert report["collectives"]["all-gather"] > 0 and report["collectives"]["reduce-scatter"] + \
      report["collectives"]["all-reduce"] > 0  # FSDP: weights gathered, gradients reduced
  assert 0 < report["roofline_compute_s"] <= report["step_time_bound_s"] and 0 < report["mfu_ceiling"] <= 1
  assert "(TPU compiler's memory_analysis)" in result.stdout and "roofline:" in result.stdout
  # --anatomy: the step's bytes per token by part, from the TPU compiler's program, against each part's floor.
  anatomy = report["anatomy"]
  assert "step anatomy, per token" in result.stdout and "costliest instructions" in result.stdout
  for part in ("embedding", "layer norms", "attention projections", "attention (kernel)", "MLP", "LM head + loss",
               "optimizer update"):
    row = anatomy["parts"][part]
    assert row["bytes_per_token"] > 0 and row["floor_bytes_per_token"] > 0, part
  # The instructions, costed one at a time, account for the compiler's whole-program figure but for the TPU's tile
  # padding, which weighs most in a model this narrow (192 wide: 58% covered; GPT-2 small: 74%).
  assert 0.45 <= anatomy["instructions_bytes_per_token"] / anatomy["compiler_bytes_per_token"] <= 1.1
  assert anatomy["parts"]["MLP"]["flops_per_token"] > 0 and len(anatomy["top"]) == 20
  assert any(i["source"].startswith("gptjax/") for i in anatomy["top"])


def test_anatomy_without_a_tpu_is_one_error_line():
  result = _plan_cli("--config=configs/quickstart.py", "--anatomy")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("error: --anatomy reads the TPU compiler's numbers")
