"""Seconds per round: stock Flower (a plain Flower app run by ``flwr run``) against FLIP's ``%%flip_train``.

Same model (FLamby's logistic regression), same data (the four hospitals' recorded splits),
same machine, one process run after the other in this script. Prints the median seconds per
round of each and their ratio, FLIP's overhead per round (round time minus the slowest site's
compute), SuperLink API calls and SuperLink CPU seconds per round, and the time from the
``%%flip_train`` cell's execution to the first metric in the notebook (a warm federation: the
sites' spare task processes loaded, and a kernel that has imported torch before).

    python -m bench.round_latency [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

from bench.common import HEART_CODE, count_calls, cpu_seconds, machine, median
from bench.stock_flower import run_stock
from flip_core.util import wait_until
from flip_local.federation import down, status, up
from flip_local.sites import prepare_heart_sites
from flip_magics.client import FlipClient
from site_agent.data.catalog import load_site
from site_agent.data.formats import load_split


def site_csvs(root: Path) -> dict[str, tuple[Path, Path]]:
    out = {}
    for site_dir in prepare_heart_sites(root / "splits"):
        train, test = load_split(load_site(site_dir), "heart-disease")
        paths = (root / f"{site_dir.name}-train.csv", root / f"{site_dir.name}-test.csv")
        train.to_csv(paths[0], index=False)
        test.to_csv(paths[1], index=False)
        out[site_dir.name] = paths
    return out


def run_flip(home: Path, rounds: int, secure: bool = True) -> dict[str, Any]:
    os.environ["FLIP_HOME"] = str(home)
    os.environ["FLIP_SUPERLINK_LOG_LEVEL"] = "DEBUG"  # the SuperLink logs every call, as in the stock run
    connection = up(home, secure=secure)
    try:
        # a warm federation: every site's spare task process has loaded torch (as a few seconds after `flip up`)
        client = FlipClient(connection["coordinator_url"], connection["token"])
        warm_wait = time.monotonic()
        if not wait_until(lambda: all(s["warm"] for s in client.sites()), 180, 0.2):
            raise RuntimeError("the sites did not warm up within 180 s")
        warm_seconds = time.monotonic() - warm_wait
        superlink = next(p for p in status(home)["processes"] if p["name"] == "superlink")
        log = Path(superlink["log"])
        nb = nbformat.v4.new_notebook()
        client = NotebookClient(nb, timeout=1800, kernel_name="python3")
        cells = [
            "import json, time, torch\n%load_ext flip_magics\n%flip_connect\n"  # a kernel that has used torch
            "T = {}\nget_ipython().events.register('pre_run_cell', lambda info: T.setdefault("
            "info.raw_cell.split(maxsplit=1)[0] if info.raw_cell.strip() else '', time.time()))",
            f"%%flip_train --dataset heart-disease --rounds {rounds} --seed 0 --out run\n{HEART_CODE}",
            "run.wait()\n"
            "first = min(e['received'] for e in run.events if e['type'] == 'metrics')\n"
            "print(json.dumps({'first_metric': first - T['%%flip_train'], 'events': run.events}))",
        ]
        with client.setup_kernel():
            for i, source in enumerate(cells):
                nb.cells.append(nbformat.v4.new_code_cell(source))
                if i == 1:
                    offset, cpu_before = log.stat().st_size, cpu_seconds(superlink["pid"])
                client.execute_cell(nb.cells[-1], i)
            cpu = cpu_seconds(superlink["pid"]) - cpu_before
        calls, by_route = count_calls(log, offset)
        printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
        result = json.loads(printed.strip().splitlines()[-1])
        events = result["events"]
        round_seconds = {e["round"]: e["seconds"] for e in events if e["type"] == "round"}
        compute: dict[int, float] = {}
        for e in events:
            if e["type"] == "site" and e["status"] == "done" and e["round"] in round_seconds and "seconds" in e:
                compute[e["round"]] = max(compute.get(e["round"], 0.0), e["seconds"])
        return {
            "seconds_per_round": [round_seconds[r] for r in sorted(round_seconds)],
            "overhead_per_round": [round_seconds[r] - compute.get(r, 0.0) for r in sorted(round_seconds)],
            "calls_per_round": calls / rounds,
            "cpu_per_round": cpu / rounds,
            "calls_by_route": by_route,
            "first_metric": result["first_metric"],
            "startup": connection["started_seconds"],
            "warm_after": warm_seconds,
        }
    finally:
        down(home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--flip-only",
        action="store_true",
        help="skip the stock Flower run (to compare two FLIP versions: run this file with each "
        "version's tree first on PYTHONPATH)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="flip up --insecure: no TLS, node keys or fleet front (to measure what they cost)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flip-bench-") as tmp:
        root = Path(tmp)
        (root / "stock").mkdir()
        stock = None if args.flip_only else run_stock(root / "stock", site_csvs(root), args.rounds)
        flip = run_flip(root / "flip-home", args.rounds, secure=not args.insecure)
    flip_s = median(flip["seconds_per_round"])
    print(f"machine: {machine()}")
    print(
        f"transport: {'INSECURE (plain HTTP, no node keys)' if args.insecure else 'TLS, SuperNode auth, fleet front'}"
    )
    print(f"model: FLamby Fed-Heart-Disease logistic regression, 4 sites, {args.rounds} rounds, 100 local steps")
    print(f"flip: {flip_s:.2f} s/round  (rounds: {', '.join(f'{s:.1f}' for s in flip['seconds_per_round'])})")
    if stock is None:
        print(
            f"flip overhead per round (round minus slowest site's compute): {median(flip['overhead_per_round']):.2f} s"
        )
        print(
            f"flip: superlink API calls per round {flip['calls_per_round']:.0f}, "
            f"superlink cpu per round {flip['cpu_per_round']:.2f} s"
        )
        print(f"flip: cell execution to first metric in the notebook: {flip['first_metric']:.2f} s")
        return
    stock_s = median(stock.seconds_per_round)
    print(f"stock flower: {stock_s:.2f} s/round  (rounds: {', '.join(f'{s:.1f}' for s in stock.seconds_per_round)})")
    print(f"ratio stock/flip: {stock_s / flip_s:.2f}")
    print(f"flip overhead per round (round minus slowest site's compute): {median(flip['overhead_per_round']):.2f} s")
    print(f"superlink API calls per round: stock {stock.calls_per_round:.0f}, flip {flip['calls_per_round']:.0f}")
    print(
        f"superlink cpu per round (debug access log on, in both): stock {stock.cpu_per_round:.2f} s, "
        f"flip {flip['cpu_per_round']:.2f} s"
    )
    for label, by_route in (("stock", stock.calls_by_route), ("flip", flip["calls_by_route"])):
        top = sorted(by_route.items(), key=lambda kv: -kv[1])[:6]
        print(f"  {label} calls by route over the run: " + ", ".join(f"{route} {n}" for route, n in top))
    print(f"flip: cell execution to first metric in the notebook: {flip['first_metric']:.2f} s")
    print(
        f"flip: cold `flip up` to four sites ready: {flip['startup']:.1f} s "
        f"(their spare task processes warm {flip['warm_after']:.1f} s later)"
    )


if __name__ == "__main__":
    main()
