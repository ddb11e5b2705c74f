"""A task process's output (its stdout and stderr, one pipe) as the site agent copies it into the site's log, at most
a number of lines and bytes a step: past either, the rest of the step's output is read and dropped (the task never
blocks on a full pipe), and the log says so once.

The task's code writes what it likes: its output is the site admin's to read, never the researcher's, and a step
cannot fill the site's disk through it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

READ_BYTES = 1 << 16  # what one read of the pipe takes at most


@dataclass(frozen=True)
class LogLimit:
    """The most of one step's output the site's log keeps."""

    lines: int = 100_000
    bytes: int = 8 << 20

    def note(self) -> str:
        """The line the log gets where a step's output was cut."""
        return (
            f"\n--- FLIP: this step's output passed the site's log limit ({self.lines} lines or "
            f"{self.bytes / 2**20:g} MiB a step); the rest of it was not kept ---\n"
        )


class TaskOutput:
    """Copies a task process's output (a pipe) to the site's log: the spares' log, then its run's; a step's
    (from :meth:`begin_step` to the next) at most ``limit``. ``on_cut(label)`` is told once a step when it is cut."""

    def __init__(self, path: Path, limit: LogLimit = LogLimit(), on_cut: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.limit = limit
        self.on_cut = on_cut
        self.label = ""  # the run whose log this is ("": a spare's)
        self._lock = threading.Lock()
        self._lines = self._bytes = 0
        self._cut = False
        path.touch()

    def switch(self, path: Path, label: str = "") -> None:
        with self._lock:
            self.path, self.label = path, label
            path.touch()

    def begin_step(self) -> None:
        """A step starts: its output is counted afresh."""
        with self._lock:
            self._lines = self._bytes = 0
            self._cut = False

    def copy(self, stream: IO[bytes]) -> None:
        """Until the process closes its end (call in a thread of its own)."""
        with stream:
            for chunk in iter(lambda: stream.read1(READ_BYTES), b""):  # type: ignore[attr-defined]
                with self._lock:
                    if self._cut:
                        continue  # read and dropped: the task never waits on a full pipe
                    kept = self._keep(chunk)
                    cut, label = len(kept) < len(chunk), self.label
                    with open(self.path, "ab") as sink:
                        sink.write(kept + (self.limit.note().encode() if cut else b""))
                    self._cut = cut
                if cut and self.on_cut is not None:
                    self.on_cut(label)

    def _keep(self, chunk: bytes) -> bytes:
        """What of ``chunk`` fits in the step's limit (called with the lock held)."""
        part = chunk[: max(0, self.limit.bytes - self._bytes)]
        lines_left = self.limit.lines - self._lines
        if part.count(b"\n") > lines_left:
            end = -1
            for _ in range(lines_left):
                end = part.index(b"\n", end + 1)
            part = part[: end + 1]
        self._bytes += len(part)
        self._lines += part.count(b"\n")
        return part
