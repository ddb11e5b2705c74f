"""What can go wrong on the notebook side, each as a sentence the researcher can act on."""

from __future__ import annotations


class FlipError(Exception):
    """Root of FLIP's notebook-side errors."""


class TaskInvalid(FlipError):
    """The cell cannot become a task (syntax error, missing function, build_model fails)."""


class Rejected(FlipError):
    """The coordinator refused a request; the message is its reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (str(self), self.status))


class NotConnected(FlipError):
    """No coordinator to talk to (no connection file, unreachable, bad token)."""


class RunFailed(FlipError):
    """A run ended without a model: failed or stopped."""

    def __init__(self, run_id: str, status: str, reason: str) -> None:
        super().__init__(f"run {run_id} {status}: {reason}")
        self.run_id = run_id
        self.status = status
        self.reason = reason

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.run_id, self.status, self.reason))
