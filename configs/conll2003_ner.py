"""Named-entity recognition on CoNLL-2003 (BIO tags): a tag per word, on its last subword.

  python -m gptjax.main --config=configs/conll2003_ner.py --workdir=runs/ner \
      --config.checkpoint.init_from=runs/task_pretrain [--config.lora.rank=8]

`get_config('DIR')` reads DIR/train.txt and DIR/dev.txt (default ../shared/data/conll2003). Sentences are
given twice (task.echo) so each word's label is predicted having seen the whole sentence.
"""

import os

from gptjax.config import default_config
from gptjax.finetune.tasks import add_task_config


def get_config(arg=None):
  data = arg or "../shared/data/conll2003"
  c = add_task_config(default_config(), "ner")
  c.task.update(train_path=os.path.join(data, "train.txt"), eval_path=os.path.join(data, "dev.txt"), epochs=3.0,
                eval_batch_size=64, group_by_length=32, dropout=0.1)
  c.checkpoint.init_from = "runs/task_pretrain"
  c.train.update(batch_size=32, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100, weight_decay=0.01,
                 b2=0.999)
  c.log.every_steps = 50
  return c
