"""The one exception type that reaches users as a plain message instead of a traceback."""


class UserError(Exception):
    """Bad input or setup: the message names the problem and the fix."""
