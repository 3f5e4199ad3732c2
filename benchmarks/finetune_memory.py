"""Memory of full fine-tuning vs LoRA for a GPT-2 size, from the compiled step (nothing is run or allocated).

  python benchmarks/finetune_memory.py --size=small --batch=8 --seq=1024 --rank=8

Per device, in MiB: trainable state (parameters + AdamW moments), frozen base, and the step's temporaries as
XLA's memory_analysis reports them, for a classification step (head on the last token) in float32.
"""

import argparse

import jax
from flax import nnx

from common import report
from gptjax import config as config_lib
from gptjax.finetune import classify, lora, trainer
from gptjax.finetune.run import memory_report
from gptjax.model import GPT, GPTConfig


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="small", choices=sorted(config_lib.GPT2_SIZES))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--rank", type=int, default=8)
  args = parser.parse_args()
  config = config_lib.gpt2_config(args.size)
  model_cfg = GPTConfig.from_config(config.model, 50304)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0))))
  params = nnx.to_pure_dict(abstract)
  head = jax.eval_shape(lambda: classify.init_head(model_cfg.n_embd, 2, jax.random.key(0)))
  batch = {"tokens": jax.ShapeDtypeStruct((args.batch, args.seq), "int32"),
           "lengths": jax.ShapeDtypeStruct((args.batch,), "int32"),
           "labels": jax.ShapeDtypeStruct((args.batch,), "int32")}
  tx = trainer.make_optimizer(1e-4)
  rows, result = [], {}
  for name, lora_cfg in [("full", None), (f"lora_r{args.rank}", trainer.LoraConfig(rank=args.rank))]:
    trainable, frozen = jax.eval_shape(
        lambda p, h, c=lora_cfg: trainer.split_trainable(p, h, c, jax.random.key(0)), params, head)
    state = jax.eval_shape(lambda t: trainer.new_state(t, tx), trainable)
    memory = memory_report(trainer.make_step(graphdef, tx, classify.loss, lora_cfg), state, frozen, batch)
    total = sum(memory.values())
    result[name] = {**memory, "total_mib": total, "trainable_parameters": lora.count(trainable)}
    rows.append((name, f"trainable {lora.count(trainable):,} params | state {memory['state_mib']:.0f} MiB, frozen "
                       f"{memory['frozen_mib']:.0f} MiB, temporaries {memory['temp_mib']:.0f} MiB | total "
                       f"{total:.0f} MiB"))
  full, low = result["full"]["total_mib"], result[f"lora_r{args.rank}"]["total_mib"]
  rows.append(("lora / full", f"{low / full:.2f} of the memory"))
  report(rows, {"size": args.size, "batch": args.batch, "seq": args.seq, **result})


if __name__ == "__main__":
  main()
