"""Errors that are the user's to fix (a typo, a missing file). The CLI prints them in one line and
exits non-zero; every other exception is a bug and keeps its traceback."""


class UserError(Exception):
    """Base of all user-facing errors."""


class TrainingDiverged(UserError, FloatingPointError):
    """A loss, gradient or metric became NaN or infinite: the run's hyperparameters (often the
    learning rate) made training diverge. One line for the user, and the run is marked failed."""
