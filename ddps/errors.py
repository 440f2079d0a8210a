"""User-facing errors: one line, naming the file or value and the valid choices."""


class DDPSError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


class DataError(DDPSError):
    """A dataset file or folder is missing, corrupt or inconsistent."""


class ConfigError(DDPSError):
    """A configuration key, value or preset is unknown or invalid."""


class CheckpointError(DDPSError):
    """A checkpoint file cannot be read or does not fit the model."""


def reason(error: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (at most ``limit`` characters), else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def choices(names) -> str:
    """Format valid choices for an error message: 'a, b, c'."""
    return ", ".join(sorted(names))
