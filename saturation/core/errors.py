"""The one exception type the command line turns into a single plain error line."""


class ToolkitError(Exception):
    """Bad input or an unusable model: the message is shown to the user as one line, with no traceback."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (its class name when it has none), for a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
