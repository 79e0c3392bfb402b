"""Errors that describe a problem with the user's input (a path, a file, a config).

The CLI prints these as one line (no traceback) and exits with status 2; library users can catch them.
"""


class DsmrError(Exception):
    """A problem the user can fix: the message says what went wrong and where."""
