"""FLIP's error root and its meaningful subclasses.

Every error FLIP raises on purpose is a :class:`FlipError`: a sentence the reader can act on,
plus fields a caller can inspect. They pickle with their fields (a task process, a kernel's
background thread and papermill all move exceptions between processes). A role's own errors
subclass one of these; the magics turn any of them into a one-line ``UsageError``.
"""

from __future__ import annotations

from typing import Any


class FlipError(Exception):
    """The root of FLIP's errors: ``str(error)`` is a sentence for the person who can fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def _args(self) -> tuple[Any, ...]:
        """The constructor's arguments, for pickling (subclasses with fields extend it)."""
        return (self.message,)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._args(), self.__dict__.copy())


class ConfigError(FlipError):
    """A file or setting FLIP reads is missing or wrong (a site's policy, a catalog, keys, a registry)."""


class Rejected(FlipError):
    """A request was refused; ``status`` is the HTTP status it is answered (or was answered) with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    def _args(self) -> tuple[Any, ...]:
        return (self.message, self.status)


class RequestInvalid(Rejected):
    """A request body or parameter is malformed: ``field`` names the part that is wrong."""

    def __init__(self, message: str, field: str = "", status: int = 400) -> None:
        super().__init__(message, status)
        self.field = field

    def _args(self) -> tuple[Any, ...]:
        return (self.message, self.field, self.status)


class NotConnected(FlipError):
    """No coordinator to talk to: no connection file, unreachable, or a token it refuses."""


class TaskInvalid(FlipError):
    """The cell cannot become a task (a syntax error, a missing function, ``build_model()`` fails)."""


class RunFailed(FlipError):
    """A run ended without a model: failed or stopped."""

    def __init__(self, run_id: str, status: str, reason: str) -> None:
        super().__init__(f"run {run_id} {status}: {reason}")
        self.run_id = run_id
        self.status = status
        self.reason = reason

    def _args(self) -> tuple[Any, ...]:
        return (self.run_id, self.status, self.reason)


__all__ = [
    "ConfigError",
    "FlipError",
    "NotConnected",
    "Rejected",
    "RequestInvalid",
    "RunFailed",
    "TaskInvalid",
]
