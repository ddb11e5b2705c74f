"""What the site agent hands a task process, by descriptor: a sealed in-memory file.

The agent (trusted, outside the sandbox) writes what a run was approved for into an in-memory file (``memfd``),
seals it against any change (writing, growing, shrinking, new seals) and passes its descriptor to the run's task
process: over their connection when the run adopts the process (:func:`send`, :func:`receive`), or when a process is
started for one run (the files it binds). The process reads it once and closes it (:func:`take`): no descriptor or
path of the site's own files ever reaches it, and what it can read of the site is what was in that file. Which bytes
is the data's to say (``site_agent.data.formats.handed``); this is the mechanism.
"""

from __future__ import annotations

import fcntl
import os
from multiprocessing.reduction import recv_handle, send_handle
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
CHUNK = 1 << 24


def sealed(data: bytes | bytearray, name: str = "flip-handed") -> int:
    """A read-only in-memory file holding ``data``: its descriptor (close-on-exec; the caller closes it)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:CHUNK]) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def take(fd: int) -> bytes:
    """Everything in a handed file, read from its start; the descriptor is closed, nothing of it stays open."""
    try:
        chunks, offset = [], 0
        while chunk := os.pread(fd, CHUNK, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def send(conn: Connection, data: bytes | bytearray, pid: int, name: str = "flip-handed") -> None:
    """Hand ``data`` to the process ``pid`` at the other end of ``conn``, as a sealed file (:func:`receive`)."""
    fd = sealed(data, name)
    try:
        send_handle(conn, fd, pid)
    finally:
        os.close(fd)


def receive(conn: Connection) -> bytes:
    """What the other end handed with :func:`send`, read, its descriptor closed."""
    return take(recv_handle(conn))
