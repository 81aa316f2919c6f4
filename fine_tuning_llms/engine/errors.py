"""The one exception type that the CLI turns into a clean one-line message (exit status 2)."""
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
