"""GPT-2 small (124M parameters): the same as --config=configs/gpt2.py:small, whose docstring tells more."""

from gptjax.config import gpt2_config


def get_config(arg=None):
  del arg
  return gpt2_config("small")
