"""Scale: cold start, idle site agent memory and seconds per round with 4, 16 and 48 sites.

For each site count N, ``flip up`` starts N site agents on this machine (sites beyond the four
hospitals are numbered copies of them: ``Cleveland-2`` …). Once every site is online and the
federation has settled, it measures the resident memory (RSS) of each site agent process alone
and of its whole process tree (the agent and every process it started, recursively), then
runs a few rounds of the quickstart's logistic regression (``bench.common.HEART_CODE``) with
``min_sites`` = N through the plain client API, and stops the federation. RSS counts shared
pages (the Python interpreter, torch) in every process, so a tree's RSS overstates what one
more site costs the machine.

    python -m bench.scale [--sites 4,16,48] [--rounds 3] [--settle 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import HEART_CODE, machine, median
from flip_core.errors import NotConnected, Rejected, RunFailed
from flip_core.util import wait_until
from flip_local.federation import FederationError, down, status, up
from flip_magics.client import FlipClient

MB = 2**20


def _label(proc: psutil.Process) -> str:
    """A short name for a process: its script or binary, not the interpreter."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return "?"
    if not cmdline:
        return proc.name()
    first = os.path.basename(cmdline[0])
    if first.startswith("python") and len(cmdline) > 1:
        rest = cmdline[2] if cmdline[1] == "-m" and len(cmdline) > 2 else cmdline[1]
        return os.path.basename(rest)
    return first


def agent_memory(home: Path) -> list[dict[str, Any]]:
    """RSS of every site agent alone and with its process tree, from ``status(home)``'s processes."""
    rows = []
    for entry in status(home)["processes"]:
        if not entry["name"].startswith("site-"):
            continue
        agent = psutil.Process(entry["pid"])
        own = agent.memory_info().rss
        parts = [(_label(agent), own)]
        for child in agent.children(recursive=True):
            try:
                parts.append((_label(child), child.memory_info().rss))
            except psutil.NoSuchProcess:
                continue
        rows.append(
            {"site": entry["name"][len("site-") :], "agent": own, "tree": sum(r for _, r in parts), "parts": parts}
        )
    return rows


def wait_idle(home: Path, sites: int, timeout: float = 120.0) -> None:
    """Until ``sites`` sites are online (``up`` waits for that already; this checks it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = [s for s in status(home)["sites"] if s["status"] == "online"]
        if len(online) >= sites:
            return
        time.sleep(0.5)
    raise RuntimeError(f"only {len(online)} of {sites} sites came online in {timeout:.0f} s")


def run_count(count: int, rounds: int, settle: float, timeout: float, warm: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"flip-scale-{count}-") as tmp:
        home = Path(tmp)
        os.environ["FLIP_HOME"] = str(home)
        result: dict[str, Any] = {"sites": count}
        try:
            try:
                connection = up(home, sites=count, warm=warm)
            except FederationError as exc:
                result["error"] = f"flip up failed: {str(exc).splitlines()[0]}"
                return result
            result["startup"] = float(connection["started_seconds"])
            wait_idle(home, count)
            client = FlipClient(connection["coordinator_url"], connection["token"])
            if warm and not wait_until(lambda: all(s["warm"] for s in client.sites()), 600, 0.5):
                raise RuntimeError("the sites' spare task processes did not load within 600 s")
            time.sleep(settle)
            result["idle"] = agent_memory(home)
            try:
                handle = client.train(
                    HEART_CODE, dataset="heart-disease", rounds=rounds, min_sites=count, seed=0, name=f"scale-{count}"
                )
                handle.wait(timeout)
            except (RunFailed, Rejected, NotConnected, TimeoutError) as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"
                return result
            result["rounds"] = [float(e["seconds"]) for e in list(handle.events) if e.get("type") == "round"]
            time.sleep(settle)
            result["after"] = agent_memory(home)
        finally:
            down(home)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="4,16,48", help="site counts, e.g. 4,16,48")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds to wait after every site is online (and after the run) before measuring memory",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for one run")
    parser.add_argument(
        "--warm",
        action="store_true",
        help="sites keep a spare task process (flip up's default); without it the agents are cold",
    )
    args = parser.parse_args()
    counts = [int(s) for s in args.sites.split(",") if s.strip()]
    results = [run_count(n, args.rounds, args.settle, args.timeout, args.warm) for n in counts]

    print(f"machine: {machine()}")
    warmth = (
        "warm sites (a spare task process each)" if args.warm else "cold sites (flip up --cold: no spare task process)"
    )
    print(
        f"model: FLamby Fed-Heart-Disease logistic regression, min_sites = sites, {args.rounds} rounds, "
        f"100 local steps; memory measured {args.settle:.0f} s after every site is online; {warmth}"
    )
    print(
        f"{'sites':>5} {'startup s':>9} {'agent RSS MB med/max':>21} {'tree RSS MB med/max':>20} "
        f"{'all trees MB':>12} {'s/round':>8} {'tree after run MB med':>21}"
    )
    for r in results:
        if "idle" not in r:
            print(f"{r['sites']:>5}  failed: {r['error']}")
            continue
        agent = [row["agent"] / MB for row in r["idle"]]
        tree = [row["tree"] / MB for row in r["idle"]]
        line = (
            f"{r['sites']:>5} {r['startup']:>9.1f} {f'{median(agent):.0f}/{max(agent):.0f}':>21} "
            f"{f'{median(tree):.0f}/{max(tree):.0f}':>20} {sum(tree):>12.0f}"
        )
        if "error" in r:
            print(f"{line}  run failed: {r['error']}")
            continue
        after = median([row["tree"] / MB for row in r["after"]])
        print(f"{line} {median(r['rounds']):>8.2f} {after:>21.0f}")
    for r in results:
        if not r.get("idle"):
            continue
        sample = r["idle"][0]
        parts = ", ".join(f"{name} {rss / MB:.0f}" for name, rss in sample["parts"])
        rounds = ", ".join(f"{s:.2f}" for s in r.get("rounds", []))
        print(f"  {r['sites']} sites: idle tree of site {sample['site']} (MB): {parts}; rounds: {rounds or '-'} s")


if __name__ == "__main__":
    main()
