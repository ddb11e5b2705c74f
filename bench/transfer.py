"""Where one large message's time goes: each stage of moving a model's step between the hub and a site.

Starts a local federation of one site (TLS, the fleet front, the site's own token), encodes one training
step for an MLP of ``--size`` parameters and times, median of ``--repeat``:

- encode (the step as a frame: JSON header and ``.npz``), SHA-256, decode;
- Flower's object path as the message would take it without the bulk path (the record, its object tree
  and ids, every chunk deflated), before a single HTTP call;
- the bulk path's HTTP legs: the round loop publishing to the coordinator (loopback), a site fetching
  through the fleet front (TLS), a site uploading through the front, the round loop taking a reply;
- the site agent's hand-off to its task process and back (a pipe, as ``site_agent.tasks.service`` does);
- one loopback TCP copy of the same bytes, the floor's unit.

    python -m bench.transfer [--size 25M] [--repeat 3] [--front python|nginx]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import default_front, machine, median
from bench.model_size import hidden_for, loopback_copy_seconds, mlp_params, parse_size
from flip_core.bulk import BulkClient, digest
from flip_core.protocol import StepRequest, decode_request, encode_request
from flip_core.status import Phase
from flip_local.federation import Federation, down, up


def step(params: dict[str, np.ndarray]) -> StepRequest:
    return StepRequest("r1", "x = 1\n", "sha256:0", "heart-disease", "default", "bench", 0, 1, Phase.FIT, {}, params)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return median(times), out


def _echo(conn: Connection) -> None:
    while blob := conn.recv_bytes():
        conn.send_bytes(blob)


def flower_objects(blob: bytes) -> int:
    """What Flower's object path does to a payload before any call: record, object tree, ids, deflated chunks."""
    from flwr.app import Array, ArrayRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    content = RecordDict({"flip": ArrayRecord({"step": Array(np.frombuffer(blob, dtype=np.uint8))})})
    objects = get_all_nested_objects(content)
    return sum(len(obj.deflate()) for obj in objects.values())


def site_token(home: Path) -> tuple[str, str]:
    """(name, token) of the federation's first site, from the command line ``flip up`` started it with."""
    state = Federation(home).state() or {}
    agent = next(p for p in state.get("processes", []) if p["name"].startswith("site-"))
    return agent["name"][len("site-") :], next(a for a in agent["command"] if a.startswith("--token="))[
        len("--token=") :
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="25M", help="parameters of the model (e.g. 25M, 100M)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--front", choices=["python", "nginx"], default=default_front(), help="the fleet front sites reach"
    )
    args = parser.parse_args()
    hidden = hidden_for(parse_size(args.size))
    rng = np.random.default_rng(0)
    params = {
        "0.weight": rng.standard_normal((hidden, 13), dtype=np.float32),
        "2.weight": rng.standard_normal((hidden, hidden), dtype=np.float32),
        "4.weight": rng.standard_normal((1, hidden), dtype=np.float32),
    }
    rows: list[tuple[str, float]] = []
    encode, blob = timed(lambda: encode_request(step(params)), args.repeat)
    size = len(blob)
    sha = hashlib.sha256(blob).hexdigest()
    rows.append(("encode the step (frame: header + .npz)", encode))
    rows.append(("SHA-256 of the payload", timed(lambda: digest(blob), args.repeat)[0]))
    rows.append(("decode the step", timed(lambda: decode_request(blob), args.repeat)[0]))
    rows.append(("Flower's objects for it, before any call (old path)", timed(lambda: flower_objects(blob), 1)[0]))
    parent, child = multiprocessing.Pipe()
    echo = multiprocessing.get_context("fork").Process(target=_echo, args=(child,), daemon=True)
    echo.start()

    def hand_off() -> bytes:
        parent.send_bytes(blob)
        return parent.recv_bytes()

    rows.append(("agent -> task process -> agent (pipe, both ways)", timed(hand_off, args.repeat)[0]))
    parent.send_bytes(b"")
    rows.append(("one loopback TCP copy (the floor's unit)", median(loopback_copy_seconds(size, args.repeat))))

    with tempfile.TemporaryDirectory(prefix="flip-transfer-") as tmp:
        home = Path(tmp)
        os.environ["FLIP_HOME"] = str(home)
        try:
            connection = up(home, sites=1, warm=False, front=args.front)
            federation = Path(connection["federation"])
            config = json.loads((federation / "coordinator.json").read_text())
            hub = BulkClient(connection["coordinator_url"], config["internal_token"])
            name, token = site_token(home)
            publish, take = f"/internal/blobs/{sha}?readers={name}", f"/internal/blobs/{name}/{sha}"
            site = BulkClient(f"https://{connection['superlink']}", token, connection["ca"])
            legs: list[tuple[str, Callable[[], Any]]] = [
                ("publish: round loop -> coordinator (loopback HTTP)", lambda: hub.put(publish, blob)),
                ("fetch: coordinator -> fleet front (TLS) -> site", lambda: site.get(f"/site/blobs/{sha}", size)),
                ("upload: site -> fleet front (TLS) -> coordinator", lambda: site.put(f"/site/blobs/{sha}", blob)),
                (
                    "take: coordinator -> round loop (loopback HTTP)",
                    lambda: hub.get(take, size),
                ),
            ]
            rows += [(what, timed(leg, args.repeat)[0]) for what, leg in legs]
        finally:
            down(home)

    print(f"machine: {machine()}; fleet front: {args.front}")
    print(
        f"one training step of an MLP of {mlp_params(hidden):,} parameters: {size / 1e6:.1f} MB, "
        f"median of {args.repeat}"
    )
    for what, seconds in rows:
        print(f"  {what:<58} {seconds:8.3f} s  {size / seconds / 1e6:8.0f} MB/s")


if __name__ == "__main__":
    main()
