"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line, never a traceback."""
