"""The rsflow error hierarchy.

``RequestError`` is what a user can fix by changing a flag or a config value: the CLI prints its
message on one line and exits with status 2 (:data:`EXIT_BAD_INPUT`). ``SourceError`` (a catalog that
cannot be searched) exits with :data:`EXIT_UNAVAILABLE`. Everything else is a bug or an outside
failure and keeps its traceback.
"""

from __future__ import annotations

from typing import Final

# Exit statuses of the ``rsflow`` commands and the jobs (README, "Exit codes").
EXIT_OK: Final[int] = 0
"""Everything asked was done."""
EXIT_ERROR: Final[int] = 1
"""An unexpected failure (a bug, or an outside failure with no better code); the traceback is logged."""
EXIT_BAD_INPUT: Final[int] = 2
"""Bad input (a flag, a config key, a data file): one line names it; nothing was started."""
EXIT_LOCKED: Final[int] = 3
"""``rsflow monitor run``: another run of the same monitor holds the lock."""
EXIT_PARTIAL: Final[int] = 4
"""The run finished and its output is committed, but some tiles or items failed (the manifest's
``failures`` lists each with its reason)."""
EXIT_UNAVAILABLE: Final[int] = 5
"""The run could not start: the STAC source could not be searched (down, refusing, past its retries)."""


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

    def __reduce__(self) -> tuple[type[RequestError], tuple[str, str]]:
        # Rebuilt from its two arguments: raised in a Ray task or actor, it reaches the driver as itself (the
        # CLI's one line and exit 2), not as Ray's "failed to deserialize the exception" wrapper.
        return type(self), (self.field, self.reason)


class SourceError(RsflowError):
    """A STAC source could not be searched or read (keeps the HTTP status where there is one)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)

    def __reduce__(self) -> tuple[type[SourceError], tuple[str, int | None]]:
        return type(self), (str(self), self.status_code)


class ModelError(RsflowError):
    """A model or adapter could not be loaded as asked."""
