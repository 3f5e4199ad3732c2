"""GPT-2 large (774M parameters), context 1024, global batch 512 x 1024 = 524,288 tokens per step.

  python -m gptjax.main --config=configs/gpt2_large.py --config.data.path='corpus/*.txt'

The micro-batch (per data-parallel shard) is the largest that fits in device memory, found at start-up by
compiling the step; accumulation = 512 / (micro-batch x mesh.data x mesh.fsdp). Pin it with
--config.train.micro_batch_size=N.
"""

from gptjax.config import gpt2_config


def get_config(arg=None):
  del arg
  return gpt2_config("large")
