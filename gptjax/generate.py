"""Text generation: KV-cache decoding with greedy, temperature, top-k and top-p (nucleus) sampling.

How a batch is decoded (docs/generate.md says more):
- Prompts are left-padded to a bucket length (a power of two, at least MIN_BUCKET, at most block_size), so all
  rows end at the same cache slot. A row's positions count from its first real token; padding is masked out.
- One jitted prefill runs the padded prompts into a KV cache of static length S = bucket(prompt + new tokens),
  at most block_size. Then one jitted `lax.while_loop` draws a token, runs it against the cache and repeats, for
  up to k tokens per call: k is an argument, so chunks of any size (streaming) reuse one compilation.
- Beyond block_size the window slides: when the cache is full, the last block_size // 2 tokens are prefilled into
  a fresh cache and decoding goes on, so every token sees between block_size // 2 and block_size tokens.
- Draws are keyed by (seed, sample index, token index): the same seed gives the same text whatever the chunking,
  and a prompt's samples do not depend on the other prompts in the batch.
"""

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import config as config_lib, quantize, sharding
from gptjax.model import LayerCache, unstack_layers

# Prompt and cache lengths are rounded up to powers of two from here: few shapes, so few compilations.
MIN_BUCKET = 16
# Logical axes of the KV cache before batch and heads are flattened into its first dimension.
CACHE_AXES = ("batch", "heads", "context", "head_dim")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How each next token is drawn; hashable, as it is a static argument of the jitted decode loop."""
  # Softmax temperature; 0 = greedy (always the most likely token).
  temperature: float = 1.0
  # Draw only among the k most likely tokens (0 = no limit).
  top_k: int = 0
  # Draw only among the fewest most likely tokens whose probability reaches top_p (1 = no limit).
  top_p: float = 1.0
  # Ids >= vocab_limit (the model's vocabulary padding) are never drawn; None = any id.
  vocab_limit: int | None = None
  # A row ends when it draws eos_id (None = never); its later tokens are eos_id too.
  eos_id: int | None = None

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no top-k limit).")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus limit).")
    if self.vocab_limit is not None and self.vocab_limit <= 0:
      raise ValueError(f"vocab_limit={self.vocab_limit} must be positive (the tokenizer's vocab_size), or None.")


def sample_tokens(logits_BV: jax.Array, keys_B: jax.Array, sampling: Sampling) -> jax.Array:
  """One token per row from its logits and PRNG key: argmax, or a draw after temperature, top-k and top-p."""
  V = logits_BV.shape[-1]
  limit = min(sampling.vocab_limit or V, V)
  logits_BV = jnp.where(jnp.arange(V) < limit, logits_BV.astype(jnp.float32), -jnp.inf)
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sampling.temperature
  if sampling.top_k or sampling.top_p < 1:
    top_BK = jax.lax.top_k(logits_BV, min(sampling.top_k or limit, limit))[0]  # sorted, largest first
    if sampling.top_p < 1:
      # Keep a token while the tokens above it hold less than top_p (of the top-k's renormalised mass).
      probs_BK = jax.nn.softmax(top_BK, axis=-1)
      kept_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK < sampling.top_p
      top_BK = jnp.where(kept_BK, top_BK, jnp.inf)
    logits_BV = jnp.where(logits_BV >= jnp.min(top_BK, axis=-1, keepdims=True), logits_BV, -jnp.inf)
  # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
  gumbel_BV = jax.vmap(lambda key: jax.random.gumbel(key, (V,)))(keys_B)
  return jnp.argmax(logits_BV + gumbel_BV, axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
  """What the decode loop carries (arrays only: it is donated from one call to the next)."""
  cache: tuple[LayerCache, ...]
  tokens_BS: jax.Array  # int32: the token at every cache slot (padding, prompt, drawn)
  pad_B: jax.Array  # int32: padding slots before each row's text
  index: jax.Array  # int32 scalar: slots filled so far
  logits_BV: jax.Array  # float32: the prediction for slot `index`
  done_B: jax.Array  # bool: the row has drawn eos_id
  keys_B: jax.Array  # each row's PRNG key, from the seed and the row's sample index
  drawn: jax.Array  # int32 scalar: tokens drawn so far, window slides included (the draw's key)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "placement"))
def _prefill(params, prompt_BP, pad_B, keys_B, done_B, drawn, graphdef, cache_len, placement) -> DecodeState:
  """Runs left-padded prompts into a fresh cache of cache_len slots (placed as `placement`, if given)."""
  model = nnx.merge(graphdef, quantize.dequantize(params))
  B, prompt_len = prompt_BP.shape
  cache = model.init_cache(B, cache_len)
  if placement is not None:
    cache = jax.lax.with_sharding_constraint(cache, placement)
  h_BPD, cache = model.extend(prompt_BP, cache, jnp.int32(0), pad_B)
  if placement is not None:
    cache = jax.lax.with_sharding_constraint(cache, placement)
  tokens_BS = jnp.zeros((B, cache_len), jnp.int32).at[:, :prompt_len].set(prompt_BP)
  return DecodeState(cache, tokens_BS, pad_B, jnp.int32(prompt_len), model.logits(h_BPD[:, -1:])[:, 0], done_B,
                     keys_B, jnp.asarray(drawn, jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "widen_each_step"), donate_argnames="state")
def _decode(params, state: DecodeState, num_tokens, graphdef, sampling: Sampling,
            widen_each_step: bool = False) -> DecodeState:
  """Draws up to num_tokens tokens per row; stops early when the cache is full or every row has ended.

  Narrow weights (`quantize`) are widened once per call, or with widen_each_step inside every step, where the
  backend fuses the widening into the matmuls (see `quantize.widen_each_step`)."""
  model = nnx.merge(graphdef, quantize.dequantize(params))
  end = jnp.minimum(state.index + num_tokens, state.tokens_BS.shape[1])

  def running(state):
    return (state.index < end) & ~jnp.all(state.done_B)

  def step(state):
    keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys_B, state.drawn)
    token_B = sample_tokens(state.logits_BV, keys_B, sampling)
    done_B = state.done_B
    if sampling.eos_id is not None:
      token_B = jnp.where(done_B, sampling.eos_id, token_B)
      done_B = done_B | (token_B == sampling.eos_id)
    tokens_BS = jax.lax.dynamic_update_slice_in_dim(state.tokens_BS, token_B[:, None], state.index, axis=1)
    step_model = nnx.merge(graphdef, quantize.widen_each_step(params, state.index)) if widen_each_step else model
    h_B1D, cache = step_model.extend(token_B[:, None], state.cache, state.index, state.pad_B)
    return state._replace(cache=cache, tokens_BS=tokens_BS, index=state.index + 1,
                          logits_BV=step_model.logits(h_B1D)[:, 0], done_B=done_B, drawn=state.drawn + 1)

  return jax.lax.while_loop(running, step, state)


def bucket(n: int, cap: int, per_doubling: int = 1) -> int:
  """The padded length of n tokens, at most cap: the first of MIN_BUCKET x 2^(k / per_doubling), rounded up to a
  multiple of 16, that holds them. Few compiled shapes, little padding: per_doubling=1 gives powers of two
  (prompts, caches, fine-tuning batches); 4 gives 16, 32, 48, 64, 80, 96, 112, 128, 160, ..., 256, 304, 368, 432,
  512, ... (harness requests: under a fifth of a row is padding)."""
  k = 0
  while (size := -(-round(MIN_BUCKET * 2 ** (k / per_doubling)) // 16) * 16) < n:
    k += 1
  return min(size, cap)


def cache_sharding(mesh, rules, batch: int, n_head: int, length: int, head_dim: int) -> NamedSharding:
  """Placement of a [Z, S, H] cache: Z = B*N split over the batch's mesh axes, then the heads' (B-major)."""
  spec = sharding.logical_to_spec(CACHE_AXES, (batch, n_head, length, head_dim), rules, mesh)
  flat = [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec[:2]]
  z_axes = flat[0] + flat[1]
  return NamedSharding(mesh, P(z_axes or None, *spec[2:]))


def stream(params, graphdef, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
           seed: int = 0, num_samples: int = 1, chunk_tokens: int = 0, rules=config_lib.DEFAULT_RULES,
           weights: str | None = None) -> Iterator[np.ndarray]:
  """Continues each prompt num_samples times, yielding the new tokens [rows, n] of each chunk as it is decoded.

  Rows are prompt-major (row r continues prompts[r // num_samples]); a chunk holds at most chunk_tokens tokens
  (0 = everything in one chunk); decoding ends after max_new_tokens tokens or when every row has drawn eos_id.
  Parameters placed on a mesh (by `rules`) keep their placement; the cache follows the same rules. `weights`
  ('bfloat16', 'int8') stores the matrices narrow for this call (`quantize`); params may also come quantized.
  """
  if max_new_tokens < 0 or chunk_tokens < 0 or num_samples < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} and chunk_tokens={chunk_tokens} must be >= 0 and "
                     f"num_samples={num_samples} >= 1.")
  if max_new_tokens == 0:
    return
  graphdef, params = unstack_layers(graphdef, params)
  cfg = nnx.merge(graphdef, params).cfg
  params = quantize.quantize(params, weights)
  widen_each_step = quantize.is_narrow(params) and (cfg.platform or jax.default_backend()) != "cpu"
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty; start it with the tokenizer's eos_id to generate from nothing.")
  # The newest tokens of a prompt longer than the context.
  rows = [list(prompt)[-cfg.block_size:] for prompt in prompts for _ in range(num_samples)]
  mesh = sharding.params_mesh(params)
  # On a mesh, filler rows (already ended) make the batch divisible by its devices: split, not replicated.
  fillers = 0 if mesh is None else -len(rows) % sharding.batch_degree(mesh, rules)
  batch = rows + rows[:1] * fillers
  B = len(batch)
  prompt_len = bucket(max(map(len, rows)), cfg.block_size)
  # Left padding takes cache slots but no positions: the cache may hold up to block_size tokens plus padding.
  cache_len = bucket(prompt_len + max_new_tokens, 2 * cfg.block_size)
  pad_B = np.array([prompt_len - len(row) for row in batch], np.int32)
  prompt_BP = np.zeros((B, prompt_len), np.int32)
  for b, row in enumerate(batch):
    prompt_BP[b, pad_B[b]:] = row
  placement = None if mesh is None else cache_sharding(mesh, rules, B, cfg.n_head, cache_len, cfg.head_dim)
  keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), np.arange(B) % num_samples)
  done_B = np.arange(B) >= len(rows)
  state = _prefill(params, prompt_BP, pad_B, keys_B, done_B, 0, graphdef, cache_len, placement)
  index, tokens_BS, remaining = prompt_len, prompt_BP, max_new_tokens
  chunk_tokens = chunk_tokens or max_new_tokens
  while remaining > 0:
    # Slots left before the longest row's window holds block_size tokens (positions run out there).
    room = min(cfg.block_size + int(pad_B.min()) - index, cache_len - index)
    if room == 0:
      # Slide: keep the newest half of the context, re-encoded at positions from 0.
      keep = cfg.block_size // 2
      pad_B = np.maximum(pad_B - (index - keep), 0)
      state = _prefill(params, tokens_BS[:, index - keep:index], pad_B, state.keys_B, state.done_B, state.drawn,
                       graphdef, cache_len, placement)
      index = keep
      room = min(cfg.block_size + int(pad_B.min()) - index, cache_len - index)
    state = _decode(params, state, np.int32(min(remaining, chunk_tokens, room)), graphdef, sampling,
                    widen_each_step)
    start = index
    index, tokens_BS, done_B = jax.device_get((state.index, state.tokens_BS, state.done_B))
    remaining -= index - start
    yield tokens_BS[:len(rows), start:index]
    if done_B.all():
      return


def generate_batch(params, graphdef, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   sampling: Sampling = Sampling(), seed: int = 0, num_samples: int = 1,
                   rules=config_lib.DEFAULT_RULES, weights: str | None = None) -> np.ndarray:
  """`stream` in one piece: the new tokens [rows, n]; n < max_new_tokens only when every row drew eos_id."""
  chunks = list(stream(params, graphdef, prompts, max_new_tokens, sampling, seed, num_samples, rules=rules,
                       weights=weights))
  return np.concatenate(chunks, axis=1) if chunks else np.zeros((len(prompts) * num_samples, 0), np.int32)


def generate(params, graphdef, prompt_ids: Sequence[int], num_samples: int, max_new_tokens: int, seed: int = 0,
             temperature: float = 0.8, top_k: int = 200, top_p: float = 1.0, vocab_limit: int | None = None,
             eos_id: int | None = None, rules=config_lib.DEFAULT_RULES) -> np.ndarray:
  """Continues one prompt num_samples times: new ids [num_samples, max_new_tokens] (fewer if all drew eos_id)."""
  sampling = Sampling(temperature, top_k, top_p, vocab_limit, eos_id)
  return generate_batch(params, graphdef, [prompt_ids], max_new_tokens, sampling, seed, num_samples, rules)


def _held_back(text: str, stop: Sequence[str]) -> int:
  """Characters at the end of text that may still change: an incomplete UTF-8 character, or a stop string's start."""
  held = len(text) - len(text.rstrip("\ufffd"))
  for s in stop:
    held = max(held, next((n for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), 0))
  return held


def stream_text(params, graphdef, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                sampling: Sampling = Sampling(), seed: int = 0, num_samples: int = 1, chunk_tokens: int = 16,
                stop: Sequence[str] = (), rules=config_lib.DEFAULT_RULES,
                weights: str | None = None) -> Iterator[tuple[list[str], int]]:
  """`stream` for text: yields (each row's new text, tokens decoded per row so far) per chunk.

  A row ends at eos_id or before the first stop string. An empty prompt starts from end-of-text. Text that a
  later token could still change (a partial UTF-8 character, the beginning of a stop string) is held back
  until it is settled.
  """
  ids = [list(tokenizer.encode(p)) or [tokenizer.eos_id] for p in prompts]
  B = len(ids) * num_samples
  new_ids = [[] for _ in range(B)]
  shown = [0] * B
  ended = [False] * B

  def deltas(final: bool) -> list[str]:
    out = []
    for b in range(B):
      text = tokenizer.decode(new_ids[b])
      cuts = [text.find(s) for s in stop if s in text]
      if cuts:
        text, ended[b] = text[:min(cuts)], True
      elif not (final or ended[b]):
        text = text[:len(text) - _held_back(text, stop)]
      out.append(text[shown[b]:])
      shown[b] = max(shown[b], len(text))
    return out

  decoded = 0
  for chunk_BN in stream(params, graphdef, ids, max_new_tokens, sampling, seed, num_samples, chunk_tokens, rules,
                         weights):
    decoded += chunk_BN.shape[1]
    for b, row in enumerate(chunk_BN):
      if not ended[b]:
        row = list(row)
        if sampling.eos_id in row:
          row, ended[b] = row[:row.index(sampling.eos_id)], True
        new_ids[b] += row
    yield deltas(final=False), decoded
    if all(ended):
      return
  yield deltas(final=True), decoded


def generate_text(params, graphdef, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                  sampling: Sampling = Sampling(), seed: int = 0, num_samples: int = 1, stop: Sequence[str] = (),
                  rules=config_lib.DEFAULT_RULES, weights: str | None = None) -> list[str]:
  """`stream_text` in one piece: each row's continuation (without its prompt)."""
  texts = [""] * (len(prompts) * num_samples)
  for deltas, _ in stream_text(params, graphdef, tokenizer, prompts, max_new_tokens, sampling, seed, num_samples,
                               chunk_tokens=0, stop=stop, rules=rules, weights=weights):
    texts = [t + d for t, d in zip(texts, deltas)]
  return texts
