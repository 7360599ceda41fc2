"""The one base class of the errors a user can fix: bad input, a missing file, an unreachable Hub.

The command line prints such an error as one line and exits with status 2; anything else is a bug and keeps
its traceback. Each module defines its own subclass next to the code that raises it.
"""


class UserError(Exception):
    """Bad input or an unreachable resource; the message says what and why in one line."""
