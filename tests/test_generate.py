"""KV-cache decoding against full forward passes; sampling filters; ragged, chunked, sliding and sharded decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gptjax import generate, sharding, train
from gptjax.generate import Sampling
from gptjax.model import GPT, GPTConfig
from tests.helpers import tiny_config

VOCAB = 96
GREEDY = Sampling(temperature=0)


def _spread(params):
  """Parameters whose predictions are far from uniform (GPT-2's init is nearly uniform: greedy would repeat)."""
  keys = iter(jax.random.split(jax.random.key(1), 100))
  return jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), params)


@functools.cache
def _init(cfg: GPTConfig):
  """(graphdef, spread parameters) of a model, initialised in one jitted call (eager NNX init is slow)."""
  graphdef, _ = train.abstract_model(cfg)
  return graphdef, jax.jit(lambda: _spread(nnx.to_pure_dict(nnx.state(GPT(cfg, nnx.Rngs(0))))))()


def _model(scan_layers=True, block_size=64):
  return _init(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=block_size,
                         scan_layers=scan_layers))


@pytest.fixture(scope="module")
def model():
  return _model()


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, params, tokens_BT):
  m = nnx.merge(graphdef, params)
  return m.logits(m(tokens_BT))


def _full_logits(graphdef, params, tokens) -> np.ndarray:
  """Logits of a full forward pass over tokens (right-padded to the context, which causality ignores)."""
  block_size = nnx.merge(graphdef, params).cfg.block_size
  padded = np.zeros((1, block_size), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_forward_logits(graphdef, params, padded)[0, :len(tokens)])


def _greedy_reference(graphdef, params, prompt, n, cache_len=None):
  """Step-by-step argmax of full passes over the decoder's window: when it holds cache_len (= block_size) tokens,
  it keeps the newest half."""
  tokens, start = list(prompt), 0
  for _ in range(n):
    if cache_len and len(tokens) - start == cache_len:
      start = len(tokens) - cache_len // 2
    tokens.append(int(np.argmax(_full_logits(graphdef, params, tokens[start:])[-1])))
  return tokens[len(prompt):]


@functools.partial(jax.jit, static_argnums=0)
def _extend_logits(graphdef, params, tokens_BT, cache, start, pad_B):
  m = nnx.merge(graphdef, params)
  h_BTD, cache = m.extend(tokens_BT, cache, start, pad_B)
  return m.logits(h_BTD), cache


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_logits_equal_the_full_forward_at_every_position(scan_layers):
  graphdef, params = _model(scan_layers)
  rows = [np.random.RandomState(i).randint(0, VOCAB, n) for i, n in enumerate([20, 13])]
  pad = np.array([0, 7], np.int32)
  tokens = np.zeros((2, 20), np.int32)
  for b, row in enumerate(rows):
    tokens[b, pad[b]:] = row
  # A left-padded prompt of 8 slots, then one token at a time.
  cache = nnx.merge(graphdef, params).init_cache(2, 32)
  logits, cache = _extend_logits(graphdef, params, tokens[:, :8], cache, 0, pad)
  logits = [logits]
  for t in range(8, 20):
    step_logits, cache = _extend_logits(graphdef, params, tokens[:, t:t + 1], cache, t, pad)
    logits.append(step_logits)
  logits = np.concatenate(logits, axis=1)
  for b, row in enumerate(rows):
    np.testing.assert_allclose(logits[b, pad[b]:], _full_logits(graphdef, params, row), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_decoding_equals_stepwise_argmax(scan_layers):
  graphdef, params = _model(scan_layers)
  prompt = [5, 17, 3]
  out = generate.generate(params, graphdef, prompt, 1, 30, temperature=0)
  assert out.shape == (1, 30)
  assert list(out[0]) == _greedy_reference(graphdef, params, prompt, 30)
  assert len(set(out[0])) > 3  # a real test: the model does not just repeat one token


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(temperature=1.0, top_k=20)])
def test_ragged_batch_equals_each_prompt_alone(model, sampling):
  graphdef, params = model
  prompts = [[7], [1, 2, 3, 4, 5], list(range(10, 27))]  # padded to 32 slots: 31, 27 and 15 of padding
  batch = generate.generate_batch(params, graphdef, prompts, 12, sampling, seed=3, num_samples=2)
  assert batch.shape == (6, 12)
  for i, prompt in enumerate(prompts):
    alone = generate.generate_batch(params, graphdef, [prompt], 12, sampling, seed=3, num_samples=2)
    np.testing.assert_array_equal(batch[2 * i:2 * i + 2], alone)


