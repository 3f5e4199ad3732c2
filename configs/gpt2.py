"""GPT-2 at its real shape: context 1024, global batch 512 x 1024 = 524,288 tokens per step.

  python -m gptjax.main --config=configs/gpt2.py:small --config.data.path='corpus/*.txt'

`get_config(SIZE)` takes small (124M parameters, the default), medium (350M), large (774M) or xl (1.5B);
configs/gpt2_SIZE.py names the same config. The micro-batch (per data-parallel shard) is the largest that fits in
device memory, found at start-up by compiling the step; accumulation = 512 / (micro-batch x mesh.data x mesh.fsdp).
Pin it with --config.train.micro_batch_size=N.
"""

from gptjax.config import GPT2_SIZES, ConfigError, gpt2_config


def get_config(arg=None):
  size = arg or "small"
  if size not in GPT2_SIZES:
    raise ConfigError(f"configs/gpt2.py:{size} is not a GPT-2 size; use one of {', '.join(GPT2_SIZES)} "
                      "(e.g. --config=configs/gpt2.py:medium).")
  return gpt2_config(size)
