"""What one SuperLink API call costs, and the floor that puts under a round.

Starts an unmodified ``flower-superlink`` (in-memory state, as ``flip up`` runs it), registers
one node through the fleet API exactly as a FLIP site does (``site_agent.fleet.connect``), and
makes the cheapest call there is, ``pull-messages`` with nothing waiting, ``--calls`` times
from one thread. Prints the SuperLink's CPU seconds per call and the round-trip per call.

Then the floor: with Flower 1.42's message format a round with N sites needs at least

    per site   pull-messages 1, pull-object 3 (message, content, record), confirm 1,
               push-messages 1, push-object 3 (the reply's message, content, record)   = 9
    per reply  the server's pull-object 3 and confirm 1                                = 4
    per round  the server's push-messages 1, push-object N + 2 (each site's message
               object, the shared content and record), pull-messages at least 1        = N + 4

calls, every one of them handled by the SuperLink's one process. Calls per round times CPU
per call is the least SuperLink CPU a round can take, whatever the sites and the server do.

    python -m bench.superlink_calls [--calls 2000] [--sites 4]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cpu_seconds, machine
from coordinator.hubside import flower_env
from flip_core.util import free_port, wait_until
from site_agent.fleet import connect


def min_calls_per_round(sites: int) -> int:
    return 9 * sites + 4 * sites + sites + 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--sites", type=int, default=4)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="flip-calls-") as tmp:
        log = Path(tmp) / "superlink.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                    "--database",
                    ":flwr-in-memory:",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=flower_env(Path(tmp) / "flwr"),
            )
        try:

            def listening() -> bool:
                with socket.socket() as sock:
                    return process.poll() is not None or sock.connect_ex(("127.0.0.1", port)) == 0

            if not wait_until(listening, 60, 0.1) or process.poll() is not None:
                raise SystemExit(f"flower-superlink did not start:\n{log.read_text()}")
            with connect(f"127.0.0.1:{port}") as link:
                for _ in range(50):  # warm up: connection, imports, first-call caches
                    link.receive()
                cpu_before, wall_before = cpu_seconds(process.pid), time.perf_counter()
                for _ in range(args.calls):
                    link.receive()
                wall = time.perf_counter() - wall_before
                cpu = cpu_seconds(process.pid) - cpu_before
        finally:
            process.terminate()
            process.wait(timeout=15)
    per_call = cpu / args.calls
    calls = min_calls_per_round(args.sites)
    print(f"machine: {machine()}")
    print(f"superlink: {args.calls} fleet pull-messages calls (nothing waiting), one client thread")
    print(f"superlink cpu per call: {per_call * 1000:.2f} ms; round trip per call: {wall / args.calls * 1000:.2f} ms")
    print(f"least calls per round with {args.sites} sites (Flower 1.42's message format): {calls}")
    print(
        f"least superlink cpu per round: {calls * per_call:.2f} s "
        f"(the SuperLink is one process: a round cannot be shorter on this machine)"
    )


if __name__ == "__main__":
    main()