def test_same_seed_same_tokens_whatever_the_chunking(model):
  graphdef, params = model
  sampling = Sampling(temperature=1.0)
  whole = generate.generate_batch(params, graphdef, [[1, 2]], 20, sampling, seed=7, num_samples=3)
  chunks = list(generate.stream(params, graphdef, [[1, 2]], 20, sampling, seed=7, num_samples=3, chunk_tokens=6))
  assert [c.shape[1] for c in chunks] == [6, 6, 6, 2]
  np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole)
  other = generate.generate_batch(params, graphdef, [[1, 2]], 20, sampling, seed=8, num_samples=3)
  assert not np.array_equal(whole, other)
  assert not np.array_equal(whole[0], whole[1])  # each sample has its own draws


def test_prompt_lengths_and_chunk_sizes_in_a_bucket_reuse_one_compilation(model):
  graphdef, params = model
  generate.generate_batch(params, graphdef, [[1, 2, 3]], 20, GREEDY)  # prompt bucket 16, cache bucket 64
  compiled = generate._prefill._cache_size(), generate._decode._cache_size()
  for prompt, new, chunk in (([4], 40, 0), (list(range(16)), 48, 0), ([1, 2], 30, 7), ([9] * 9, 33, 1)):
    list(generate.stream(params, graphdef, [prompt], new, GREEDY, chunk_tokens=chunk))
  assert (generate._prefill._cache_size(), generate._decode._cache_size()) == compiled


def test_decoding_past_the_context_slides_the_window():
  graphdef, params = _model(block_size=32)
  prompt = list(range(1, 17))  # exactly one bucket: no padding, so the window slides at 32 tokens
  out = generate.generate(params, graphdef, prompt, 1, 45, temperature=0)
  assert list(out[0]) == _greedy_reference(graphdef, params, prompt, 45, cache_len=32)


def test_prompt_padding_does_not_shorten_the_context():
  graphdef, params = _model(block_size=64)
  prompt = list(range(1, 35))  # padded to a bucket of 64: the window must still hold 64 real tokens
  out = generate.generate(params, graphdef, prompt, 1, 45, temperature=0)
  assert list(out[0]) == _greedy_reference(graphdef, params, prompt, 45, cache_len=64)


def test_rows_stop_at_eos(model):
  graphdef, params = model
  reference = generate.generate_batch(params, graphdef, [[5, 17, 3], [40]], 30, GREEDY)
  eos = int(reference[0, 4])
  out = generate.generate_batch(params, graphdef, [[5, 17, 3], [40]], 30, Sampling(temperature=0, eos_id=eos))
  for row, ref in zip(out, reference):
    end = list(ref).index(eos) + 1 if eos in ref else len(ref)
    np.testing.assert_array_equal(row[:end], ref[:end])
    assert np.all(row[end:] == eos)
  if eos in reference[1]:  # both rows ended: decoding stopped early
    assert out.shape[1] == max(list(r).index(eos) + 1 for r in reference)


def _draws(logits_V, sampling, n=4000):
  logits_BV = jnp.tile(jnp.asarray(logits_V, jnp.float32), (n, 1))
  keys_B = jax.random.split(jax.random.key(0), n)
  return np.asarray(jax.jit(generate.sample_tokens, static_argnums=2)(logits_BV, keys_B, sampling))


LOGITS = np.log(np.array([0.3, 0.25, 0.15, 0.1, 0.08, 0.05, 0.04, 0.03]))


def test_temperature_one_draws_from_the_softmax():
  counts = np.bincount(_draws(LOGITS, Sampling(temperature=1.0)), minlength=8) / 4000
  np.testing.assert_allclose(counts, np.exp(LOGITS), atol=0.025)  # ~3 standard errors


def test_top_k_draws_only_the_k_best_in_proportion():
  counts = np.bincount(_draws(LOGITS, Sampling(temperature=1.0, top_k=3)), minlength=8) / 4000
  assert counts[3:].sum() == 0
  np.testing.assert_allclose(counts[:3], np.exp(LOGITS[:3]) / np.exp(LOGITS[:3]).sum(), atol=0.025)


@pytest.mark.parametrize("top_p, nucleus", [(0.5, 2), (0.56, 3), (0.01, 1), (0.99, 8)])
def test_top_p_draws_only_from_the_nucleus(top_p, nucleus):
  # Cumulative probabilities 0.3, 0.55, 0.7, ...: the nucleus is the fewest tokens reaching top_p.
  assert set(_draws(LOGITS, Sampling(temperature=1.0, top_p=top_p))) == set(range(nucleus))


def test_top_k_and_top_p_together_renormalise_within_the_top_k():
  # Top 3 renormalised: 0.43, 0.36, 0.21; top_p 0.7 keeps the first two.
  assert set(_draws(LOGITS, Sampling(temperature=1.0, top_k=3, top_p=0.7))) == {0, 1}


