"""User-facing errors.

A `UserError` is a mistake the user can fix (a bad config value, a missing
file, a corrupt shard). The CLI prints its message and exits non-zero without
a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message says what and how to fix it."""

    exit_code = 2
