"""The one place FLIP changes how Flower's ServerApp pulls reply objects (an engine internal).

``HttpGrid.pull_messages`` pulls a reply's objects with ``pull_objects`` and Flower's defaults:
a 1 s initial backoff (a reply is visible before its objects finish uploading, so every reply
can wait a needless second) and up to two hours of retries. When a site dies half-way through
uploading its reply, the round loop then hangs for minutes inside one call. FLIP pulls in short
slices with a short backoff and gives up as soon as the round loop says a site it waits for has
gone. The patch is applied where the ServerApp starts (``flower_server.main``) and undone when its
run ends. ``tests/coordinator/test_flower_contract.py`` fails if the patched name moves.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import flwr.superlink.grid.http_grid as http_grid
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_objects

INITIAL_BACKOFF = 0.05
BACKOFF_CAP = 0.5
SLICE_SECONDS = 1.0
MAX_SECONDS = 600.0

_should_abort: Callable[[], bool] = lambda: False  # noqa: E731


def _pull_objects(object_ids: list[str], pull_object_fn: Callable[[str], bytes], **_: Any) -> dict[str, bytes]:
    deadline = time.monotonic() + MAX_SECONDS
    while True:
        try:
            return pull_objects(
                object_ids,
                pull_object_fn,
                max_time=SLICE_SECONDS,
                initial_backoff=INITIAL_BACKOFF,
                backoff_cap=BACKOFF_CAP,
            )
        except ObjectPullError:
            if time.monotonic() >= deadline or _should_abort():
                raise


@contextlib.contextmanager
def tuned_grid_pulls(should_abort: Callable[[], bool]) -> Iterator[None]:
    """Within this block the ServerApp pulls reply objects FLIP's way; ``should_abort()`` is asked
    between slices. Flower's own ``pull_objects`` is back in place afterwards."""
    global _should_abort
    original, previous_abort = http_grid.pull_objects, _should_abort  # type: ignore[attr-defined]
    _should_abort = should_abort
    http_grid.pull_objects = _pull_objects  # type: ignore[attr-defined]
    try:
        yield
    finally:
        http_grid.pull_objects, _should_abort = original, previous_abort  # type: ignore[attr-defined]
