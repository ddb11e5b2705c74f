"""Stage timings for the benchmarks: ``with stage("site fetch"):`` appends one line to the file named by
``FLIP_STAGE_LOG`` (wall and CPU seconds of the block, and the process), and does nothing when it is unset.

``bench.model_size --stages`` sets it for the whole local federation and prints where each round's time
went: the hub's encoding and publishing, each site's fetch, task step, output guard and upload, the hub's
reading of each reply and its aggregation. Lines are appended whole (``O_APPEND``), so processes share it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

ENV_STAGE_LOG = "FLIP_STAGE_LOG"


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    path = os.environ.get(ENV_STAGE_LOG)
    if not path:
        yield
        return
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        line = f"{name}\t{time.perf_counter() - wall:.4f}\t{time.thread_time() - cpu:.4f}\t{os.getpid()}\n"
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


__all__ = ["ENV_STAGE_LOG", "stage"]
