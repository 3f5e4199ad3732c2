"""What pretraining and fine-tuning hand the loop (gptjax/job.py's `Job`): dropout, token counts, evaluation cadence."""

import json

from gptjax import checkpoint, loader, pretrain, sharding
from gptjax.finetune import job as finetune_job
from tests.helpers import quick_run_config, tiny_classification_config


def test_the_pretraining_job_trains_with_the_configs_dropout_and_counts_the_global_batch(tmp_path, corpus):
  for dropout in (0.0, 0.1):
    config = quick_run_config(corpus)
    config.model.dropout = dropout
    job = pretrain.build(config, str(tmp_path), sharding.make_mesh(config), resuming=False)
    assert job.use_dropout == (dropout > 0)
    assert job.tokens(next(job.batches)) == 8 * 16  # batch x context, all processes together


def test_the_fine_tuning_job_takes_dropout_cadence_and_base_from_its_config(tmp_path):
  config = tiny_classification_config(tmp_path)
  mesh = sharding.make_mesh(config)
  job = finetune_job.build(config, str(tmp_path / "run"), mesh, resuming=False)
  assert not job.use_dropout  # task.dropout=-1: the base's, 0
  assert job.config.train.eval_every == 3  # 0: every epoch of 24 rows in batches of 8
  batch = next(job.batches)
  assert job.tokens(batch) == batch["tokens"].size  # one process: its rows are the global batch
  record = json.loads((tmp_path / "run" / finetune_job.BASE_FILE).read_text())
  base = loader.load_model(config.checkpoint.init_from)
  assert record == {"path": config.checkpoint.init_from, "step": 0,
                    "fingerprint": checkpoint.fingerprint(base.params)}
  config.task.dropout = 0.2
  config.train.eval_every = 2
  job = finetune_job.build(config, str(tmp_path / "run"), mesh, resuming=False)
  assert job.use_dropout and job.config.train.eval_every == 2
