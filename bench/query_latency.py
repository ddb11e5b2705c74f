"""Warm round trip of a federated query over the four hospitals: ``count by sex`` and ``stats``.

A local federation (TLS, the four UCI heart-disease sites), the notebook's plain client. The first
query starts the hub's query line (one long-lived Flower run); the figures are the queries after
it: from ``client.query(...)`` to the pooled DataFrame, through the coordinator, the query line,
the SuperLink and every site's disclosure control. Prints the median and the spread, and the
SuperLink's CPU per query (every Flower object is a call of its own: the round trip waits for it).

    python -m bench.query_latency [--repeats 20] [--calls]

``--calls``: the SuperLink logs every API call (DEBUG), and the calls per query are counted by route
(the logging costs the SuperLink some CPU of its own: time the queries without it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import count_calls, cpu_seconds, machine, warm_client
from flip_local.federation import down, status, up


def timed(call: object, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--calls", action="store_true", help="count the SuperLink's API calls per query")
    args = parser.parse_args()
    if args.calls:
        os.environ["FLIP_SUPERLINK_LOG_LEVEL"] = "DEBUG"
    with tempfile.TemporaryDirectory(prefix="flip-bench-") as tmp:
        home = Path(tmp)
        connection = up(home)
        try:
            client = warm_client(connection)
            superlink_process = next(p for p in status(home)["processes"] if p["name"] == "superlink")
            superlink, superlink_log = superlink_process["pid"], Path(superlink_process["log"])
            started = time.perf_counter()
            client.query("heart-disease", "count", ["sex"])
            cold = time.perf_counter() - started
            queries = {
                "count by sex": lambda: client.query("heart-disease", "count", ["sex"]),
                "stats age trestbps chol thalach": lambda: client.query(
                    "heart-disease", "stats", ["age", "trestbps", "chol", "thalach"]
                ),
                "count by sex where age > 50": lambda: client.query("heart-disease", "count", ["sex"], "age > 50"),
            }
            print(f"machine: {machine()}")
            print(f"first query (starts the query line): {cold:.2f} s")
            for name, call in queries.items():
                cpu, offset = cpu_seconds(superlink), superlink_log.stat().st_size
                seconds = timed(call, args.repeats)
                cpu = (cpu_seconds(superlink) - cpu) / args.repeats
                if args.calls:
                    calls, routes = count_calls(superlink_log, offset)
                    top = ", ".join(f"{route} {n / args.repeats:.1f}" for route, n in sorted(routes.items()))
                    print(f"{name}: {calls / args.repeats:.1f} SuperLink calls per query ({top})")
                print(
                    f"{name:34s} median {statistics.median(seconds) * 1000:6.1f} ms  "
                    f"min {min(seconds) * 1000:6.1f}  max {max(seconds) * 1000:6.1f}  "
                    f"SuperLink CPU {cpu * 1000:5.0f} ms/query  ({args.repeats} queries, 4 sites)"
                )
        finally:
            down(home)


if __name__ == "__main__":
    main()
