"""Training throughput of one config's train step: tokens/s, step time, compile time, peak memory, MFU.

  python -m benchmarks.train_throughput --config=configs/gpt2_small.py --batch=8 --seq=128 --peer

MFU uses a matmul ceiling measured on this machine in the same run (vendor peak on TPU/GPU). With --peer,
transformers' GPT2LMHeadModel (PyTorch, same shape, forward + backward + AdamW) is timed in the same run and
peer_ratio = our tokens/s / theirs.
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import median, report, time_calls
from gptjax import config as config_lib, metrics, sharding, train
from gptjax.model import GPTConfig, count_params, flops_per_token

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt2_small.py", "Model config.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one compile+warm-up step).")
_PEER = flags.DEFINE_bool("peer", False, "Also time transformers' GPT2LMHeadModel in this run.")


def time_ours(config, vocab, batch, seq, steps):
  model_cfg = GPTConfig.from_config(config.model, vocab)
  mesh = sharding.make_mesh(config)
  built = train.build_step(config, model_cfg, mesh)
  step, state = built.step, train.init_state(config, model_cfg, mesh, built.tx)[1]
  tokens = np.random.RandomState(0).randint(0, vocab, (1, batch, seq + 1)).astype(np.int32)
  tokens = sharding.global_batch(tokens, sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES, 3, 1), batch_dim=1)
  holder = [state]

  def one_step():
    holder[0], m = step(holder[0], tokens)
    jax.block_until_ready(m)
  start = time.perf_counter()
  compiled = step.lower(state, tokens).compile()
  compile_s = time.perf_counter() - start
  del compiled
  one_step()  # warm-up (also fills the jit cache)
  times = time_calls(one_step, steps)
  n_flops = count_params(state["params"], exclude_position=True)
  return times, compile_s, flops_per_token(model_cfg, n_flops, seq), count_params(holder[0]["params"])


def time_peer(config, vocab, batch, seq, steps):
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel
  m = config.model
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=m.block_size, n_embd=m.n_embd,
                                     n_layer=m.n_layer, n_head=m.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, attn_implementation="sdpa"))
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  tokens = torch.randint(0, vocab, (batch, seq + 1))

  def one_step():
    loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss  # HF shifts labels itself: pass aligned copies
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
  one_step()
  return time_calls(one_step, steps), torch.__version__


def main(argv):
  del argv
  config = _CONFIG.value
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  batch, seq, steps = _BATCH.value, _SEQ.value, _STEPS.value
  vocab = config_lib.check_vocab(config, config.data.vocab_size)
  ceiling = metrics.measure_matmul_flops()
  peak, peak_source = metrics.peak_flops_per_device()
  if jax.default_backend() == "cpu":
    peak, peak_source = ceiling, "fp32 matmul ceiling measured in this run"
  times, compile_s, flops_tok, n_params = time_ours(config, vocab, batch, seq, steps)
  peak_mem = metrics.peak_memory_bytes()
  step_s = median(times)
  tokens_per_sec = batch * seq / step_s
  mfu = tokens_per_sec * flops_tok / (peak * jax.device_count())
  rows = [("config", f"{config.model.n_layer}L {config.model.n_head}H {config.model.n_embd}D vocab {vocab} "
                     f"({metrics.format_count(n_params)} params), batch {batch} x {seq}, {config.model.dtype}, "
                     f"attention={config.model.attention}, scan={config.model.scan_layers}"),
          ("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind}"),
          ("step time (median)", f"{step_s:.3f} s  (all: {', '.join(f'{t:.3f}' for t in times)})"),
          ("tokens/s", f"{tokens_per_sec:.1f}"),
          ("compile time", f"{compile_s:.1f} s"),
          ("peak memory", f"{peak_mem / 2**30:.2f} GiB"),
          ("FLOPs/token", metrics.format_count(flops_tok)),
          ("peak FLOP/s", f"{metrics.format_count(peak)} ({peak_source})"),
          ("MFU", f"{mfu:.1%}")]
  result = dict(batch=batch, seq=seq, step_s=step_s, tokens_per_sec=tokens_per_sec, compile_s=compile_s,
                peak_memory_bytes=peak_mem, mfu=mfu, peak_flops=peak, matmul_ceiling=ceiling)
  if _PEER.value:
    peer_times, torch_version = time_peer(config, vocab, batch, seq, steps)
    peer_tokens = batch * seq / median(peer_times)
    rows += [("peer (transformers, torch " + torch_version + ")",
              f"{median(peer_times):.3f} s/step, {peer_tokens:.1f} tokens/s"),
             ("peer_ratio", f"{tokens_per_sec / peer_tokens:.3f}")]
    result.update(peer_step_s=median(peer_times), peer_tokens_per_sec=peer_tokens,
                  peer_ratio=tokens_per_sec / peer_tokens)
  report(rows, result)


if __name__ == "__main__":
  app.run(main)
