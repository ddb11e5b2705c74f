"""The site's ledger of released sets (``site_agent.queries.ledger``): seconds to check one new set against a ledger
of N released sets (pairs, sums and differences of two, and the peeling past three), over a table of R rows.

Released sets of random sizes (10 to 40% of the rows) and random rows: the worst case for the size windows, which
a real ledger's sets (cohorts and their cells, many of one size) rarely reach.

    python -m bench.ledger_check [--rows 5000] [--sets 200 1000 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench.common import machine
from site_agent.queries.ledger import Check, row_set

KEY = b"bench" * 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--sets", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--checks", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, args.rows, dtype=np.uint64)

    def random_set(text: str) -> object:
        size = int(rng.integers(10, max(11, int(0.4 * args.rows))))
        return row_set(keys, rng.choice(args.rows, size, replace=False), KEY, text)

    print(f"machine: {machine()}")
    for count in args.sets:
        released = [random_set(f"s{i}") for i in range(count)]
        started = time.perf_counter()
        check = Check(released, threshold=10)
        built = time.perf_counter() - started
        seconds = []
        for _ in range(args.checks):
            new = random_set("new")
            started = time.perf_counter()
            check.why(new)
            seconds.append(time.perf_counter() - started)
        print(
            f"{count:6d} released sets over {args.rows} rows: {statistics.median(seconds) * 1000:7.1f} ms per new set "
            f"(median of {args.checks}), {built * 1000:.1f} ms to load the ledger"
        )


if __name__ == "__main__":
    main()
