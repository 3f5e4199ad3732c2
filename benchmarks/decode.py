"""Decoding speed (tokens/s) of `gptjax.generate` for the GPT-2 small shape, greedy, after a short prompt.

  python -m benchmarks.decode --peer [--batches=1,8 --new_tokens=100 --weights=float32,bfloat16,int8]
  python -m benchmarks.decode --batches=1 --profile=10   (+ the thunks of a decode step, the 10 costliest)
  python -m benchmarks.decode --quality_workdir=runs/task_pretrain --quality_data=held_out.txt   (+ quality)

For each batch size: our KV-cache decoder (random weights; one prefill, then one jitted while_loop), our own
full-recompute baseline (one jitted fori_loop that runs the whole static-length buffer through the model for
every token, as gptjax did before the cache; timed on --baseline_tokens tokens, since it is slow), and with --peer
transformers' GPT2LMHeadModel.generate with its KV cache (PyTorch, same shape, same run). Tokens/s counts new
tokens over all rows; times are medians of --repeats calls after one warm-up call (which compiles). The weights
are unstacked once beforehand (`model.unstack_layers`), as the sample CLI does once per process.

Each row prints the rate the stored weights are read at (tokens/s / batch x their bytes) against the machine's
STREAM bandwidth, and the bytes one compiled decode step moves by XLA's cost analysis. --weights adds rows with
the matrices stored narrow (`gptjax.quantize`); --quality_workdir scores those on a trained model: greedy
continuations of the --quality_data documents' first tokens against float32's, and the perplexity of the text.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks import step_anatomy
from benchmarks.common import median, read_gbs, report, stream_gbs, time_calls
from gptjax import config as config_lib, evaluate, generate, loader, metrics, quantize
from gptjax.model import GPT, GPTConfig, count_params, unstack_layers

_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes (rows decoded together).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 8, "Prompt length in tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 100, "Tokens generated per row.")
_BASELINE_TOKENS = flags.DEFINE_integer("baseline_tokens", 20, "Tokens per row for the full-recompute baseline.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (after one warm-up call).")
_PEER = flags.DEFINE_bool("peer", False, "Also time transformers' GPT2LMHeadModel.generate in this run.")
_WEIGHTS = flags.DEFINE_list("weights", ["float32", "bfloat16", "int8"], "Stored weights to time (float32 = as is).")
_PROFILE = flags.DEFINE_integer("profile", 0, "Also print the thunks of a decode step by kind, and the N costliest.")
_QUALITY_WORKDIR = flags.DEFINE_string("quality_workdir", None, "A trained run or export to score narrow weights on.")
_QUALITY_DATA = flags.DEFINE_string("quality_data", None, "Held-out text for --quality_workdir (documents: lines).")
_QUALITY_PROMPTS = flags.DEFINE_integer("quality_prompts", 32, "Documents whose first 16 tokens are continued.")


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


def _as_api(weights: str) -> str:
  return "" if weights == "float32" else weights


def compiled_decode(params, graphdef, prompt_BP, new_tokens, widen_each_step):
  """The decode loop as `generate.stream` compiles it for these prompts (the same bucketed shapes)."""
  B = prompt_BP.shape[0]
  block_size = nnx.merge(graphdef, quantize.dequantize(params)).cfg.block_size
  prompt_len = generate.bucket(prompt_BP.shape[1], block_size)
  padded = np.zeros((B, prompt_len), np.int32)
  padded[:, prompt_len - prompt_BP.shape[1]:] = prompt_BP
  state = generate._prefill(  # pylint: disable=protected-access
      params, padded, np.full(B, prompt_len - prompt_BP.shape[1], np.int32), jax.random.split(jax.random.key(0), B),
      np.zeros(B, bool), 0, graphdef, generate.bucket(prompt_len + new_tokens, 2 * block_size), None)
  return generate._decode.lower(  # pylint: disable=protected-access
      params, state, np.int32(1), graphdef, generate.Sampling(temperature=0), widen_each_step).compile()


@functools.partial(jax.jit, static_argnames="graphdef")
def _next_tokens(params, tokens_BT, graphdef):
  """The model's most likely next token at every position (a full forward pass, weights widened inside)."""
  model = nnx.merge(graphdef, quantize.dequantize(params))
  return jnp.argmax(model.logits(model(tokens_BT)), axis=-1)


