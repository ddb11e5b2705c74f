"""A site's task process from nothing to ready (sandboxed, torch loaded): started as a new Python, or forked from
the site's zygote (``site_agent.tasks.zygote``).

Every run takes a task process at each of its sites, and each adoption makes the site ready the next spare, so this
is a cost every run pays at every site: on the run's path where no spare was ready (an imaging run, a cold site), in
the site's CPU otherwise. Prints, for each way, the median seconds from asking to "ready" and the CPU seconds the
task process and its children used to get there (from the kernel's accounting of the cgroup-less process tree, read
in ``/proc``), over ``--count`` processes one after the other; and the zygote's own start, paid once per warm agent.

    python -m bench.task_process_start [--count 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import machine, median
from site_agent.tasks.process import Worker, task_environment
from site_agent.tasks.zygote import Zygote

TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants alive now, their reaped children included."""
    total, queue = 0.0, [pid]
    while queue:
        current = queue.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / TICKS  # utime, stime, cutime, cstime
        queue.extend(map(int, children))
    return total


def one(site: Path, zygote: Zygote | None) -> tuple[float, float]:
    started = time.perf_counter()
    worker = Worker(site, zygote=zygote)
    try:
        worker.wait_ready()
        seconds = time.perf_counter() - started
        return seconds, tree_cpu(worker.process.pid)
    finally:
        worker.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flip-bench-start-") as tmp:
        site = Path(tmp)
        anew = [one(site, None) for _ in range(args.count)]
        began = time.perf_counter()
        zygote = Zygote(site, task_environment())
        assert zygote.wait_ready(), "the zygote did not load"
        zygote_seconds = time.perf_counter() - began
        try:
            forked = [one(site, zygote) for _ in range(args.count)]
        finally:
            zygote.close()
    print(f"machine: {machine()}")
    print(f"task processes, each from nothing to ready (sandboxed, torch loaded), {args.count} one after the other")
    for label, runs in (("started anew", anew), ("forked from the zygote", forked)):
        seconds, cpu = median([s for s, _ in runs]), median([c for _, c in runs])
        print(f"  {label:24s} {seconds:6.3f} s to ready (median), {cpu:6.2f} s CPU")
    print(f"  the zygote itself: {zygote_seconds:.2f} s to load, once per warm site agent")


if __name__ == "__main__":
    main()
