"""What the command-line entry points share: the --config/--workdir pair and quiet library logs."""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags


def define_config_flags(workdir_help: str):
  """Defines --config (a configs/*.py file) and --workdir; returns both flag holders."""
  config = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/gpt2_small.py.",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, f"{workdir_help}; default runs/<config name>.")
  flags.mark_flag_as_required("config")
  return config, workdir


def workdir(workdir_flag) -> str:
  """--workdir, or runs/<config file name> when it is not given."""
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  return workdir_flag.value or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


def quiet_libraries() -> None:
  """Orbax logs every save at INFO, which absl shows by default under app.run; --verbosity=0 brings it back."""
  if not any(arg.split("=")[0] in ("--verbosity", "-v", "--v") for arg in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
