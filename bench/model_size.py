"""Seconds per round and FLIP's overhead for models of about 1M, 25M and 100M parameters.

Each model is a torch MLP over the heart-disease features (13 inputs, two hidden layers of the
same width, chosen so that the parameter count is close to the target, 1 output). ``train()``
takes ONE SGD step on a batch of 8 rows and ``evaluate()`` computes test accuracy, so the sites'
compute stays small and the round is mostly moving the model. Every size runs through the plain
client API (``FlipClient.train``) against one local federation of the four hospital sites
(the federation is model-agnostic, so it is shared by the sizes).

Per size it prints the parameter count, the model's bytes (float32), the median seconds per
round, the median overhead per round (round minus the slowest site's compute in that round),
the floor: nine times the median time to copy the same number of bytes once over a loopback TCP
socket on this machine (measured in the same run, before the federation starts; a round moves the
model nine times through the hub: out once, to four sites, four replies back), overhead / floor,
and the peak resident memory of one site (its agent and task processes) and of the hub (SuperLink,
its ServerApp, coordinator, fleet front), sampled every 50 ms while the size's run lasts.

``--stages`` also prints, per size, where the time went: every process of the federation appends the
wall and CPU seconds of each stage it passes (``flip_core.trace``) and the table sums them per stage.

    python -m bench.model_size [--sizes 1M,25M,100M] [--rounds 3] [--stages] [--front python|nginx]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import HEART_COMMON, default_front, machine, median
from flip_core.errors import NotConnected, Rejected, RunFailed
from flip_core.trace import ENV_STAGE_LOG
from flip_local.federation import Federation, down, up
from flip_magics.client import FlipClient

INPUTS = 13
COPIES = 5  # loopback copies per size (median)
FLOOR_COPIES = 9  # the global model out to the hub's side once, to four sites, four replies back
SAMPLE_SECONDS = 0.05

# The quickstart's preprocessing and evaluate() (bench.common.HEART_COMMON) with an MLP of width __HIDDEN__.
MLP_CODE = (
    HEART_COMMON
    + """
HIDDEN = __HIDDEN__


def build_model():
    return torch.nn.Sequential(
        torch.nn.Linear(13, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, 1),
    )


def train(model, data, config):
    X, y, _ = features(data.train)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    batch = torch.randint(0, len(y), (8,))
    optimizer.zero_grad()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(X[batch]).squeeze(1), y[batch])
    loss.backward()
    optimizer.step()
    return {"loss": float(loss), "num_examples": len(y)}

"""
)


def mlp_params(hidden: int) -> int:
    """Parameters of 13 -> hidden -> hidden -> 1 (weights and biases)."""
    return INPUTS * hidden + hidden + hidden * hidden + hidden + hidden + 1


def hidden_for(target: int) -> int:
    """The width whose parameter count is closest to ``target`` (hidden² + 16·hidden + 1)."""
    guess = max(1, round(math.sqrt(target + 63) - 8))
    return min((w for w in (guess - 1, guess, guess + 1) if w >= 1), key=lambda w: abs(mlp_params(w) - target))


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def loopback_copy_seconds(nbytes: int, repeat: int = COPIES) -> list[float]:
    """Seconds to send ``nbytes`` from a sender thread to a receiver over 127.0.0.1 TCP (a fresh
    connection per copy, the receiver filling a preallocated buffer), ``repeat`` times."""
    payload = bytes(nbytes)
    received = bytearray(nbytes)
    view = memoryview(received)
    times = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def send() -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(payload)

        for _ in range(repeat):
            started = time.perf_counter()
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            conn, _ = server.accept()
            with conn:
                got = 0
                while got < nbytes:
                    n = conn.recv_into(view[got:], min(nbytes - got, 1 << 22))
                    if n == 0:
                        raise RuntimeError(f"the loopback sender closed after {got} of {nbytes} bytes")
                    got += n
            times.append(time.perf_counter() - started)
            sender.join()
    return times


def per_round(events: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(round, round seconds, slowest site's compute in that round), in order.

    A site's compute counts for a round only when its 'done' event precedes that round's 'round'
    event: the final evaluate-only exchange also reports its sites with the last round's number."""
    compute: dict[int, float] = {}
    closed: set[int] = set()
    out = []
    for event in events:
        kind = event.get("type")
        if kind == "site" and event.get("status") == "done" and "seconds" in event:
            r = int(event["round"])
            if r not in closed:
                compute[r] = max(compute.get(r, 0.0), float(event["seconds"]))
        elif kind == "round":
            r = int(event["round"])
            closed.add(r)
            out.append((r, float(event["seconds"]), compute.get(r, 0.0)))
    return out


