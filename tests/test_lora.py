"""LoRA adapters: identity at init, merge equals the unmerged low-rank math, parameter counts, bad settings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.finetune import classify, lora
from tests.helpers import tiny_gpt

L, D, N, C, VOCAB, T = 2, 32, 4, 2, 32, 12  # tiny_gpt's layers, width, heads, vocab; classes, sequence length


def _random_b(adapters, seed=1):
  """Adapters with B random too, so the low-rank update is not zero."""
  key = jax.random.key(seed)
  return {path: {"a": ab["a"], "b": 0.1 * jax.random.normal(jax.random.fold_in(key, i), ab["b"].shape)}
          for i, (path, ab) in enumerate(sorted(adapters.items()))}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_at_init_leaves_outputs_unchanged(scan_layers):
  graphdef, params = tiny_gpt(scan_layers)
  adapters = lora.init_adapters(params, ("qkv", "out", "fc", "proj"), 4, jax.random.key(1))
  assert len(adapters) == (4 if scan_layers else 4 * L)
  forward = jax.jit(lambda p: nnx.merge(graphdef, p)(jnp.arange(2 * T).reshape(2, T) % VOCAB))
  base_h = forward(params)
  np.testing.assert_array_equal(forward(lora.merge(params, adapters, alpha=8.0, rank=4)), base_h)
  assert np.abs(forward(lora.merge(params, _random_b(adapters), alpha=8.0, rank=4)) - base_h).max() > 1e-3


def test_merged_kernels_equal_the_unmerged_computation():
  """x through W + s*A@B, contracted as the model contracts each kernel, equals x@W + s*(x@A)@B, per layer."""
  _, params = tiny_gpt()
  rank, alpha = 4, 8.0
  adapters = _random_b(lora.init_adapters(params, ("qkv", "out", "fc", "proj"), rank, jax.random.key(2)))
  merged = lora.merge(params, adapters, alpha, rank)
  x_BD = jax.random.normal(jax.random.key(3), (3, D))
  h_BF = jax.random.normal(jax.random.key(4), (3, 4 * D))
  contractions = {  # path: (input, the model's contraction of it with a layer's kernel)
      "blocks/attn/qkv_kernel": (x_BD, lambda x, w: jnp.einsum("bd,dcnh->bcnh", x, w)),
      "blocks/attn/out_kernel": (x_BD.reshape(3, N, D // N), lambda x, w: jnp.einsum("bnh,nhd->bd", x, w)),
      "blocks/mlp/fc/kernel": (x_BD, lambda x, w: x @ w),
      "blocks/mlp/proj/kernel": (h_BF, lambda x, w: x @ w)}
  at = lambda tree, path: functools.reduce(lambda node, name: node[name], path.split("/"), tree)
  for path, (x, contract) in contractions.items():
    for i in range(L):
      a_IR, b_RO = adapters[path]["a"][i], adapters[path]["b"][i]
      unmerged = contract(x, at(params, path)[i]).reshape(3, -1) + alpha / rank * (x.reshape(3, -1) @ a_IR) @ b_RO
      np.testing.assert_allclose(contract(x, at(merged, path)[i]).reshape(3, -1), unmerged, rtol=1e-5, atol=1e-5,
                                 err_msg=f"{path} layer {i}")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_trainable_parameter_count_matches_hand_computation(scan_layers):
  _, params = tiny_gpt(scan_layers)
  rank = 4
  adapters = lora.init_adapters(params, ("qkv", "out", "fc", "proj"), rank, jax.random.key(0))
  # Per layer r * (in + out): qkv D -> 3D, out D -> D, fc D -> 4D, proj 4D -> D.
  per_layer = rank * ((D + 3 * D) + (D + D) + (D + 4 * D) + (4 * D + D))
  assert lora.count(adapters) == L * per_layer == 4096
  head = classify.init_head(D, C, jax.random.key(0))
  assert lora.count({"lora": adapters, "head": head}) == 4096 + D * C + C
  only_attention = lora.init_adapters(params, ("qkv", "out"), rank, jax.random.key(0))
  assert lora.count(only_attention) == L * rank * (4 * D + 2 * D)


def test_bad_lora_settings_are_rejected():
  _, params = tiny_gpt()
  with pytest.raises(ValueError, match="subset of"):
    lora.init_adapters(params, ("qkv", "attn"), 4, jax.random.key(0))
  with pytest.raises(ValueError, match="rank"):
    lora.init_adapters(params, ("qkv",), 0, jax.random.key(0))
  _, unstacked = tiny_gpt(scan_layers=False)
  with pytest.raises(ValueError, match="another model layout"):
    lora.merge(unstacked, lora.init_adapters(params, ("fc",), 2, jax.random.key(0)), 4.0, 2)


def test_merge_of_a_hand_made_tree_equals_numpy():
  """A stacked fc kernel [L, in, out]: x W' = x W + (alpha / r) (x A) B per layer; other leaves stay as they are."""
  rng = np.random.RandomState(0)
  w_LIO, bias_O = rng.randn(2, 5, 7).astype(np.float32), rng.randn(7).astype(np.float32)
  params = {"blocks": {"mlp": {"fc": {"kernel": jnp.asarray(w_LIO), "bias": jnp.asarray(bias_O)}}}}
  a_LIR, b_LRO = rng.randn(2, 5, 3).astype(np.float32), rng.randn(2, 3, 7).astype(np.float32)
  adapters = {"blocks/mlp/fc/kernel": {"a": jnp.asarray(a_LIR), "b": jnp.asarray(b_LRO)}}
  merged = lora.merge(params, adapters, alpha=6.0, rank=3)
  x_BI = rng.randn(4, 5).astype(np.float32)
  for i in range(2):
    expected_BO = x_BI @ w_LIO[i] + 2.0 * (x_BI @ a_LIR[i]) @ b_LRO[i]
    np.testing.assert_allclose(x_BI @ np.asarray(merged["blocks"]["mlp"]["fc"]["kernel"][i]), expected_BO,
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(merged["blocks"]["mlp"]["fc"]["bias"], bias_O)
  np.testing.assert_array_equal(params["blocks"]["mlp"]["fc"]["kernel"], w_LIO)  # the input is not changed
  assert lora.count(adapters) == 2 * 5 * 3 + 2 * 3 * 7
  assert lora.count(params) == 2 * 5 * 7 + 7


def test_init_adapters_shapes_and_scale():
  """A [..., in, r] ~ N(0, 1/in), B zeros, per target kernel seen as [in, out]: qkv [D, 3D], out [D, D]."""
  _, params = tiny_gpt()
  adapters = lora.init_adapters(params, ("qkv", "out"), 8, jax.random.key(0))
  assert {p: (ab["a"].shape, ab["b"].shape) for p, ab in adapters.items()} == {
      "blocks/attn/qkv_kernel": ((L, D, 8), (L, 8, 3 * D)), "blocks/attn/out_kernel": ((L, D, 8), (L, 8, D))}
  a = np.asarray(adapters["blocks/attn/qkv_kernel"]["a"])
  assert 0.7 / np.sqrt(D) < a.std() < 1.3 / np.sqrt(D)  # 512 samples: within 30% of 1/sqrt(in)
  assert not np.asarray(adapters["blocks/attn/qkv_kernel"]["b"]).any()
