"""Decoding speed (tokens/s) of `gptjax.generate` for the GPT-2 small shape, greedy, after a short prompt.

  python benchmarks/decode.py --peer [--batches=1,8 --new_tokens=100]

For each batch size: our KV-cache decoder (random weights; one prefill, then one jitted while_loop), our own
full-recompute baseline (one jitted fori_loop that runs the whole static-length buffer through the model for
every token, as gptjax did before the cache; timed on --baseline_tokens tokens, since it is slow), and with --peer
transformers' GPT2LMHeadModel.generate with its KV cache (PyTorch, same shape, same run). Tokens/s counts new
tokens over all rows; times are medians of --repeats calls after one warm-up call (which compiles). The weights
are unstacked once beforehand (`model.unstack_layers`), as the sample CLI does once per process.
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks.common import median, report, stream_gbs, time_calls
from gptjax import config as config_lib, generate, metrics
from gptjax.model import GPT, GPTConfig, count_params, unstack_layers

_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes (rows decoded together).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 8, "Prompt length in tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 100, "Tokens generated per row.")
_BASELINE_TOKENS = flags.DEFINE_integer("baseline_tokens", 20, "Tokens per row for the full-recompute baseline.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (after one warm-up call).")
_PEER = flags.DEFINE_bool("peer", False, "Also time transformers' GPT2LMHeadModel.generate in this run.")


@functools.partial(jax.jit, static_argnames=("graphdef", "new_tokens"))
def _full_recompute(params, prompt_BP, graphdef, new_tokens):
  """Greedy decoding without a cache: every token reruns the model over the whole static-length buffer."""
  model = nnx.merge(graphdef, params)
  B, prompt_len = prompt_BP.shape
  buffer_BT = jnp.zeros((B, prompt_len + new_tokens), jnp.int32).at[:, :prompt_len].set(prompt_BP)

  def step(pos, buffer_BT):
    # Causal attention: the not yet written slots after pos - 1 do not change its prediction.
    h_BD = jax.lax.dynamic_index_in_dim(model(buffer_BT), pos - 1, axis=1, keepdims=False)
    token_B = jnp.argmax(model.logits(h_BD[:, None])[:, 0], axis=-1).astype(jnp.int32)
    return buffer_BT.at[:, pos].set(token_B)

  return jax.lax.fori_loop(prompt_len, prompt_len + new_tokens, step, buffer_BT)[:, prompt_len:]


def _tokens_per_sec(fn, rows, new_tokens, repeats):
  fn()  # compiles
  return rows * new_tokens / median(time_calls(fn, repeats))


def time_peer(model_cfg, prompt_BP, new_tokens, repeats):
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config(vocab_size=model_cfg.vocab_size, n_positions=model_cfg.block_size,
                                     n_embd=model_cfg.n_embd, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head))
  model.eval()
  prompt = torch.tensor(prompt_BP, dtype=torch.long)

  def run():
    with torch.no_grad():
      model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                     min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
  return _tokens_per_sec(run, len(prompt_BP), new_tokens, repeats), torch.__version__


def main(argv):
  del argv
  config = config_lib.gpt2_config("small")
  model_cfg = GPTConfig.from_config(config.model, config.model.vocab_size)
  graphdef, state = nnx.split(GPT(model_cfg, nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  decode_graphdef, decode_params = unstack_layers(graphdef, params)
  new, repeats = _NEW_TOKENS.value, _REPEATS.value
  rows = [("model", f"GPT-2 small shape: {model_cfg.n_layer}L {model_cfg.n_head}H {model_cfg.n_embd}D vocab "
                    f"{model_cfg.vocab_size} ({metrics.format_count(count_params(params))} params), "
                    f"{model_cfg.dtype}, random weights"),
          ("decoding", f"greedy, {_PROMPT_TOKENS.value}-token prompt + {new} new tokens"),
          ("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind}")]
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(decode_params))
  stream = stream_gbs()
  rows.append(("memory bandwidth", f"{stream:.1f} GB/s (STREAM triad, 256 MiB arrays); weights "
                                   f"{weight_bytes / 2**20:.0f} MiB"))
  result = {"new_tokens": new, "tokens_per_sec": {}, "baseline_tokens_per_sec": {}, "stream_gbs": stream,
            "weight_bytes": weight_bytes, "weights_read_gbs": {}}
  if _PEER.value:
    result.update(peer_tokens_per_sec={}, peer_ratio={})
  for batch in map(int, _BATCHES.value):
    prompt_BP = np.random.RandomState(batch).randint(0, 50257, (batch, _PROMPT_TOKENS.value)).astype(np.int32)
    ours = _tokens_per_sec(lambda: generate.generate_batch(decode_params, decode_graphdef, prompt_BP, new,
                                                           generate.Sampling(temperature=0)), batch, new, repeats)
    baseline = _tokens_per_sec(
        lambda: _full_recompute(params, prompt_BP, graphdef, _BASELINE_TOKENS.value).block_until_ready(), batch,
        _BASELINE_TOKENS.value, 1)
    result["tokens_per_sec"][batch] = ours
    # Each decoding step reads every weight once (the KV cache of <= 108 positions is <1% of that).
    weights_gbs = ours / batch * weight_bytes / 1e9
    result["weights_read_gbs"][batch] = weights_gbs
    result["baseline_tokens_per_sec"][batch] = baseline
    line = (f"{ours:.1f} tokens/s | weights read at {weights_gbs:.1f} GB/s ({weights_gbs / stream:.0%} of stream) | "
            f"full recompute {baseline:.1f} ({ours / baseline:.1f}x)")
    if _PEER.value:
      peer, torch_version = time_peer(model_cfg, prompt_BP, new, repeats)
      result["peer_tokens_per_sec"][batch] = peer
      result["peer_ratio"][batch] = ours / peer
      line += f" | transformers {peer:.1f} (torch {torch_version}) -> peer_ratio {ours / peer:.2f}"
    rows.append((f"batch {batch}", line))
  report(rows, result)


if __name__ == "__main__":
  app.run(main)
