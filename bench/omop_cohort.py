"""Federated queries on OMOP CDM databases: a count by gender and a Circe cohort over three hospitals' PostgreSQL.

``flip up --demo omop`` in a temporary FLIP home (its own PostgreSQL, OHDSI's Eunomia GiBleed split into Northfield,
Riverside and Westbrook, registered as ``gibleed``), the notebook's plain client, sites warm. Times the first (cold)
and the warm repeats of ``client.query("gibleed", "count", ["gender"])`` and of ``client.cohort("celecoxib",
"gibleed", circe=...)`` (new users of celecoxib, the Eunomia study's target cohort; each site renders the Circe
definition to PostgreSQL SQL and runs it in its database at every request), each from the call to the pooled
answer. Prints the median and the spread, and whether the goal (a warm cohort count over three sites in under 1 s)
holds.

    python -m bench.omop_cohort [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import machine
from flip_core.util import wait_until
from flip_local.eunomia import new_users
from flip_local.federation import down, up
from flip_magics.client import FlipClient

GOAL_SECONDS = 1.0  # the goal: a warm cohort count over three sites
SITES = 3  # Northfield, Riverside, Westbrook


# new users of celecoxib (its first exposure, 365 days observed before it): the tests' CELECOXIB
CELECOXIB_DEFINITION: dict[str, Any] = new_users([(1118084, "celecoxib")])


def answered(call: Callable[[], Any], sites: int) -> Callable[[], Any]:
    """``call``, checked: every site answered (a refusal is not the figure timed here)."""

    def checked() -> Any:
        result = call()
        if result.refused or len([s for s in result.totals if s != "pooled"]) != sites:
            raise RuntimeError(f"not every site answered: refused {result.refused}, totals {result.totals}")
        return result

    return checked


def timed(call: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flip-bench-") as tmp:
        home = Path(tmp)
        started = time.perf_counter()
        connection = up(home, demo="omop")
        ready = time.perf_counter() - started
        try:
            client = FlipClient(connection["coordinator_url"], connection["token"])

            # a quiet federation: the sites have loaded their spare task processes (torch), as a minute after `flip up`
            def warm() -> list[str]:
                return [s["site"] for s in client.sites() if s["warm"]]

            if not wait_until(lambda: len(warm()) == SITES, 180, 0.2):
                raise RuntimeError(f"the sites did not warm up within 180 s (warm: {warm()})")
            sites = SITES
            queries = {
                "count by gender": answered(lambda: client.query("gibleed", "count", ["gender"]), sites),
                "cohort celecoxib (Circe)": answered(
                    lambda: client.cohort("celecoxib", "gibleed", circe=CELECOXIB_DEFINITION), sites
                ),
            }
            print(f"machine: {machine()}")
            print(f"flip up --demo omop: {ready:.1f} s until ready ({sites} sites)")
            medians = {}
            for name, call in queries.items():
                cold = timed(call, 1)[0]
                seconds = timed(call, args.repeats)
                medians[name] = statistics.median(seconds)
                print(
                    f"{name:26s} first {cold * 1000:6.0f} ms  warm median {medians[name] * 1000:6.1f} ms  "
                    f"min {min(seconds) * 1000:6.1f}  max {max(seconds) * 1000:6.1f}  ({args.repeats} repeats, "
                    f"{sites} sites)"
                )
            cohort = medians["cohort celecoxib (Circe)"]
            held = "holds" if cohort < GOAL_SECONDS else "does not hold"
            print(f"goal (a warm cohort count over {sites} sites under {GOAL_SECONDS:.0f} s): {held} ({cohort:.2f} s)")
        finally:
            down(home)


if __name__ == "__main__":
    main()