def test_vocabulary_padding_is_never_drawn():
  logits = np.concatenate([LOGITS, [5.0, 5.0]])  # padded ids with the largest logits
  assert _draws(logits, Sampling(temperature=0, vocab_limit=8), n=1)[0] == 0
  assert _draws(logits, Sampling(temperature=2.0, vocab_limit=8)).max() < 8


def test_temperature_towards_zero_equals_greedy():
  logits = jax.random.normal(jax.random.key(0), (64, VOCAB))
  keys = jax.random.split(jax.random.key(1), 64)
  cold = generate.sample_tokens(logits, keys, Sampling(temperature=1e-4))
  np.testing.assert_array_equal(cold, generate.sample_tokens(logits, keys, GREEDY))


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(vocab_limit=0)])
def test_bad_sampling_settings_are_rejected(bad):
  with pytest.raises(ValueError, match=list(bad)[0]):
    Sampling(**bad)


def test_empty_prompt_is_rejected(model):
  with pytest.raises(ValueError, match="prompt 1 is empty.*eos_id"):
    generate.generate_batch(model[1], model[0], [[1], []], 4)


class _Chars:
  """A stand-in tokenizer: id i is the character chr(33 + i); id 0 is end-of-text."""
  eos_id = 0

  def encode(self, text):
    return [ord(c) - 33 for c in text]

  def decode(self, ids):
    return "".join(chr(33 + i) for i in ids if i != self.eos_id)


def test_text_streams_stop_before_the_stop_string(model):
  graphdef, params = model
  full = generate.generate_text(params, graphdef, _Chars(), ["ab", "c"], 30, GREEDY)
  stop = full[0][6:8]
  pieces = list(generate.stream_text(params, graphdef, _Chars(), ["ab", "c"], 30, GREEDY, chunk_tokens=1,
                                     stop=[stop]))
  streamed = ["".join(deltas[b] for deltas, _ in pieces) for b in range(2)]
  for text, reference in zip(streamed, full):
    assert text == (reference[:reference.index(stop)] if stop in reference else reference)


SHARDED_SAMPLINGS = (GREEDY, Sampling(temperature=1.0, top_p=0.9))


@pytest.fixture(scope="module")
def single_device():
  """A model every mesh of 8 devices divides (8 heads, width 64), its tokens on one device, 8 rows."""
  config = tiny_config(block_size=32)
  graphdef, params = _init(GPTConfig.from_config(config.model, 128))
  prompts = [list(range(1, n + 1)) for n in (3, 9, 1, 5)]
  return graphdef, params, prompts, [
      generate.generate_batch(params, graphdef, prompts, 10, sampling, seed=1, num_samples=2)
      for sampling in SHARDED_SAMPLINGS], generate.generate(params, graphdef, [5, 6], 3, 10, seed=1)


@pytest.mark.parametrize("mesh_shape, cache_spec", [((8, 1, 1), P("data", None, None)),
                                                    ((2, 2, 2), P(("data", "fsdp", "tensor"), None, None)),
                                                    ((1, 1, 8), P("tensor", None, None))])
@pytest.mark.devices(8)
def test_sharded_decoding_equals_single_device(single_device, mesh_shape, cache_spec):
  graphdef, params, prompts, expected, three_samples = single_device
  config = tiny_config(block_size=32, mesh=mesh_shape)
  mesh = sharding.make_mesh(config)
  abstract = train.abstract_model(nnx.merge(graphdef, params).cfg)[1]
  params = jax.device_put(params, sharding.state_shardings(abstract, config.mesh.rules, mesh))
  assert params["blocks"]["mlp"]["fc"]["kernel"].sharding.mesh.shape == dict(zip(("data", "fsdp", "tensor"),
                                                                                 mesh_shape))
  for sampling, reference in zip(SHARDED_SAMPLINGS, expected):
    out = generate.generate_batch(params, graphdef, prompts, 10, sampling, seed=1, num_samples=2)
    np.testing.assert_array_equal(out, reference)
  # 3 rows: filler rows make them 8, which split over the devices (the training loop's samples do this).
  np.testing.assert_array_equal(generate.generate(params, graphdef, [5, 6], 3, 10, seed=1), three_samples)
  # The cache is split over the batch (data, fsdp) and the heads (tensor), as the rules say.
  placement = generate.cache_sharding(mesh, config.mesh.rules, 8, 8, 32, 8)
  assert placement.spec == cache_spec
  state = generate._prefill(params, np.zeros((8, 16), np.int32), np.zeros(8, np.int32),
                            jax.random.split(jax.random.key(0), 8), np.zeros(8, bool), 0, graphdef, 32, placement)
  assert state.cache[0].k_ZSH.sharding.is_equivalent_to(placement, 3)
  assert state.cache[0].k_ZSH.addressable_shards[0].data.shape == (64 // 8, 32, 8)
