"""Prepares a config's data ahead of training: `python -m gptjax.prepare --config=configs/gpt2_small.py
--config.data.path='corpus/**/*.jsonl' [--workdir=runs/small]`.

Thin entry point: trains or loads the tokenizer and writes the token shards where `gptjax.main` with the same
config and workdir finds them (<workdir>/data, or data.cache_dir). Re-running skips what is done and resumes an
interrupted run after its last finished shard.
"""

import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt2_small.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory whose data/ receives the tokenizer and token "
                               "shards; default runs/<config name>, as for gptjax.main.")


def main(argv):
  del argv
  from gptjax import data  # after flag parsing, as in gptjax.main
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])
  # No config_lib.validate: data is often prepared on a machine other than the one (mesh) that trains.
  prepared = data.prepare(_CONFIG.value, workdir)
  tok = prepared.tokenizer
  print(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens, fingerprint {tok.fingerprint}")
  print(f"train: {prepared.train_tokens:,} tokens in {prepared.train_path}")
  print(f"val:   {prepared.val_tokens:,} tokens in {prepared.val_path}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
