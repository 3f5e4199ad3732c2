"""nanoGPT's CPU "baby GPT" on tinyshakespeare, character level (4 layers, 4 heads, 128 wide, context 64).

  python -m gptjax.main --config=configs/shakespeare_char.py --config.data.path=../shared/data/tinyshakespeare.txt
"""

from gptjax.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()
  # Unrolled layers: 40 ms vs 55 ms per step with scan at this size on a 2-core CPU (per-op overhead dominates).
  # Three row groups: XLA:CPU runs independent thirds of the batch on its cores at once (benchmarks/RESULTS.md).
  c.model.update(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False, dropout=0.0, vocab_multiple=1,
                 scan_layers=False, row_groups=3)
  c.data.update(tokenizer="char", val_fraction=0.1)
  c.train.update(steps=2000, batch_size=12, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100,
                 decay_steps=2000, b2=0.99, weight_decay=0.1, eval_every=250, eval_batches=20,
                 final_eval_batches=-1)
  c.checkpoint.every_steps = 0
  c.log.update(every_steps=50, samples=2, sample_tokens=300, sample_prompt="ROMEO:")
  return c
