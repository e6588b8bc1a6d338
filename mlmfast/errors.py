"""One exception type for bad user input: the CLI prints its message as one line (no traceback unless --debug)."""


class UserError(ValueError):
    """Bad input or setup that the user can fix; the message names the problem and the fix."""
