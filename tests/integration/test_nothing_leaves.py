"""Nothing private leaves a site: planted tokens, every byte the site sent, and everything the hub kept.

A fifth site ("Planted") joins the local federation holding VA's table plus a column of unique random
tokens, and reaches the SuperLink and the coordinator only through capturing proxies (TCP forwarders
that keep every byte, both ways). Its admin must approve each task's code. Three runs go through it:
a training run whose cell also prints rows (to the site's log), a failing run whose cell raises with a
row in its message, and a run the site's admin rejects. Then neither the bytes the site sent or
received, nor the coordinator's database and model files, nor anything the notebook was shown hold any
token, while the site's own log does (so the search would have found one).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.federation import DEFAULT_PROJECT
from coordinator.local import wait_until
from flip_magics.client import FlipClient, RunHandle
from flip_magics.errors import RunFailed
from helpers import TINY_CELL, local_federation, shared_data
from site_agent.catalog import add_dataset, init_site, read_table, write_policy

BIN = Path(sys.executable).parent
SITES = 5
PRINTING_CELL = TINY_CELL.replace(
    "def train(model, data, config):\n",
    "def train(model, data, config):\n    print(data.train.head(20).to_string())\n",
)
RAISING_CELL = TINY_CELL.replace(
    "def train(model, data, config):\n",
    "def train(model, data, config):\n    raise ValueError('first row: ' + str(data.train.iloc[0].to_dict()))\n",
)


class Capture:
    """A TCP forwarder on a free 127.0.0.1 port that keeps every byte passing through, both ways."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()  # from the site
        self.received = bytearray()  # to the site
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, self.sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.received), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while chunk := src.recv(1 << 16):
                with self.lock:
                    record.extend(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("flip-planted")
    captures: list[Capture] = []
    agent = None
    # --insecure, so that the capturing proxies read every byte in the clear: TLS changes how the site's
    # bytes are wrapped on the wire, not what they are (tests/integration/test_transport.py covers TLS)
    with local_federation(home, warm=False, secure=False) as connection:
        try:
            table = read_table(shared_data() / "heart-disease" / "processed.va.data", "uci-heart")
            tokens = [f"tok{secrets.token_hex(8)}" for _ in range(len(table))]
            table["token"] = tokens
            csv = home / "planted.csv"
            table.to_csv(csv, index=False)
            site_dir = home / "planted-site"
            site = add_dataset(init_site(site_dir, "Planted"), "heart-disease", csv, "csv")
            write_policy(site, {"projects": {DEFAULT_PROJECT: {"approved": True, "researchers": ["*"],
                                                               "datasets": ["*"], "auto_approve": False}}})
            link_host, link_port = connection["superlink"].rsplit(":", 1)
            hub_port = int(connection["coordinator_url"].rsplit(":", 1)[1])
            fleet, hub = Capture((link_host, int(link_port))), Capture(("127.0.0.1", hub_port))
            captures = [fleet, hub]
            agent = subprocess.Popen(
                [BIN / "flip-site", "start", site_dir, "--insecure", "--superlink", f"127.0.0.1:{fleet.port}",
                 "--coordinator", f"http://127.0.0.1:{hub.port}", f"--token={connection['site_token']}"],
                env={**os.environ, "FLIP_HOME": str(home)}, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            client = FlipClient(connection["coordinator_url"], connection["token"])
            online = lambda: any(s["site"] == "Planted" and s["status"] == "online"  # noqa: E731
                                 for s in client.sites())
            assert wait_until(online, 120, 0.1), "the planted site did not come online"
            yield {"client": client, "tokens": tokens, "site_dir": site_dir, "captures": captures,
                   "federation": Path(connection["federation"])}
        finally:
            if agent is not None:
                os.killpg(agent.pid, signal.SIGTERM)
                agent.wait(timeout=30)
            for capture in captures:
                capture.close()


def flip_site(*args: Any) -> str:
    done = subprocess.run([BIN / "flip-site", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def answer_when_asked(handle: RunHandle, site_dir: Path, *answer: str) -> None:
    asked = lambda: any(e.get("site") == "Planted" and e.get("status") == "waiting-approval"  # noqa: E731
                        for e in list(handle.events))
    assert wait_until(asked, 120, 0.05), list(handle.events)
    code_hash = flip_site("requests", site_dir).split()[0]
    flip_site(answer[0], site_dir, code_hash, *answer[1:])


def test_no_planted_token_leaves_the_site(planted: dict[str, Any]) -> None:
    client, site_dir = planted["client"], planted["site_dir"]
    seen: list[str] = []  # everything the notebook was shown

    trained = client.train(PRINTING_CELL, dataset="heart-disease", rounds=2, min_sites=SITES, seed=0, name="train")
    answer_when_asked(trained, site_dir, "approve")
    trained.wait(180)
    assert trained.status == "completed", trained.reason
    seen += [repr(trained.events), repr(client.run(trained.run_id)), repr(client.model_params(trained.run_id))]

    failing = client.train(RAISING_CELL, dataset="heart-disease", rounds=1, min_sites=SITES, seed=0, name="fail")
    answer_when_asked(failing, site_dir, "approve")
    with pytest.raises(RunFailed) as failed:
        failing.wait(180)
    assert "Planted: ValueError at cell line" in str(failed.value)
    seen += [str(failed.value), repr(failing.events), repr(client.run(failing.run_id))]

    rejected = client.train(TINY_CELL + "\n# v3\n", dataset="heart-disease", rounds=1, min_sites=SITES, seed=0,
                            name="reject")
    answer_when_asked(rejected, site_dir, "reject", "--reason", "not this one")
    with pytest.raises(RunFailed) as refused:
        rejected.wait(180)
    assert "Planted: refused by the site" in str(refused.value)
    seen += [str(refused.value), repr(rejected.events), repr(client.run(rejected.run_id)), repr(client.sites())]

    tokens = [t.encode() for t in planted["tokens"]]
    fleet, hub = planted["captures"]
    assert b"/v1/fleet/push-messages" in fleet.sent and b"/site/announce" in hub.sent  # the capture saw the site
    assert len(fleet.sent) > 10_000
    stored = b"".join(p.read_bytes() for p in (planted["federation"] / "coordinator").rglob("*") if p.is_file())
    assert len(stored) > 10_000
    shown = "\n".join(seen).encode()
    for where, blob in (("sent to the SuperLink", fleet.sent), ("received from the SuperLink", fleet.received),
                        ("sent to the coordinator", hub.sent), ("received from the coordinator", hub.received),
                        ("stored by the coordinator", stored), ("shown in the notebook", shown)):
        leaked = [t for t in tokens if t in blob]
        assert not leaked, f"{len(leaked)} planted token(s) {where}"
    site_log = b"".join(p.read_bytes() for p in (site_dir / "logs").glob("run-*.log"))
    assert sum(t in site_log for t in tokens) >= 20  # the printed rows stayed in the site's own log
