"""The exceptions that mean "the user's input is wrong", as opposed to a bug.

The binaries (`cli.run`) print a `UserError` as one line and exit with `USAGE_EXIT_CODE`;
any other exception keeps its traceback. Each message names what to fix: the config
field, the flag, the file and row.
"""

from __future__ import annotations

USAGE_EXIT_CODE = 2        # a mistake in a flag, a config value, a path or an input file
PREEMPTED_EXIT_CODE = 75   # EX_TEMPFAIL: saved on SIGTERM / a preemption notice; restart


class UserError(Exception):
  """A mistake in the user's input; the message says what and where."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (the message names the field)."""


class InputError(UserError, ValueError):
  """An input file or record that cannot be read (the message names the file and row)."""


class MissingInputError(UserError, FileNotFoundError):
  """A path given by the user that does not exist or holds nothing usable."""


class Preempted(Exception):
  """Training saved a checkpoint and stopped early on SIGTERM or a preemption notice; the
  binaries exit with `PREEMPTED_EXIT_CODE` so that a launcher restarts them."""


class NonFiniteLossError(RuntimeError):
  """A step's loss or gradient norm was NaN or Inf; the message names the step, the
  bucket and the last good checkpoint. The binaries print it as one line, exit 1."""


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint whose parameters do not fit the configured model."""
