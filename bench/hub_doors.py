"""Memory at the hub's doors: the SuperLink's, the fleet front's and the coordinator's resident memory around one
unauthenticated 300 MB fleet POST, and the coordinator's around a 512 MiB upload of junk as a model.

Flower's SuperLink reads a whole body before it checks who sent it; FLIP's fleet front refuses an unauthenticated
call before it reads the body, and the coordinator streams an upload to disk. Run it on the tree to measure (on an
older tree to see what the front did before):

    python -m bench.hub_doors
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from bench.common import machine
from flip_local.federation import down, status, up

BODY = 300_000_000  # bytes of the unauthenticated fleet POST
JUNK = 64  # chunks of 8 MiB uploaded as a model


def kib(pid: int, field: str) -> int:
    """One ``VmRSS``/``VmHWM`` figure of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current RSS


def fleet_post(address: str, ca: str) -> str:
    """Send BODY bytes of zeros as a fleet call with no credential; the answer's first line (or why none came)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca)
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=120), server_hostname=host) as sock:
        head = "POST /v1/fleet/push-messages HTTP/1.1\r\nHost: hub\r\nContent-Type: application/protobuf\r\n"
        sock.sendall((head + f"Content-Length: {BODY}\r\n\r\n").encode())
        chunk, sent = bytes(1 << 20), 0
        try:
            while sent < BODY:
                sock.sendall(chunk[: min(len(chunk), BODY - sent)])
                sent += min(len(chunk), BODY - sent)
        except OSError:
            pass  # the front closed the connection: what it answered is read below
        try:
            answer = sock.recv(200)
        except OSError as exc:
            return f"no answer ({type(exc).__name__}) after {sent} bytes"
    return answer.split(b"\r\n", 1)[0].decode(errors="replace") + f" after {sent} bytes sent"


def junk() -> Iterator[bytes]:
    for _ in range(JUNK):
        yield bytes(8 << 20)


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="flip-bench-doors-"))
    os.environ["FLIP_HOME"] = str(home)
    connection = up(home, sites=1, warm=False)
    try:
        pids = {p["name"]: p["pid"] for p in status(home)["processes"]}
        watched = {
            "superlink": pids["superlink"],
            "fleet front": pids["fleet-front"],
            "coordinator": pids["coordinator"],
        }
        time.sleep(2)  # let the processes settle after start
        for pid in watched.values():
            reset_peak(pid)
        before = {name: kib(pid, "VmRSS") for name, pid in watched.items()}
        print(f"machine: {machine()}")
        print(
            f"unauthenticated {BODY / 1e6:.0f} MB fleet POST: {fleet_post(connection['superlink'], connection['ca'])}"
        )
        time.sleep(2)  # the SuperLink answers a body it read whole only after it parsed it
        for name, pid in watched.items():
            print(
                f"  {name}: resident {before[name] / 1024:.0f} MiB before, peak {kib(pid, 'VmHWM') / 1024:.0f} MiB, "
                f"{kib(pid, 'VmRSS') / 1024:.0f} MiB after"
            )
        coordinator = watched["coordinator"]
        reset_peak(coordinator)
        start = kib(coordinator, "VmRSS")
        answer = requests.post(
            connection["coordinator_url"] + "/api/models",
            data=junk(),
            headers={"Authorization": f"Bearer {connection['token']}"},
            timeout=300,
        )
        print(f"{JUNK * 8} MiB of junk as a model (chunked): {answer.status_code} {answer.text[:80]}")
        print(
            f"  coordinator: resident {start / 1024:.0f} MiB before, peak {kib(coordinator, 'VmHWM') / 1024:.0f} MiB, "
            f"{kib(coordinator, 'VmRSS') / 1024:.0f} MiB after"
        )
    finally:
        down(home)


if __name__ == "__main__":
    main()
