"""The base class of the errors a user can fix; the command-line tools print them as one line (`gptjax.cli.run`)."""


class UserError(Exception):
  """A bad value, missing data or an unreadable file: the message names it and the fix, so no traceback is shown."""


class Diverged(UserError, FloatingPointError):
  """Training stopped on non-finite or spiking steps (train.nonfinite='stop', train.spike_skip); the last good state
  is saved and the message says what to change."""
