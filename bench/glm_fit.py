"""A GLM fitted across the four hospitals, warm: from ``client.glm(...)`` to the coefficients.

A local federation (TLS, the four UCI heart-disease sites), the notebook's plain client, the sites warm. The hub
drives IRLS over the query line: a levels stage, then one query per iteration to every site. Times the first fit
(it starts the query line) and warm repeats of two models every site answers (Poisson: disease severity on age and
ST depression, over all four; linear: ST depression on age and disease severity: the same rows, as the sites'
ledgers ask of two fits), with the iterations counted and
the time per iteration (one round trip to the four sites). Prints whether the goal (a fit over four sites in under
2 s warm) holds.

    python -m bench.glm_fit [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine, warm_client
from flip_local.federation import down, up

GOAL_SECONDS = 2.0  # the goal: a fit over four sites, warm
MODELS = {
    "poisson num ~ age + oldpeak": ("num ~ age + oldpeak", "poisson"),
    "gaussian oldpeak ~ age + num": ("oldpeak ~ age + num", "gaussian"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flip-bench-") as tmp:
        home = Path(tmp)
        connection = up(home)
        try:
            client = warm_client(connection)
            started = time.perf_counter()
            client.glm("num ~ age + oldpeak", "heart-disease", "poisson")
            print(f"machine: {machine()}")
            print(f"first fit (starts the query line): {time.perf_counter() - started:.2f} s")
            for name, (formula, family) in MODELS.items():
                seconds, steps, iterations = [], [], set()
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    result = client.glm(formula, "heart-disease", family)
                    seconds.append(time.perf_counter() - started)
                    if result.refused or len(result.sites) != 4:
                        raise RuntimeError(f"not every site answered: {result.refused}")
                    iterations.add(result.iterations)
                    steps += result.raw["seconds"]["steps"]
                median = statistics.median(seconds)
                print(
                    f"{name:34s} median {median:5.2f} s  min {min(seconds):5.2f}  max {max(seconds):5.2f}  "
                    f"iterations {'/'.join(str(i) for i in sorted(iterations))}  "
                    f"per iteration {statistics.median(steps) * 1000:5.0f} ms  "
                    f"goal < {GOAL_SECONDS:g} s: {'met' if median < GOAL_SECONDS else 'NOT met'}  "
                    f"({args.repeats} fits, 4 sites)"
                )
        finally:
            down(home)


if __name__ == "__main__":
    main()
