"""What the tests check of a user-facing error: one line, no traceback."""


def one_line(error: BaseException) -> str:
    """The error's message, asserted to be a single non-empty line without a traceback."""
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text
