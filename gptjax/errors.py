"""The base class of the errors a user can fix; the command-line tools print them as one line (`gptjax.cli.run`)."""


class UserError(Exception):
  """A bad value, missing data or an unreadable file: the message names it and the fix, so no traceback is shown."""
