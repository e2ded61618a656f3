"""Errors caused by user input.

The CLI prints these as one line (``error: <message>``) and exits with code 2; anything else is a
bug and keeps its traceback. Messages name the file and key at fault and say what would be valid.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: config, data path, checkpoint, command-line flag.

    The message is kept to one printable line: line breaks and control characters that came in
    with user input (a key or a pattern containing a newline) are shown escaped.
    """

    def __init__(self, message: object = "") -> None:
        text = str(message)
        if not text.isprintable():  # line breaks, other separators, terminal escapes: shown escaped
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        super().__init__(text)


class ConfigError(UserError, ValueError):
    """A params file or ``sparsity:`` block that does not validate."""


class DataError(UserError):
    """A data source that cannot be read or does not fit the model."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, foreign or of another model shape."""
