"""The one exception type users see as a single line (the CLI prints it and exits 2)."""


class UserError(Exception):
    """Bad input or a bad request: the message is shown to the user as one line, without a traceback."""
