"""What a task process sends its agent, read under a cap and a deadline (``site_agent.tasks.messages``): nothing it
announces is allocated past the cap, nothing it stalls holds the agent past the deadline."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from site_agent.tasks.messages import (
    RESULT_ROOM,
    STEP,
    Overdue,
    Oversized,
    receive_message,
    receive_sized,
    result_cap,
    send_sized,
)


@pytest.fixture
def channel() -> Iterator[tuple[Connection, socket.socket]]:
    """The agent's end (a Connection, as the task service holds it) and the task process's raw socket."""
    ours, theirs = socket.socketpair()
    agent = Connection(ours.detach())
    yield agent, theirs
    agent.close()
    theirs.close()


def framed(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def test_a_sized_message_arrives_whole_in_a_buffer_of_its_own(channel) -> None:
    agent, task = channel
    blob = os.urandom(3 << 20)  # more than one chunk, and more than the socket holds: sent from a thread
    writer = Connection(os.dup(task.fileno()))
    sender = threading.Thread(target=send_sized, args=(writer, blob))
    sender.start()
    told = receive_message(agent, 64)
    received = receive_sized(agent, told, cap=len(blob), deadline=time.monotonic() + 60)
    sender.join()
    assert isinstance(received, bytearray) and received == blob
    writer.close()


def test_an_announced_length_past_the_cap_is_refused_before_anything_is_read(channel) -> None:
    agent, task = channel
    task.sendall(framed(STEP + str(2**45).encode()))
    told = receive_message(agent, 64)
    with pytest.raises(Oversized) as refused:  # 32 TiB: allocating it would fail or take the host's memory
        receive_sized(agent, told, cap=1 << 20)
    assert (refused.value.size, refused.value.cap) == (2**45, 1 << 20)


def test_a_message_longer_than_its_cap_is_refused_from_its_length_alone(channel) -> None:
    agent, task = channel
    task.sendall(struct.pack("!i", -1) + struct.pack("!Q", 2**62))  # the 8-byte length of a large message
    with pytest.raises(Oversized):
        receive_message(agent, 1 << 20)


def test_a_message_longer_than_announced_is_refused(channel) -> None:
    agent, task = channel
    task.sendall(framed(STEP + b"10") + framed(b"x" * 1000))
    with pytest.raises(Oversized):
        receive_sized(agent, receive_message(agent, 64), cap=1 << 20)


def test_a_message_shorter_than_announced_is_refused(channel) -> None:
    agent, task = channel
    task.sendall(framed(STEP + b"10") + framed(b"x" * 4))
    with pytest.raises(EOFError):
        receive_sized(agent, receive_message(agent, 64), cap=1 << 20)


def test_an_announcement_that_is_not_a_length_is_refused(channel) -> None:
    agent, task = channel
    for told in (STEP + b"-5", STEP + b"", STEP + b"1e9", STEP + b"9" * 40):
        with pytest.raises(EOFError):
            receive_sized(agent, told, cap=1 << 20)


def test_a_result_announced_and_never_sent_is_overdue_at_the_deadline(channel) -> None:
    agent, task = channel
    task.sendall(framed(STEP + b"1000") + struct.pack("!i", 1000) + b"x" * 10)  # then nothing more
    told = receive_message(agent, 64)
    with pytest.raises(Overdue):
        receive_sized(agent, told, cap=1 << 20, deadline=time.monotonic() + 0.2)


def test_a_step_its_task_process_does_not_read_is_overdue_at_the_deadline(channel) -> None:
    agent, _ = channel  # the other end reads nothing: the socket's buffers fill
    with pytest.raises(Overdue):
        send_sized(agent, bytes(64 << 20), deadline=time.monotonic() + 0.2)
    assert os.get_blocking(agent.fileno())  # as it was: the connection's own reads still block


def test_a_results_cap_is_its_steps_size_and_room_unless_the_site_sets_one() -> None:
    assert result_cap(bytes(1000)) == 1000 + RESULT_ROOM
    assert result_cap(bytes(1000), 64 << 20) == 64 << 20
