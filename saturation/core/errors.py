"""The one exception type the command line turns into a single plain error line."""


class ToolkitError(Exception):
    """Bad input or an unusable model: the message is shown to the user as one line, with no traceback."""
