"""What the site agent and a task process say to each other, besides the steps: a module that imports
nothing but the standard library and FLIP's error root at run time, so that the task process can read it before its
sandbox, while it is still one thread.

The agent reads what a task process sends it with :func:`receive_sized` under a cap and a deadline: the length of each
message is read first, refused before anything is allocated when it passes the cap, and the bytes are read in
bounded chunks into the one buffer, each chunk waited for no longer than the deadline leaves. Task code can write to
the channel itself (it is a descriptor of its process), so nothing it announces is believed beyond that.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from flip_core.errors import FlipError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

READY = b"ready"  # the task process has loaded torch (and, after ADOPT, taken its run)
ADOPT = b"adopt:"  # + JSON {"run_id", "scratch", "memory_mb", "site", "dataset", "cohort"}: sent once when a run
# adopts a task process, followed by the descriptor of a sealed in-memory file holding the run's rows only
# (site_agent.tasks.adoption, site_agent.sandbox.handed)
ISOLATION_REFUSED = 3  # the task process's exit code when it cannot be isolated as the site requires
STEP = b"step:"  # + a step's (or result's) length in bytes (ASCII): the bytes follow as the next message, read
# into a buffer of that length: the task process's arrays are writable views of it, and the output guard can
# rewrite the result's header in place, with no copy either way
RESULT_RESERVE = 4096  # bytes of room the task process leaves after its result's header, for the output guard
RESULT_ROOM = 1 << 20  # a result may be this much larger than its step (its metrics, the archive's own bytes)
CHUNK = 1 << 20  # what one read or write moves at most
_SHORT, _LONG = struct.Struct("!i"), struct.Struct("!Q")  # multiprocessing.connection's framing of a message


class Oversized(FlipError):
    """A message (or the result it announced) longer than the reader's cap: refused before it was read."""

    def __init__(self, size: int, cap: int) -> None:
        super().__init__(f"a message of {size} bytes passed the cap of {cap} bytes")
        self.size, self.cap = size, cap

    def _args(self) -> tuple[int, int]:
        return (self.size, self.cap)


class Overdue(FlipError):
    """The other end did not finish a message by the deadline."""

    def __init__(self) -> None:
        super().__init__("the message did not arrive in time")

    def _args(self) -> tuple[()]:
        return ()


def result_cap(step: bytes | bytearray, limit_bytes: int | None = None) -> int:
    """The most a step's result may hold: the step itself (the declared model's parameters, the cell, its
    settings) plus :data:`RESULT_ROOM`, or the site's own limit where it set one."""
    return limit_bytes if limit_bytes is not None else len(step) + RESULT_ROOM


def send_sized(conn: Connection, blob: bytes | bytearray, deadline: float | None = None) -> None:
    """Send ``blob`` with its length first, for :func:`receive_sized` at the other end (by ``deadline``, a
    ``time.monotonic()`` value, when one is given: else :class:`Overdue`)."""
    if deadline is None:
        conn.send_bytes(STEP + str(len(blob)).encode())
        conn.send_bytes(blob)
        return
    with _nonblocking(conn.fileno()) as fd:
        for message in (STEP + str(len(blob)).encode(), blob):
            _write_all(fd, _head(len(message)), deadline)
            _write_all(fd, message, deadline)


def receive_sized(
    conn: Connection, told: bytes | bytearray, cap: int | None = None, deadline: float | None = None
) -> bytearray:
    """The bytes announced by ``told`` (a message :func:`send_sized` sent first), in a bytearray of their own:
    :class:`Oversized` when the announcement passes ``cap`` (nothing is allocated) or the message that follows is
    longer than announced; EOFError when it is shorter; :class:`Overdue` when it is not all there by ``deadline``."""
    length = told[len(STEP) :]
    if not (0 < len(length) <= 20 and bytes(length).isdigit()):
        raise EOFError("the announced length is not a number")
    announced = int(length)
    if cap is not None and announced > cap:
        raise Oversized(announced, cap)
    buffer = receive_message(conn, announced, deadline)
    if len(buffer) != announced:
        raise EOFError("the message was shorter than its announced length")
    return buffer


def receive_message(conn: Connection, cap: int, deadline: float | None = None) -> bytearray:
    """One message (``send_bytes``'s framing) of at most ``cap`` bytes, read in chunks into its own buffer."""
    with _nonblocking(conn.fileno()) as fd:
        (size,) = _SHORT.unpack(_read_exact(fd, _SHORT.size, deadline))
        if size == -1:
            (size,) = _LONG.unpack(_read_exact(fd, _LONG.size, deadline))
        if size < 0 or size > cap:
            raise Oversized(size, cap)
        return _read_exact(fd, size, deadline)


def _head(size: int) -> bytes:
    """The length before a message, as ``Connection.send_bytes`` writes it."""
    return _SHORT.pack(size) if size <= 0x7FFFFFFF else _SHORT.pack(-1) + _LONG.pack(size)


@contextlib.contextmanager
def _nonblocking(fd: int) -> Iterator[int]:
    """``fd`` without blocking (every wait is a select with the time left), as it was again after."""
    was = os.get_blocking(fd)
    os.set_blocking(fd, False)
    try:
        yield fd
    finally:
        os.set_blocking(fd, was)


def _wait(fd: int, writing: bool, deadline: float | None) -> None:
    """Until ``fd`` can be written (or read), or :class:`Overdue` at ``deadline``."""
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and left <= 0:
        raise Overdue()
    poller = select.poll()  # not select(): an agent may hold more than FD_SETSIZE descriptors
    poller.register(fd, (select.POLLOUT if writing else select.POLLIN) | select.POLLHUP | select.POLLERR)
    if not poller.poll(None if left is None else max(1, int(left * 1000))):
        raise Overdue()


def _read_exact(fd: int, size: int, deadline: float | None) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        try:
            n = os.readv(fd, [view[got : got + CHUNK]])
        except BlockingIOError:
            _wait(fd, False, deadline)
            continue
        if n == 0:
            raise EOFError("the other end closed the channel")
        got += n
    return buffer


def _write_all(fd: int, data: bytes | bytearray, deadline: float | None) -> None:
    view, sent = memoryview(data), 0
    while sent < len(data):
        try:
            sent += os.write(fd, view[sent : sent + CHUNK])
        except BlockingIOError:
            _wait(fd, True, deadline)
