"""Errors that are the user's to fix (a typo, a missing file). The CLI prints them in one line and
exits non-zero; every other exception is a bug and keeps its traceback."""


class UserError(Exception):
    """Base of all user-facing errors."""
