"""The exception types for problems a user can fix (bad input, or the machine they run on).

Library code raises `UserError` with one sentence naming the file, line or config key and what
to do; entry points print that sentence and exit with status 2 instead of a traceback
(`EnvironmentFailure`: status 1).
"""


class UserError(Exception):
    """Bad input (config, data, checkpoint, mesh) the user can fix; never a bug in this code."""

    exit_code = 2


class EnvironmentFailure(UserError):
    """The machine, not the input: a full disk, an unwritable folder. One sentence too, but
    entry points exit with status 1 (the command was right; rerun it once the cause is fixed)."""

    exit_code = 1
