"""Exports a run's checkpoint as a parameters-only inference model.

  python -m gptjax.export --workdir=runs/small --out=exports/small --dtype=bfloat16 [--step=N]

The export (params in the chosen dtype, config, tokenizer) loads with `gptjax.loader.load_model`, the
sample/evaluate commands and `checkpoint.init_from`.
"""

from absl import flags

from gptjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to export from.", required=True)
_OUT = flags.DEFINE_string("out", None, "Directory to write the export to.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter dtype.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest readable one).")


def main(argv):
  del argv
  from gptjax import loader
  cli.quiet_libraries()
  out = loader.export(_WORKDIR.value, _OUT.value, _DTYPE.value, _STEP.value)
  print(f"exported {_WORKDIR.value} -> {out} ({_DTYPE.value})")


if __name__ == "__main__":
  cli.run(main)
