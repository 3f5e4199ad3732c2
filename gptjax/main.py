"""Pretrains a GPT (`--config=configs/quickstart.py`), or fine-tunes one (a config with a `task`, configs/sst2.py).

Thin entry point: parses flags and the config, then hands over to `gptjax.loop.run` (one loop for both).
"""

from gptjax import cli

_CONFIG, _WORKDIR = cli.define_config_flags("Run directory (checkpoints, metrics, data cache)")


def main(argv):
  del argv
  cli.quiet_libraries()
  workdir = cli.workdir(_WORKDIR)
  cli.initialize_distributed()
  # Imported after flag parsing: importing JAX early would ignore --xla flags in the env.
  from gptjax import loop
  loop.run(_CONFIG.value, workdir)  # pretraining, or fine-tuning for a config with a `task` section


if __name__ == "__main__":
  cli.run(main)
