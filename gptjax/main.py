"""Pretrains a GPT: `python -m gptjax.main --config=configs/quickstart.py --workdir=runs/quickstart`.

Thin entry point: parses flags and the config, then hands over to `gptjax.loop.run`.
"""

from absl import app

from gptjax import cli

_CONFIG, _WORKDIR = cli.define_config_flags("Run directory (checkpoints, metrics, data cache)")


def main(argv):
  del argv
  cli.quiet_libraries()
  cli.initialize_distributed()
  from gptjax import loop  # after flag parsing: importing JAX early would ignore --xla flags in the env
  loop.run(_CONFIG.value, cli.workdir(_WORKDIR))


if __name__ == "__main__":
  app.run(main)
