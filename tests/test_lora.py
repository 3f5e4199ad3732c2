"""Adapters in the forward pass: identity at init, equal to the merged kernels, parameter counts, bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax.finetune import classify, lora
from gptjax.model import GPT
from tests.helpers import tiny_gpt

L, D, N, C, VOCAB, T = 2, 32, 4, 2, 32, 12  # tiny_gpt's layers, width, heads, vocab; classes, sequence length
ALL = ("qkv", "out", "fc", "proj")


def _adapted(scan_layers, method="lora", rank=4, alpha=8.0, targets=ALL):
  """(graphdef of the adapted model, base params, adapters) over tiny_gpt's base."""
  graphdef, params = tiny_gpt(scan_layers)
  cfg = lora.LoraConfig(rank=rank, alpha=alpha, targets=targets, method=method).model(nnx.merge(graphdef,
                                                                                                   params).cfg)
  adapted_graphdef = nnx.split(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))))[0]
  return adapted_graphdef, params, lora.init_adapters(cfg, jax.random.key(1))


def _randomized(adapters, seed=2):
  """Every adapter leaf random (B and Λ too), so the low-rank update is not zero."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


TOKENS = jnp.arange(2 * T).reshape(2, T) % VOCAB


@pytest.mark.parametrize("scan_layers, method", [(True, "lora"), (False, "adalora")])
def test_adapters_at_init_leave_outputs_unchanged(scan_layers, method):
  graphdef, params, adapters = _adapted(scan_layers, method)
  base_h = jax.jit(lambda p: nnx.merge(tiny_gpt(scan_layers)[0], p)(TOKENS))(params)
  adapted_h = jax.jit(lambda a: nnx.merge(graphdef, lora.combine(params, a))(TOKENS))(adapters)
  np.testing.assert_allclose(adapted_h, base_h, rtol=1e-5, atol=1e-5)  # B (LoRA) or Λ (AdaLoRA) is zero


@pytest.mark.parametrize("scan_layers, method", [(True, "adalora"), (False, "lora")])
def test_forward_pass_adapters_equal_the_merged_kernels(scan_layers, method):
  """x·W + s·(x·A)·B in the forward pass (decode path too) equals the plain model with W + s·A·B merged in."""
  graphdef, params, adapters = _adapted(scan_layers, method)
  adapters = _randomized(adapters)
  base_graphdef = tiny_gpt(scan_layers)[0]
  adapted = nnx.merge(graphdef, lora.combine(params, adapters))
  merged = nnx.merge(base_graphdef, lora.merge(lora.combine(params, adapters), scale=8.0 / 4))
  h, expected = adapted(TOKENS), merged(TOKENS)
  assert np.abs(h - nnx.merge(base_graphdef, params)(TOKENS)).max() > 1e-3  # the adapters matter
  np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-5)
  cache = adapted.init_cache(2, 16)
  decoded, _ = adapted.extend(TOKENS, cache, jnp.int32(0), jnp.zeros(2, jnp.int32))
  np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("scan_layers, method", [(True, "lora"), (False, "adalora")])
def test_token_embedding_adapter_equals_the_merged_table_in_lookup_and_tied_head(scan_layers, method):
  """wte adapted (peft's LoRA on an Embedding): the lookup, the decode path and the tied head's logits equal the
  plain model with wte + s·A·B merged in; the adapter adds r·(V + D) parameters (AdaLoRA: + r)."""
  rank = 4
  graphdef, params, adapters = _adapted(scan_layers, method, rank=rank, targets=("wte", "fc"))
  fc_count = L * rank * (D + 4 * D) + (L * rank if method == "adalora" else 0)
  assert lora.count(adapters) - fc_count == rank * (VOCAB + D) + (rank if method == "adalora" else 0)
  adapters = _randomized(adapters)
  adapted = nnx.merge(graphdef, lora.combine(params, adapters))
  merged = nnx.merge(tiny_gpt(scan_layers)[0], lora.merge(lora.combine(params, adapters), scale=8.0 / rank))
  base_wte = np.asarray(params["wte"]["embedding"])
  assert np.abs(np.asarray(merged.wte.embedding[...]) - base_wte).max() > 1e-3  # merge changed the table
  h, expected = adapted(TOKENS), merged(TOKENS)
  np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adapted.logits(h), merged.logits(expected), rtol=1e-5, atol=1e-5)
  decoded, _ = adapted.extend(TOKENS, adapted.init_cache(2, 16), jnp.int32(0), jnp.zeros(2, jnp.int32))
  np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda a: adapted.logits(nnx.merge(graphdef, lora.combine(params, a))(TOKENS)).sum())(adapters)
  assert np.abs(grads["wte_adapter"]["b"]).max() > 0 and np.abs(grads["wte_adapter"]["a"]).max() > 0

def test_frozen_kernels_get_no_gradient_and_the_adapters_do():
  graphdef, params, adapters = _adapted(True)
  loss = lambda a, p: nnx.merge(graphdef, lora.combine(p, a))(TOKENS).sum()
  grads = jax.grad(loss)(_randomized(adapters), params)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)  # differentiated w.r.t. the adapters only
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_trainable_parameter_count_matches_hand_computation(scan_layers):
  rank = 4
  _, _, adapters = _adapted(scan_layers, rank=rank)
  # Per layer r * (in + out): qkv D -> 3D, out D -> D, fc D -> 4D, proj 4D -> D.
  per_layer = rank * ((D + 3 * D) + (D + D) + (D + 4 * D) + (4 * D + D))
  assert lora.count(adapters) == L * per_layer == 4096
  head = classify.init_head(D, C, jax.random.key(0))
  assert lora.count({"lora": adapters, "head": head}) == 4096 + D * C + C
  assert lora.count(_adapted(scan_layers, rank=rank, targets=("qkv", "out"))[2]) == L * rank * (4 * D + 2 * D)
  assert lora.count(_adapted(scan_layers, "adalora", rank=rank)[2]) == 4096 + 4 * L * rank  # + Λ per adapter


def test_partition_and_combine_are_inverse():
  _, params, adapters = _adapted(True)
  found, base = lora.partition(lora.combine(params, adapters))
  assert jax.tree.structure(base) == jax.tree.structure(params)
  assert jax.tree.structure(found) == jax.tree.structure(adapters)


def test_bad_lora_settings_are_rejected():
  with pytest.raises(ValueError, match="subset of"):
    _adapted(True, targets=("qkv", "attn"))
  with pytest.raises(ValueError, match="rank"):
    _adapted(True, rank=0)
  with pytest.raises(ValueError, match="lora.method"):
    _adapted(True, method="dora")


def test_merge_of_a_hand_made_tree_equals_numpy():
  """A stacked fc kernel [L, in, out]: x W' = x W + s (x A) B per layer (AdaLoRA: s (x P diag(Λ)) Q); other
  leaves stay as they are and the adapters are dropped."""
  rng = np.random.RandomState(0)
  w_LIO, bias_O = rng.randn(2, 5, 7).astype(np.float32), rng.randn(7).astype(np.float32)
  a_LIR, b_LRO, e_LR = (rng.randn(*s).astype(np.float32) for s in ((2, 5, 3), (2, 3, 7), (2, 3)))
  x_BI = rng.randn(4, 5).astype(np.float32)
  a_LRI = a_LIR.transpose(0, 2, 1)  # stored as Aᵀ
  for adapter, a_eff in (({"a": a_LRI, "b": b_LRO}, a_LIR), ({"a": a_LRI, "b": b_LRO, "e": e_LR}, a_LIR * e_LR[:, None])):
    params = {"blocks": {"mlp": {"fc": {"kernel": jnp.asarray(w_LIO), "bias": jnp.asarray(bias_O)},
                                 "fc_adapter": jax.tree.map(jnp.asarray, adapter)}}}
    merged = lora.merge(params, scale=2.0)
    assert set(merged["blocks"]["mlp"]) == {"fc"}
    for i in range(2):
      expected_BO = x_BI @ w_LIO[i] + 2.0 * (x_BI @ a_eff[i]) @ b_LRO[i]
      np.testing.assert_allclose(x_BI @ np.asarray(merged["blocks"]["mlp"]["fc"]["kernel"][i]), expected_BO,
                                 rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["blocks"]["mlp"]["fc"]["bias"], bias_O)
    np.testing.assert_array_equal(params["blocks"]["mlp"]["fc"]["kernel"], w_LIO)  # the input is not changed


def test_init_adapters_shapes_and_scale():
  """LoRA: A [..., r, in] ~ N(0, 1/in), B zeros; AdaLoRA (as peft): P, Q ~ N(0, 0.02), Λ zeros."""
  _, _, adapters = _adapted(True, rank=8, targets=("qkv", "out"))
  attn = adapters["blocks"]["attn"]
  assert {k: (v["a"].shape, v["b"].shape) for k, v in attn.items()} == {
      "qkv_adapter": ((L, 8, D), (L, 8, 3 * D)), "out_adapter": ((L, 8, D), (L, 8, D))}
  a = np.asarray(attn["qkv_adapter"]["a"])
  assert 0.7 / np.sqrt(D) < a.std() < 1.3 / np.sqrt(D)  # 512 samples: within 30% of 1/sqrt(in)
  assert not np.asarray(attn["qkv_adapter"]["b"]).any()
  ada = _adapted(True, "adalora", rank=8, targets=("qkv",))[2]["blocks"]["attn"]["qkv_adapter"]
  assert 0.014 < np.asarray(ada["b"]).std() < 0.026 and ada["e"].shape == (L, 8) and not np.asarray(ada["e"]).any()
