"""GPT-2 large (774M parameters): the same as --config=configs/gpt2.py:large, whose docstring tells more."""

from gptjax.config import gpt2_config


def get_config(arg=None):
  del arg
  return gpt2_config("large")
