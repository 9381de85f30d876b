"""The exception types for problems a user can fix (bad input, or the machine they run on).

Library code raises `UserError` with one sentence naming the file, line or config key and what
to do; entry points print that sentence and exit with status 2 instead of a traceback
(`EnvironmentFailure`: status 1).
"""

import errno

# A failed write whose errno is one of these is the machine's doing, not the input's: one
# sentence and exit status 1 (cli.run, checkpoints, data preparation). Disk full: free some
# space; the others: fix the folder's permissions or choose another.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
ENVIRONMENT_ERRNOS = DISK_FULL_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM}


class UserError(Exception):
    """Bad input (config, data, checkpoint, mesh) the user can fix; never a bug in this code."""

    exit_code = 2


class EnvironmentFailure(UserError):
    """The machine, not the input: a full disk, an unwritable folder. One sentence too, but
    entry points exit with status 1 (the command was right; rerun it once the cause is fixed)."""

    exit_code = 1
