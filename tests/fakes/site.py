"""The site agent's parts as its unit tests see them: an image loader that reads no file, a task process that starts
no process."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flip_core.protocol import StepResult, decode_request, encode_result
from flip_core.status import StepStatus


def fake_images(arrays: dict[str, np.ndarray]) -> tuple[list[Path], Callable[[Path], np.ndarray]]:
    """Stands in for an imaging dataset's files and ``site_agent.data.images.load_array``: each name's array, as
    the loader would decode it, and no file read."""
    return [Path(name) for name in arrays], lambda path: arrays[str(path)]


class FakeTaskProcess:
    """Stands in for ``site_agent.tasks.process.Worker`` (a task process and its connection): what it was started to
    bind, each adoption it was given, and an OK result for every step; no process."""

    pids = itertools.count(1000)

    def __init__(self, site_root: Path, *args: Any, bind: tuple[Path, ...] = (), **options: Any) -> None:
        self.bind = bind
        self.adoptions: list[tuple[str, Any]] = []
        self.process = self
        self.pid = next(self.pids)
        self.ready, self.steps_running, self.last_used = True, 0, time.monotonic()
        self.group = None  # no cgroup of its own

    def poll(self) -> int | None:  # as Popen: still running
        return None

    def wait_ready(self) -> None:
        pass

    def adopt(self, run_id: str, scratch: Path, memory_mb: int | None, run: Any) -> None:
        self.adoptions.append((run_id, run))

    def call(self, blob: bytes | bytearray, *args: Any) -> bytes:
        return encode_result(StepResult(site=decode_request(blob).run_id, status=StepStatus.OK))

    def close(self) -> None:
        pass

    def kill(self) -> None:
        pass


class FakeZygote:
    """Stands in for ``site_agent.tasks.zygote.Zygote`` where the task processes are fakes too: loaded at once,
    never forking (a worker given it is a FakeTaskProcess)."""

    def __init__(self, *args: Any) -> None:
        self.ready, self.gone = threading.Event(), threading.Event()
        self.ready.set()
        self.closed = False

    def alive(self) -> bool:
        return not self.closed

    def wait_ready(self, timeout: float = 0.0) -> bool:
        return self.alive()

    def close(self) -> None:
        self.closed = True
