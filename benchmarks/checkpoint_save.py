"""How long the training loop blocks on a checkpoint save, and the checkpoint's size on disk.

  python -m benchmarks.checkpoint_save --config=configs/gpt2_small.py

Saves the full train state (params + AdamW moments) of the config's model with the run's CheckpointManager:
async (the loop's setting: blocked only while arrays are copied to host memory) and sync, then restores it.
"""

import os
import shutil
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import report
from gptjax import checkpoint, config as config_lib, sharding, train
from gptjax.model import GPTConfig, count_params

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt2_small.py", "Model config.")
_DIR = flags.DEFINE_string("dir", None, "Where to write (default: a temporary directory on /tmp).")


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def main(argv):
  del argv
  config = _CONFIG.value
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  vocab = config_lib.check_vocab(config, config.data.vocab_size)
  mesh = sharding.make_mesh(config)
  tx = train.make_optimizer(config)
  model_cfg = GPTConfig.from_config(config.model, vocab)
  graphdef, state, shardings = train.init_state(config, model_cfg, mesh, tx)
  # One real step, so the AdamW moments are not all zeros (which would compress to nothing).
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  tokens = jax.random.randint(jax.random.key(0), (1, 1, 65), 0, vocab)
  state, _ = step(state, sharding.global_batch(jax.device_get(tokens), sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES, 3, 1), 1))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  root = tempfile.mkdtemp(dir=_DIR.value)
  results = {}
  try:
    for mode in ("warm-up", "async", "sync"):  # the first save pays one-time set-up: not counted
      workdir = os.path.join(root, mode)
      config.checkpoint.async_save = mode == "async"
      mngr = checkpoint.manager(workdir, config)
      start = time.perf_counter()
      checkpoint.save(mngr, 1, state, None, config, _NoTokenizer())
      blocked = time.perf_counter() - start
      mngr.wait_until_finished()
      total = time.perf_counter() - start
      results[mode] = (blocked, total, _directory_bytes(os.path.join(workdir, "checkpoints", "1")))
    _, abstract, _ = train.abstract_state(config, model_cfg, mesh, tx)
    start = time.perf_counter()
    checkpoint.restore(mngr, 1, abstract, shardings)
    restore_s = time.perf_counter() - start
  finally:
    shutil.rmtree(root)
  blocked, total, size = results["async"]
  rows = [("state", f"{count_params(state['params']) / 1e6:.1f}M params + AdamW moments = "
                    f"{state_bytes / 2**20:.0f} MiB in memory"),
          ("async save: loop blocked", f"{blocked:.2f} s (write finished after {total:.2f} s)"),
          ("sync save", f"{results['sync'][1]:.2f} s"),
          ("checkpoint on disk", f"{size / 2**20:.0f} MiB"),
          ("restore", f"{restore_s:.2f} s")]
  report(rows, dict(state_bytes=state_bytes, async_blocked_s=blocked, async_total_s=total,
                    sync_s=results["sync"][1], disk_bytes=size, restore_s=restore_s))


class _NoTokenizer:
  """The benchmark measures the state; the real loop stores its (small) tokenizer the same way."""

  def save(self, directory):
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
      f.write("{}")


if __name__ == "__main__":
  app.run(main)
