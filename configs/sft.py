"""Instruction tuning (causal SFT): JSONL of {"prompt", "response"} or {"messages": [...]}; loss on responses.

  python -m gptjax.main --config=configs/sft.py:train.jsonl,eval.jsonl --workdir=runs/sft \
      --config.checkpoint.init_from=hf:gpt2 [--config.lora.rank=16]

The run writes the tuned model as an export (runs/sft/merged) that `python -m gptjax.sample` talks to; prompts
follow gptjax/finetune/sft.py's template ("### User:\n...\n\n### Assistant:\n").
"""

from gptjax.config import default_config
from gptjax.finetune.tasks import add_task_config


def get_config(arg=None):
  train_path, eval_path = (arg or "train.jsonl,eval.jsonl").split(",")
  c = add_task_config(default_config(), "sft")
  c.task.update(train_path=train_path, eval_path=eval_path, epochs=2.0, eval_batch_size=16)
  c.train.update(batch_size=16, learning_rate=1e-4, min_learning_rate=1e-5, warmup_steps=50, weight_decay=0.0,
                 b2=0.999)
  c.log.every_steps = 20
  return c
