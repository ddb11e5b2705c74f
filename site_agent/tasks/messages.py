"""What the site agent and a task process say to each other, besides the steps: a module that imports
nothing at run time, so that the task process can read it before its sandbox, while it is still one thread."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

READY = b"ready"  # the task process has loaded torch (and, after ADOPT, taken its run)
ADOPT = b"adopt:"  # + JSON {"run_id", "scratch", "memory_mb"}: sent once when a run adopts a task process
ISOLATION_REFUSED = 3  # the task process's exit code when it cannot be isolated as the site requires
STEP = b"step:"  # + a step's (or result's) length in bytes (ASCII): the bytes follow as the next message, read
# into a buffer of that length: the task process's arrays are writable views of it, and the output guard can
# rewrite the result's header in place, with no copy either way
RESULT_RESERVE = 4096  # bytes of room the task process leaves after its result's header, for the output guard


def send_sized(conn: Connection, blob: bytes | bytearray) -> None:
    """Send ``blob`` with its length first, for :func:`receive_sized` at the other end."""
    conn.send_bytes(STEP + str(len(blob)).encode())
    conn.send_bytes(blob)


def receive_sized(conn: Connection, told: bytes | bytearray) -> bytearray:
    """The bytes announced by ``told`` (a message :func:`send_sized` sent first), in a bytearray of their own."""
    buffer = bytearray(int(told[len(STEP) :]))
    if conn.recv_bytes_into(buffer) != len(buffer):
        raise EOFError("the message was shorter than its announced length")
    return buffer
