"""Full fine-tuning vs LoRA on a GPT-2 size: step time and compiled memory, side by side in one run.

  python -m benchmarks.finetune_memory --size=small --batch=8 --seq=256 --rank=8 [--remat=full]

For each shape (--batch x --seq, and 1 x 1024) and each method: the median wall time of a classification step
(head on the last token, float32, LoRA r on every attention and MLP kernel), and per-device MiB of the trainable
state (parameters + AdamW moments), the frozen base and the step's temporaries as XLA's memory_analysis reports
them. Ends with one JSON line; `lora_step_ratio` and `lora_memory_ratio` (LoRA over full) are at --batch x --seq.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import median, report, time_calls
from gptjax import config as config_lib, train
from gptjax.finetune import classify, lora, tuning
from gptjax.model import GPT, GPTConfig


def mib(tree) -> float:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20


def measure(config, graphdef, params, head, lora_cfg, model_cfg, batch: int, seq: int, repeats: int) -> dict:
  """Memory and median step seconds of the loop's train step for one method at one shape."""
  tx = train.make_optimizer(config)
  trainable, frozen = tuning.split_trainable(params, head, lora_cfg, jax.random.key(0), model_cfg)
  if lora_cfg is not None:
    graphdef = nnx.split(nnx.eval_shape(lambda: GPT(lora_cfg.model(model_cfg), nnx.Rngs(0))))[0]
  state = train.new_state(jax.tree.map(jnp.copy, trainable), tx)  # the step donates it; `params` serve both runs
  step = tuning.one_device_step(config, graphdef, tx, state, frozen, classify.loss, lora_cfg)
  rng = np.random.default_rng(0)
  data = {"tokens": rng.integers(0, model_cfg.vocab_size, (1, batch, seq), dtype=np.int32),
          "lengths": np.full((1, batch), seq, np.int32), "labels": rng.integers(0, 2, (1, batch), dtype=np.int32)}
  frozen_args = (frozen,) if frozen else ()
  analysis = step.lower(state, data, *frozen_args).compile().memory_analysis()
  memory = {"state_mib": mib(state), "frozen_mib": mib(frozen), "temp_mib": analysis.temp_size_in_bytes / 2**20}
  holder = {"state": step(state, data, *frozen_args)[0]}  # compiles

  def one_step():
    holder["state"], metrics = step(holder["state"], data, *frozen_args)
    jax.block_until_ready(metrics)
  seconds = median(time_calls(one_step, repeats))
  return {**memory, "total_mib": sum(memory.values()), "step_seconds": seconds,
          "trainable_parameters": lora.count(trainable)}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="small", choices=sorted(config_lib.GPT2_SIZES))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--remat", default="none", choices=["none", "dots", "qkv_fc", "full"],
                      help="model.remat for both methods (full: only each block's input is kept for backward)")
  args = parser.parse_args()
  config = config_lib.gpt2_config(args.size)
  config.train.update(learning_rate=1e-4, warmup_steps=0, weight_decay=0.0)
  config.model.remat = args.remat
  model_cfg = GPTConfig.from_config(config.model, 50304)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(GPT(model_cfg, nnx.Rngs(0)))))()
  del state
  head = classify.init_head(model_cfg.n_embd, 2, jax.random.key(1))
  rows, result = [], {"size": args.size, "rank": args.rank, "remat": args.remat, "shapes": {}}
  for batch, seq in dict.fromkeys([(args.batch, args.seq), (1, 1024)]):
    shape = result["shapes"][f"{batch}x{seq}"] = {}
    for name, lora_cfg in [("full", None), ("lora", lora.LoraConfig(rank=args.rank))]:
      m = shape[name] = measure(config, graphdef, params, head, lora_cfg, model_cfg, batch, seq, args.repeats)
      rows.append((f"{batch}x{seq} {name}", f"step {m['step_seconds']:.3f} s | trainable "
                   f"{m['trainable_parameters']:,} | state {m['state_mib']:.0f} MiB, frozen {m['frozen_mib']:.0f} "
                   f"MiB, temporaries {m['temp_mib']:.0f} MiB | total {m['total_mib']:.0f} MiB"))
    shape["lora_step_ratio"] = shape["lora"]["step_seconds"] / shape["full"]["step_seconds"]
    shape["lora_memory_ratio"] = shape["lora"]["total_mib"] / shape["full"]["total_mib"]
    rows.append((f"{batch}x{seq} lora / full", f"step time {shape['lora_step_ratio']:.2f}x, memory "
                 f"{shape['lora_memory_ratio']:.2f}x"))
  main_shape = result["shapes"][f"{args.batch}x{args.seq}"]
  result.update(lora_step_ratio=main_shape["lora_step_ratio"], lora_memory_ratio=main_shape["lora_memory_ratio"])
  report(rows, result)


if __name__ == "__main__":
  main()
