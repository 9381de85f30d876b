"""The one exception type for bad input from a user.

Library code raises `UserError` with one sentence naming the file, line or config key and what
to do; entry points print that sentence and exit with status 2 instead of a traceback.
"""


class UserError(Exception):
    """Bad input (config, data, checkpoint, mesh) the user can fix; never a bug in this code."""
