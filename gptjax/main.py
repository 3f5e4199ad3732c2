"""Pretrains a GPT: `python -m gptjax.main --config=configs/quickstart.py --workdir=runs/quickstart`.

Thin entry point: parses flags and the config, then hands over to `gptjax.loop.run`.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from gptjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt2_small.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tokenizer); "
                               "default runs/<config name>.")


def main(argv):
  del argv
  cli.quiet_libraries()
  from gptjax import loop  # after flag parsing: importing JAX early would ignore --xla flags in the env
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])
  loop.run(_CONFIG.value, workdir)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
