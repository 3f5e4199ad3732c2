"""GPT-2 large (774M parameters), context 1024, global batch 512 x 1024 = 524,288 tokens per step.

  python -m gptjax.main --config=configs/gpt2_large.py --config.data.path='corpus/*.txt'

train.micro_batch_size is per data-parallel shard; accumulation = 512 / (micro_batch_size x (mesh.data x
mesh.fsdp)). Lower it (or raise mesh.fsdp) if a step does not fit in device memory.
"""

from gptjax.config import gpt2_config


def get_config(arg=None):
  del arg
  return gpt2_config("large")
