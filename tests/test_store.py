"""A fine-tuned model on disk (gptjax/finetune/store.py): adapters pair only with the base they were trained on."""

import shutil

import jax
import numpy as np
import pytest

from gptjax import checkpoint, loader, loop
from gptjax.config import ConfigError
from gptjax.finetune import store
from tests.helpers import quick_run_config, task_config


def _lora_config(tmp_path, base: str, epochs: float):
  rows = "".join(f"the {w} dog\t{'q' if w in ('quick', 'lazy') else 'c'}\n" for w in ["quick", "lazy", "red", "a"] * 6)
  (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
  c = task_config("classify", batch_size=8, mesh=(-1, 1, 1))
  c.task.update(train_path=str(tmp_path / "train.tsv"), eval_path=str(tmp_path / "train.tsv"), epochs=epochs,
                eval_batch_size=8, export_merged=False, max_len=16)
  c.checkpoint.update(init_from=base, every_steps=2)
  c.lora.rank = 2
  c.log.update(every_steps=2, tensorboard=False)
  return c


def test_adapters_load_onto_the_step_they_were_trained_on_and_refuse_another_base(tmp_path, corpus, capsys):
  base = str(tmp_path / "base")
  loop.run(quick_run_config(corpus, steps=4), base)
  tuned_dir = str(tmp_path / "tuned")
  loop.run(_lora_config(tmp_path, base, epochs=1), tuned_dir)  # 3 steps on the base at step 4
  loop.run(quick_run_config(corpus, steps=8), base)  # the base trains on: its newest step is 8

  tuned = store.load(tuned_dir)
  at_4, at_8 = loader.load_model(base, step=4).params, loader.load_model(base).params
  jax.tree.map(np.testing.assert_array_equal, tuned.frozen["base"], at_4)
  assert checkpoint.fingerprint(at_4) != checkpoint.fingerprint(at_8)
  # A resume of the fine-tuning run trains on the same base too.
  capsys.readouterr()
  loop.run(_lora_config(tmp_path, base, epochs=2), tuned_dir)
  assert f"base: {base} (step 4)" in capsys.readouterr().out

  # The base's step 4 replaced by another model (another seed): refused, by fingerprint, by both.
  shutil.rmtree(base)
  loop.run(quick_run_config(corpus, steps=4, seed=1), base)
  with pytest.raises(ConfigError, match=r"the base model .* at step 4 \(what the adapters were trained on\) has "
                                        r"parameters \w+, not the \w+ the adapters were trained on"):
    store.load(tuned_dir)
  with pytest.raises(ConfigError, match="not the .* the adapters were trained on"):
    loop.run(_lora_config(tmp_path, base, epochs=3), tuned_dir)


def test_the_fingerprint_is_the_same_on_any_mesh(tmp_path, corpus):
  base = str(tmp_path / "base")
  loop.run(quick_run_config(corpus, steps=4), base)
  from gptjax import sharding  # pylint: disable=import-outside-toplevel
  config = quick_run_config(corpus)
  fingerprints = set()
  for mesh_shape, n in (((1, 1, 1), 1), ((1, 8, 1), 8), ((1, 4, 2), 8)):
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    mesh = sharding.make_mesh(config, jax.devices()[:n])
    fingerprints.add(checkpoint.fingerprint(loader.load_model(base, mesh).params))
  assert len(fingerprints) == 1
