"""What the agent hands a task process (``site_agent.sandbox.handed``): a sealed in-memory file, read once."""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection

import pytest

from site_agent.sandbox.handed import receive, sealed, send, take


def test_a_handed_file_holds_its_bytes_and_no_one_can_change_them() -> None:
    fd = sealed(b"age\n63\n")
    try:
        for change in (
            lambda: os.pwrite(fd, b"70", 4),  # write
            lambda: os.ftruncate(fd, 2),  # shrink
            lambda: os.ftruncate(fd, 1 << 20),  # grow
            lambda: os.pwrite(fd, b"more", 7),  # append
        ):
            with pytest.raises(PermissionError):
                change()
    except BaseException:
        os.close(fd)
        raise
    assert take(fd) == b"age\n63\n"
    with pytest.raises(OSError):
        os.fstat(fd)  # taken: nothing of it stays open


def test_what_is_sent_over_a_connection_arrives_as_a_sealed_file_read_and_closed() -> None:
    ours, theirs = socket.socketpair()
    sender, receiver = Connection(ours.detach()), Connection(theirs.detach())
    try:
        before = set(os.listdir("/proc/self/fd"))
        payload = bytes(range(256)) * 40_000  # larger than a socket's buffer: it travels in the file, not the socket
        send(sender, payload, os.getpid(), "flip-test")
        assert receive(receiver) == payload
        assert set(os.listdir("/proc/self/fd")) <= before  # no descriptor left behind at either end
    finally:
        sender.close()
        receiver.close()
