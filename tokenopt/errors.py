"""User-facing errors.

Every mistake a user can make (a bad recipe, an unreadable checkpoint, a model a pass cannot
handle) raises a subclass of [`TokenoptError`][tokenopt.errors.TokenoptError]. The CLI turns it into one message on stderr
and exit status 2, never a traceback; the library lets it propagate so callers can catch it.
"""


class TokenoptError(Exception):
    """A user error: the message says what is wrong, where, and what to do."""

    exit_code = 2


class RecipeError(TokenoptError):
    """The recipe is malformed, names an unknown pass or key, or selects no block."""


class ModelLoadError(TokenoptError):
    """A model, checkpoint or architecture cannot be loaded."""


class AnalysisError(TokenoptError):
    """The model cannot be traced, or has no transformer blocks."""


class PlanError(TokenoptError):
    """The recipe cannot be applied to this model (e.g. r too large under strict)."""


class DataError(TokenoptError):
    """A data set cannot be read or does not fit the model."""
