"""What every command-line entry point shares."""

import sys

from absl import logging


def quiet_libraries() -> None:
  """Orbax logs every save at INFO, which absl shows by default under app.run; --verbosity=0 brings it back."""
  if not any(arg.split("=")[0] in ("--verbosity", "-v", "--v") for arg in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
