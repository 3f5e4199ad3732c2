"""A small GPT trained on the built-in offline corpus (Python's own documentation) in a few minutes on a CPU.

  python -m gptjax.main --config=configs/quickstart.py --workdir=runs/quickstart
"""

from gptjax.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()
  c.model.update(n_layer=4, n_head=4, n_embd=192, block_size=128, vocab_multiple=64, scan_layers=False)
  c.data.update(path="", tokenizer="bpe", vocab_size=4096)
  c.train.update(steps=600, batch_size=16, learning_rate=2e-3, min_learning_rate=2e-4, warmup_steps=50,
                 b2=0.99, eval_every=200, eval_batches=10)
  c.checkpoint.every_steps = 0
  c.log.update(every_steps=20, samples=2, sample_tokens=120, sample_prompt="The ")
  return c
