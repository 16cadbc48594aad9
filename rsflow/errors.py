"""The rsflow error hierarchy.

``RequestError`` is what a user can fix by changing a flag or a config value: the CLI prints its
message on one line and exits with status 2 (:data:`EXIT_BAD_INPUT`). ``SourceError`` (a catalog that
cannot be searched) and ``GpuUnavailable`` (no GPU node for ``--require-gpu``) exit with :data:`EXIT_UNAVAILABLE`. Everything else is a bug or an outside
failure and keeps its traceback.
"""

from __future__ import annotations

import re
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
"""The run could not start: the STAC source could not be searched (down, refusing, past its retries), or
no GPU node joined the cluster in time under ``--require-gpu``."""


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


class GpuUnavailable(SourceError):
    """``--require-gpu``: no GPU node joined the Ray cluster in time, so no model actor started (the
    cluster's doing: the monitor counts no attempt against its scenes)."""


class ModelError(RsflowError):
    """A model or adapter could not be loaded as asked."""


_WRAPPED_REQUEST_ERROR: Final = re.compile(r"rsflow\.errors\.RequestError: (\S+): (.+)$", re.MULTILINE)
"""The last line of a remote traceback that ended in a RequestError."""
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*m")


def request_error_in(exc: BaseException) -> RequestError | None:
    """The :class:`RequestError` an exception stands for, where a Ray task or actor raised it: Ray Data
    hands it to the driver wrapped (``RayTaskError(UserCodeException)`` from a stage's function,
    ``ActorDiedError`` from an actor's ``__init__``, such as a model actor refusing its settings), with the
    original only in the text of the remote traceback. None when there is none.

    Looked for in the exception itself, its ``cause`` / ``__cause__`` chain, then the last
    ``rsflow.errors.RequestError: FIELD: REASON`` line of its text.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, RequestError):
            return current
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    text = _ANSI.sub("", str(exc))
    found = _WRAPPED_REQUEST_ERROR.findall(text)
    return RequestError(found[-1][0], found[-1][1].strip()) if found else None
