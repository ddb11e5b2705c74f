"""flip_core.util: free ports are drawn where no outgoing connection can take them meanwhile."""

from __future__ import annotations

import socket

from flip_core.util import _ephemeral_low, free_port, wait_until


def test_free_ports_are_drawn_below_the_range_of_outgoing_connections_and_never_twice() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(1024 < p < _ephemeral_low() for p in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))  # free, as said


def test_wait_until_says_whether_the_condition_held() -> None:
    calls = iter([False, False, True])
    assert wait_until(lambda: next(calls), timeout=5, interval=0)
    assert not wait_until(lambda: False, timeout=0, interval=0)