def quality(rows):
  """Greedy agreement with float32 and perplexity on --quality_data, per narrow weights, on a trained model."""
  model = loader.load_model(_QUALITY_WORKDIR.value)
  from gptjax import data
  texts = [text for text, _ in data.open_corpus(_QUALITY_DATA.value).documents()]
  lines = [line for text in texts for line in text.splitlines() if len(model.tokenizer.encode(line)) >= 16]
  prompts = [model.tokenizer.encode(line)[:16] for line in lines[:_QUALITY_PROMPTS.value]]
  new = min(64, model.model_cfg.block_size - 16)  # prompt and continuation within the model's context
  result = {}
  reference, reference_loss = None, None
  for weights in _WEIGHTS.value:
    params = quantize.quantize(model.params, _as_api(weights))
    ids = generate.generate_batch(params, model.graphdef, prompts, new, generate.Sampling(temperature=0))
    scored = evaluate.evaluate_texts(params, model.graphdef, model.tokenizer, texts)
    if reference is None:
      reference, reference_loss = ids, scored["loss"]
    agree = float(np.mean(ids == reference))
    # Teacher-forced: given float32's own continuation, how often this model's next token is float32's.
    # (Within the model's context: prompt and continuation cut at block_size + 1 tokens.)
    sequences = np.concatenate([np.asarray(prompts, np.int32), reference], axis=1)[:, :model.model_cfg.block_size + 1]
    predicted = np.asarray(_next_tokens(params, sequences[:, :-1], model.graphdef))
    next_agree = float(np.mean(predicted[:, 15:] == sequences[:, 16:]))
    ppl_change = scored["perplexity"] / np.exp(reference_loss) - 1
    result[weights] = {"greedy_agreement": agree, "next_token_agreement": next_agree,
                       "perplexity": scored["perplexity"], "perplexity_change": ppl_change}
    rows.append((f"quality {weights}", f"greedy tokens equal to float32's: {agree:.1%} ({len(prompts)} x {new}); "
                                       f"next token given float32's continuation: {next_agree:.1%} | "
                                       f"perplexity {scored['perplexity']:.3f} ({ppl_change:+.2%}) on "
                                       f"{scored['tokens']} tokens"))
  rows.append(("quality model", f"{_QUALITY_WORKDIR.value} (step {model.step}, "
                                f"{metrics.format_count(count_params(model.params))} params), {_QUALITY_DATA.value}"))
  return result


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
  stored = {w: quantize.quantize(decode_params, _as_api(w)) for w in _WEIGHTS.value}
  float_bytes = quantize.weight_bytes(decode_params)
  stream, read = stream_gbs(), read_gbs()
  rows.append(("memory bandwidth", f"{stream:.1f} GB/s STREAM triad (256 MiB arrays), {read:.1f} GB/s read only (a "
                                   "sum over 1 GiB)"))
  rows.append(("weights", ", ".join(f"{w} {quantize.weight_bytes(p) / 2**20:.0f} MiB" for w, p in stored.items())))
  result = {"new_tokens": new, "stream_gbs": stream, "read_gbs": read, "weight_bytes": float_bytes,
            "baseline_tokens_per_sec": {},
            "by_weights": {w: {"weight_bytes": quantize.weight_bytes(p), "tokens_per_sec": {}, "weights_read_gbs": {},
                               "step_bytes": {}} for w, p in stored.items()}}
  if _PEER.value:
    result.update(peer_tokens_per_sec={}, peer_ratio={})
  for batch in map(int, _BATCHES.value):
    prompt_BP = np.random.RandomState(batch).randint(0, 50257, (batch, _PROMPT_TOKENS.value)).astype(np.int32)
    baseline = _tokens_per_sec(
        lambda: _full_recompute(params, prompt_BP, graphdef, _BASELINE_TOKENS.value).block_until_ready(), batch,
        _BASELINE_TOKENS.value, 1)
    result["baseline_tokens_per_sec"][batch] = baseline
    peer = None
    if _PEER.value:
      peer, torch_version = time_peer(model_cfg, prompt_BP, new, repeats)
      result["peer_tokens_per_sec"][batch] = peer
      rows.append((f"batch {batch} peers", f"transformers {peer:.1f} tokens/s (torch {torch_version}) | our full "
                                           f"recompute {baseline:.1f}"))
    for weights, stored_params in stored.items():
      ours = _tokens_per_sec(lambda: generate.generate_batch(stored_params, decode_graphdef, prompt_BP, new,
                                                             generate.Sampling(temperature=0),
                                                             weights=None), batch, new, repeats)
      numbers = result["by_weights"][weights]
      numbers["tokens_per_sec"][batch] = ours
      # A decoding step reads every stored weight once (the KV cache of <= 108 positions is <1% of that).
      weights_gbs = ours / batch * numbers["weight_bytes"] / 1e9
      numbers["weights_read_gbs"][batch] = weights_gbs
      widen = quantize.is_narrow(stored_params) and jax.default_backend() != "cpu"
      compiled = compiled_decode(stored_params, decode_graphdef, prompt_BP, new, widen)
      cost = compiled.cost_analysis()
      # The loop's program: one step's bytes (XLA counts a while body once), plus any widening before the loop.
      numbers["step_bytes"][batch] = float((cost[0] if isinstance(cost, list) else cost)["bytes accessed"])
      line = (f"{ours:.1f} tokens/s ({ours / result['by_weights'][_WEIGHTS.value[0]]['tokens_per_sec'][batch]:.2f}x "
              f"{_WEIGHTS.value[0]}) | weights read at {weights_gbs:.1f} GB/s ({weights_gbs / stream:.0%} of STREAM, "
              f"{weights_gbs / read:.0%} of read only) | "
              f"a step moves {numbers['step_bytes'][batch] / 2**20:.0f} MiB "
              f"({numbers['step_bytes'][batch] / numbers['weight_bytes']:.2f}x the weights)")
      if peer:
        line += f" | {ours / peer:.2f}x transformers"
        result["peer_ratio"][f"{weights}/{batch}"] = ours / peer
      rows.append((f"batch {batch} {weights}", line))
      if _PROFILE.value and weights == _WEIGHTS.value[0]:
        decode = lambda: generate.generate_batch(stored_params, decode_graphdef, prompt_BP, new,
                                                 generate.Sampling(temperature=0))
        anatomy = step_anatomy.profile_thunks(decode, 1, compiled.as_text(), units_per_call=new)
        numbers.setdefault("anatomy", {})[batch] = anatomy.summary()
        rows += [(f"  {key}", value) for key, value in step_anatomy.anatomy_rows(anatomy, "token", _PROFILE.value,
                                                                                         parts=False)]
        rows.append(("  wall per token", f"{batch / ours * 1e3:.2f} ms ({anatomy.seconds / (batch / ours):.0%} of it "
                                         "inside thunks)"))
  if _QUALITY_WORKDIR.value:
    result["quality"] = quality(rows)
  report(rows, result)


if __name__ == "__main__":
  app.run(main)