class MemoryPeaks:
    """Peak resident memory of each site (agent + its children) and of the hub (every other process of the
    federation + children), sampled in a thread while the block runs; and the CPU seconds each process
    group used meanwhile (``cpu``: site agents, task processes, and each hub process with its children)."""

    def __init__(self, home: Path) -> None:
        state = Federation(home).state() or {}
        self.roots = {p["name"]: int(p["pid"]) for p in state.get("processes", [])}
        self.site_peak = 0
        self.hub_peak = 0
        self._stop = threading.Event()
        self.cpu: dict[str, float] = {}
        self._seen: dict[int, tuple[str, float]] = {}  # pid -> (group, cpu seconds when first or last seen)

    @staticmethod
    def _tree_rss(pid: int) -> int:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _group(self, root: str, proc: psutil.Process, is_root: bool) -> str:
        if root.startswith("site-"):
            return "site agents" if is_root else "task processes"
        return root if is_root else f"{root} (children)"

    def _cpu(self, count: bool = True) -> None:
        """Fold in the CPU seconds every process of the federation used since it was last seen (a process
        first seen now counts from its start; ``count=False`` only notes where each one stands)."""
        for name, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                procs = [(root, True)] + [(c, False) for c in root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc, is_root in procs:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    now = times.user + times.system
                    group = self._group(name, proc, is_root)
                    before = self._seen.get(proc.pid, (group, 0.0))[1]
                    self._seen[proc.pid] = (group, now)
                    if count:
                        self.cpu[group] = self.cpu.get(group, 0.0) + max(0.0, now - before)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._cpu()
            sites = [self._tree_rss(pid) for name, pid in self.roots.items() if name.startswith("site-")]
            hub = sum(self._tree_rss(pid) for name, pid in self.roots.items() if not name.startswith("site-"))
            self.site_peak = max(self.site_peak, max(sites, default=0))
            self.hub_peak = max(self.hub_peak, hub)

    def __enter__(self) -> MemoryPeaks:
        self._cpu(count=False)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._cpu()


def run_size(client: FlipClient, target: int, rounds: int, timeout: float) -> dict[str, Any]:
    hidden = hidden_for(target)
    params = mlp_params(hidden)
    result: dict[str, Any] = {"target": target, "hidden": hidden, "params": params, "bytes": params * 4}
    source = MLP_CODE.replace("__HIDDEN__", str(hidden))
    started = time.monotonic()
    try:
        handle = client.train(source, dataset="heart-disease", rounds=rounds, seed=0, name=f"mlp-{hidden}")
        handle.wait(timeout)
    except (RunFailed, Rejected, NotConnected, TimeoutError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    result["wall"] = time.monotonic() - started
    rows = per_round(list(handle.events))
    result["rounds"] = [s for _, s, _ in rows]
    result["compute"] = [c for _, _, c in rows]
    result["overhead"] = [s - c for _, s, c in rows]
    return result


def read_stages(path: Path, offset: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, cpu) seconds of each stage logged after byte ``offset`` (``flip_core.trace``), by stage."""
    stages: dict[str, list[tuple[float, float]]] = {}
    with open(path, "rb") as fh:
        fh.seek(offset)
        for line in fh.read().decode().splitlines():
            name, wall, cpu, _ = line.split("\t")
            stages.setdefault(name, []).append((float(wall), float(cpu)))
    return stages


def print_stages(result: dict[str, Any], rounds: int) -> None:
    print(f"  stages of the {result['params']:,}-parameter run ({rounds} rounds, prepare and final evaluation too):")
    print(f"    {'stage':<28} {'count':>5} {'median wall s':>13} {'total wall s':>12} {'total cpu s':>11}")
    for name, samples in result["stages"].items():
        walls = [w for w, _ in samples]
        cpus = [c for _, c in samples]
        print(f"    {name:<28} {len(samples):>5} {median(walls):>13.3f} {sum(walls):>12.2f} {sum(cpus):>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,25M,100M", help="target parameter counts, e.g. 1M,25M,100M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for one size's run")
    parser.add_argument(
        "--front", choices=["python", "nginx"], default=default_front(), help="the fleet front sites reach"
    )
    parser.add_argument("--stages", action="store_true", help="print the seconds each stage of a step took")
    args = parser.parse_args()
    targets = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

    copies = {t: loopback_copy_seconds(mlp_params(hidden_for(t)) * 4) for t in targets}
    results = []
    with tempfile.TemporaryDirectory(prefix="flip-model-size-") as tmp:
        home = Path(tmp)
        os.environ["FLIP_HOME"] = str(home)
        stage_log = home / "stages.tsv"
        if args.stages:
            os.environ[ENV_STAGE_LOG] = str(stage_log)
        try:
            connection = up(home, front=args.front)
            client = FlipClient(connection["coordinator_url"], connection["token"], timeout=600)
            for target in targets:
                offset = stage_log.stat().st_size if stage_log.exists() else 0
                with MemoryPeaks(home) as peaks:
                    results.append(run_size(client, target, args.rounds, args.timeout))
                results[-1].update(site_peak=peaks.site_peak, hub_peak=peaks.hub_peak, cpu=peaks.cpu)
                if args.stages and stage_log.exists():
                    results[-1]["stages"] = read_stages(stage_log, offset)
        finally:
            down(home)

    print(f"machine: {machine()}; fleet front: {args.front}")
    print(
        f"model: MLP 13 -> h -> h -> 1 over the heart-disease features, 4 sites, {args.rounds} rounds, "
        "one SGD step on 8 rows per round; federation cold start "
        f"{connection['started_seconds']:.1f} s"
    )
    print(
        f"floor: {FLOOR_COPIES} x one copy of the model's float32 bytes over 127.0.0.1 TCP (median of "
        f"{COPIES}); a round moves the model out once, to each of the 4 sites and 4 replies back"
    )
    header = (
        f"{'params':>12} {'hidden':>6} {'MB':>8} {'s/round':>8} {'overhead':>9} {'compute':>8} "
        f"{'floor s':>8} {'overhead/floor':>14} {'site peak MB':>12} {'hub peak MB':>11}"
    )
    print(header)
    for r in results:
        floor = FLOOR_COPIES * median(copies[r["target"]])
        lead = f"{r['params']:>12,} {r['hidden']:>6} {r['bytes'] / 1e6:>8.1f}"
        if "error" in r:
            print(f"{lead}  failed: {r['error']}  (floor {floor:.4f} s)")
            continue
        overhead = median(r["overhead"])
        print(
            f"{lead} {median(r['rounds']):>8.2f} {overhead:>9.2f} {median(r['compute']):>8.2f} "
            f"{floor:>8.3f} {overhead / floor:>14.1f} {r['site_peak'] / 1e6:>12.0f} {r['hub_peak'] / 1e6:>11.0f}"
        )
    for r in results:
        if "cpu" in r and "error" not in r:
            spent = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["cpu"].items(), key=lambda kv: -kv[1]) if v >= 0.05)
            print(f"  CPU seconds during the {r['params']:,}-parameter run ({r['wall']:.1f} s wall): {spent}")
        if "stages" in r:
            print_stages(r, args.rounds)
    for r in results:
        if "error" not in r:
            print(
                f"  {r['params']:,} params: rounds {', '.join(f'{s:.2f}' for s in r['rounds'])} s; "
                f"overhead {', '.join(f'{s:.2f}' for s in r['overhead'])} s; "
                f"loopback {', '.join(f'{s:.4f}' for s in copies[r['target']])} s; "
                f"submit to completed {r['wall']:.1f} s"
            )


if __name__ == "__main__":
    main()
