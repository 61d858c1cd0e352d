"""The one exception type for mistakes a user can fix.

`UserError` carries a message written for people: what was given, what was expected, and
what to do. The CLI prints it without a traceback and exits with status 2; the Python API
lets it propagate. It subclasses ValueError so callers that catch ValueError keep working.
"""


class UserError(ValueError):
    """Bad input from the user: the message says what was found, what was expected, the fix."""
