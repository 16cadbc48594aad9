"""The rsflow error hierarchy.

``RequestError`` is what a user can fix by changing a flag or a config value: the CLI prints its
message on one line and exits with status 2. Everything else is a bug or an outside failure and
keeps its traceback.
"""

from __future__ import annotations


class RsflowError(Exception):
    """Base class of every error rsflow raises on purpose."""


class RequestError(RsflowError, ValueError):
    """Bad user input: names the field (or ``--flag``) and the reason.

    Args:
        field: the flag or config key at fault, e.g. ``"--bbox"``.
        reason: what is wrong and, where possible, how to fix it.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class SourceError(RsflowError):
    """A STAC source could not be searched or read (keeps the HTTP status where there is one)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class ModelError(RsflowError):
    """A model or adapter could not be loaded as asked."""
