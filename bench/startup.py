"""Cold start: ``flip up`` with four hospital sites until every site is online and registered.

python -m bench.startup [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import machine, median
from flip_local.federation import down, up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--insecure", action="store_true", help="flip up --insecure (no TLS, keys or fleet front)")
    args = parser.parse_args()
    seconds = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="flip-startup-") as tmp:
            home = Path(tmp)
            os.environ["FLIP_HOME"] = str(home)
            started = time.monotonic()
            up(home, secure=not args.insecure)
            seconds.append(time.monotonic() - started)
            down(home)
    print(f"machine: {machine()}")
    print(
        f"cold flip up, four sites ready: median {median(seconds):.1f} s "
        f"(runs: {', '.join(f'{s:.1f}' for s in seconds)})"
    )


if __name__ == "__main__":
    main()
