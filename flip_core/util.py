"""Two small helpers every role's launcher and loop uses: wait for a condition, pick a free port."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

LOWEST_PORT = 20000
_given: set[int] = set()  # ports this process has handed out: not handed out twice


def _ephemeral_low() -> int:
    """Where the kernel's range for outgoing connections' local ports begins (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for a server the caller starts soon.

    It is drawn below the kernel's range for outgoing connections: a port picked there (what binding
    port 0 gives) can be taken, between the pick and the server's bind, as the local port of any
    connection the machine opens meanwhile, and a federation opens many while it starts."""
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(LOWEST_PORT, high) if high > LOWEST_PORT else 0
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            chosen = int(sock.getsockname()[1])
        _given.add(chosen)
        return chosen
    raise OSError(f"no free port found on {host}")


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass; True if it held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


__all__ = ["free_port", "wait_until"]
