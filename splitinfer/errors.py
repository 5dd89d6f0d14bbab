"""The one exception type that means "the user gave bad input": reported as one line, exit status 2."""


class UserError(Exception):
    """Bad input from the command line or configuration; the message is shown as is."""
