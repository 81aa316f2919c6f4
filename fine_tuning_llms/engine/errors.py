"""The exception types the library raises for the user: UserError (the CLI turns it into a clean
one-line message, exit status 2) and InvalidRecord (one bad data record, reported with its file:line)."""
from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us (flags, files, models), with the fix in the message.

    Raised anywhere in the library; only ``cli.main`` catches it, prints ``error: <message>``
    and exits with status 2. Several problems found together are joined with "; ".
    """

    def __init__(self, message: str | list[str]):
        if isinstance(message, list):
            message = "; ".join(message)
        super().__init__(message)


class InvalidRecord(ValueError):
    """One data record that cannot become a conversation; the message says why (the caller adds
    the file and line, and whether --skip_invalid may skip it)."""
