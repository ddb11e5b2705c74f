"""Spawn to first metric through a real JupyterHub: a researcher's server starts, a FLIP kernel starts
on it, the cell is submitted, and the first aggregated metric reaches that kernel.

    python -m bench.hub_spawn [--repeat 3]

``flip hub``'s local profile (hub, proxy, the coordinator as its service, four hospital sites, warm), then
per repeat: alice's server from stopped to ready (the hub's progress stream), a "FLIP (Python 3)" kernel,
``%flip_connect`` with her hub token, a ``%%flip_train`` of the small test model for 2 rounds, and the
time at which the kernel's run handle holds its first metric event. Every step goes through the hub's
proxy as JupyterLab's would. The server is stopped between repeats.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from pathlib import Path

from bench.common import REPO, machine, median
from bench.hubuser import HubUser
from flip_local.federation import HubOptions, down, up

CELL = (REPO / "tests" / "helpers.py").read_text().split('TINY_CELL = """')[1].split('"""')[0]
WAIT_FIRST_METRIC = """
import time
while not any(e["type"] == "metrics" for e in result.events):
    if result.status in ("failed", "stopped"):
        raise RuntimeError(result.status)
    time.sleep(0.02)
print(repr(time.time()))
"""


def one(user: HubUser) -> dict[str, float]:
    t0 = time.time()
    user.start_server()
    ready = time.time()
    kernel = user.kernel("flip")
    try:
        started = time.time()
        connected = kernel.execute("%flip_connect")
        assert connected.status == "ok", connected.text
        submitted = time.time()
        train = kernel.execute(
            "%%flip_train --dataset heart-disease --rounds 2 --name spawn-bench --out result\n" + CELL
        )
        assert train.status == "ok", train.text
        first = kernel.execute(WAIT_FIRST_METRIC, timeout=300)
        assert first.status == "ok", first.text
        metric = float(first.stdout.strip())
        kernel.execute("result.wait()", timeout=300)
    finally:
        kernel.close()
        user.stop_server()
    return {
        "server ready": ready - t0,
        "kernel started": started - ready,
        "%flip_connect": submitted - started,
        "submit to first metric": metric - submitted,
        "spawn to first metric": metric - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flip-hub-bench-") as tmp:
        home = Path(tmp)
        os.environ["FLIP_HOME"] = str(home)
        started = time.monotonic()
        connection = up(home, hub=HubOptions(password=secrets.token_urlsafe(8)))
        hub_up = time.monotonic() - started
        try:
            user = HubUser(connection["hub"]["url"], "alice", connection["hub"]["password"])
            runs = [one(user) for _ in range(args.repeat)]
        finally:
            down(home)
    print(f"machine: {machine()}")
    print(f"flip hub (hub, proxy, coordinator service, four warm sites) up in {hub_up:.1f} s")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"{key:>24}: median {median(values):.1f} s (runs: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
