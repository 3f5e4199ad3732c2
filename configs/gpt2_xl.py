"""GPT-2 xl (1.5B parameters): the same as --config=configs/gpt2.py:xl, whose docstring tells more."""

from gptjax.config import gpt2_config


def get_config(arg=None):
  del arg
  return gpt2_config("xl")
