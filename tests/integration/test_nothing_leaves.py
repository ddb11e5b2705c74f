"""Nothing private leaves a site: planted tokens, every byte the site sent, and everything the hub kept.

A second site ("Planted") joins a local federation of one hospital (TLS, its own registered key) holding VA's table
plus a column of unique random tokens, and reaches the hub only through a capturing proxy (it decrypts
with a certificate from the consortium's CA and keeps every byte, both ways). Its admin must approve each task's
code. Three runs go through it:
a training run whose cell also prints rows (to the site's log), a failing run whose cell raises with a
row in its message, and a run the site's admin rejects; then federated queries (one counting by the token
column, one isolating a patient), a cohort and a mock; and the researcher asks the site's airlock for the failing
run's traceback, which holds a row. Then neither the bytes the site sent or received, nor the coordinator's
database and model files, nor anything the notebook was shown hold any token (raw or base64-encoded, as a released
item travels), while the site's own log and its airlock do (so the search would have found one); the admin, shown
the token column's values found in the traceback, refuses it. Two more tests go through the airlock: a shape
mismatch's traceback refused, asked again and released (nothing of it at the hub before), and a run's evaluation
report refused at the planted site and released at another.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flip_core.certs import make_server_cert
from flip_core.errors import RunFailed
from flip_core.util import wait_until
from flip_local.sites import DEFAULT_PROJECT
from flip_magics.airlock import EvaluationReport, NotReleased
from flip_magics.client import FlipClient, RunHandle
from site_agent.data.catalog import init_site, write_policy
from site_agent.data.formats import add_dataset, read_table

from helpers import TINY_CELL, local_federation, shared_data

BIN = Path(sys.executable).parent
SITES = 2  # Cleveland, and the planted site
PRINTING_CELL = TINY_CELL.replace(
    "def train(model, data, config):\n",
    "def train(model, data, config):\n    print(data.train.head(20).to_string())\n",
)
RAISING_CELL = TINY_CELL.replace(
    "def train(model, data, config):\n",
    "def train(model, data, config):\n    raise ValueError('first row: ' + str(data.train.iloc[0].to_dict()))\n",
)
SHAPE_CELL = TINY_CELL.replace(  # evaluate() assumes 128 features where the planted site's data has 3
    "    X, y = _xy(data.test)\n",
    "    X, y = _xy(data.test)\n"
    "    if data.site == 'Planted':\n"
    "        X = torch.nn.functional.linear(X, torch.zeros(10, 128))\n",
)


class Capture:
    """A TLS-terminating proxy on a free 127.0.0.1 port in front of the hub's fleet address: it holds a
    certificate from the consortium's CA (as an eavesdropper holding that CA's key would), decrypts, keeps
    every byte passing through both ways, and re-encrypts to the fleet front."""

    def __init__(self, target: tuple[str, int], pki: Path) -> None:
        cert = make_server_cert(pki, "capture", ["127.0.0.1"])
        self.server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_tls.load_cert_chain(cert.cert, cert.key)
        self.client_tls = ssl.create_default_context(cafile=str(cert.ca))
        self.target = target
        self.sent = bytearray()  # from the site, decrypted
        self.received = bytearray()  # to the site, decrypted
        self.lock = threading.Lock()
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._serve, args=(listener, started), daemon=True).start()
        assert started.wait(30), "the capturing proxy did not start"

    def _serve(self, listener: socket.socket, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._relay, sock=listener, ssl=self.server_tls)
        )
        started.set()
        self.loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target, ssl=self.client_tls)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_writer, self.sent), self._pump(up_reader, writer, self.received))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray) -> None:
        try:
            while chunk := await src.read(1 << 16):
                with self.lock:
                    record.extend(chunk)
                dst.write(chunk)
                await dst.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            dst.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("flip-planted")
    capture: Capture | None = None
    agent = None
    with local_federation(home, warm=False, sites=SITES - 1) as connection:
        try:
            table = read_table(shared_data() / "heart-disease" / "processed.va.data", "uci-heart")
            tokens = [f"tok{secrets.token_hex(8)}" for _ in range(len(table))]
            table["token"] = tokens
            csv = home / "planted.csv"
            table.to_csv(csv, index=False)
            site_dir = home / "planted-site"
            site = add_dataset(init_site(site_dir, "Planted"), "heart-disease", csv, "csv")
            write_policy(
                site,
                {
                    "projects": {
                        DEFAULT_PROJECT: {
                            "approved": True,
                            "researchers": ["*"],
                            "datasets": ["*"],
                            "tasks": ["train", "query"],
                            "auto_approve": False,
                        }
                    }
                },
            )
            front_host, front_port = connection["superlink"].rsplit(":", 1)
            capture = Capture((front_host, int(front_port)), Path(connection["federation"]) / "pki")
            # the planted site joins as any hospital does, but its one address is the capturing proxy
            env = {**os.environ, "FLIP_HOME": str(home)}
            flip_site("keygen", site_dir)
            said = subprocess.run(
                [BIN / "flip", "site", "register", "Planted", site_dir / "keys" / "Planted.pub"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
            token = said.split("send it to the site with the CA certificate): ")[1].split()[0]
            flip_site(
                "join", site_dir, "--fleet", f"127.0.0.1:{capture.port}", "--ca", connection["ca"], f"--token={token}"
            )
            agent = subprocess.Popen(
                [BIN / "flip-site", "start", site_dir],
                env=env,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            client = FlipClient(connection["coordinator_url"], connection["token"])

            def online() -> bool:
                return any(s["site"] == "Planted" and s["status"] == "online" for s in client.sites())

            assert wait_until(online, 120, 0.1), "the planted site did not come online"
            yield {
                "client": client,
                "tokens": tokens,
                "site_dir": site_dir,
                "capture": capture,
                "federation": Path(connection["federation"]),
            }
        finally:
            if agent is not None:
                os.killpg(agent.pid, signal.SIGTERM)
                agent.wait(timeout=30)
            if capture is not None:
                capture.close()


def holds(blob: bytes, needle: bytes) -> bool:
    """``needle`` in ``blob`` as it is, or base64-encoded at any of the three alignments (a released item travels
    as base64: a search for the raw bytes alone would miss it)."""
    forms = [needle]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + needle)
        start = (offset * 4 + 2) // 3  # characters that depend on the bytes before it
        end = len(encoded) - (4 if (offset + len(needle)) % 3 else 0)  # and those that depend on what follows
        forms.append(encoded[start:end])
    return any(form in blob for form in forms)


def flip_site(*args: Any) -> str:
    done = subprocess.run([BIN / "flip-site", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def answer_when_asked(handle: RunHandle, site_dir: Path, *answer: str) -> None:
    def asked() -> bool:
        return any(e.get("site") == "Planted" and e.get("status") == "waiting-approval" for e in list(handle.events))

    assert wait_until(asked, 120, 0.05), list(handle.events)
    code_hash = flip_site("requests", site_dir).split()[0]
    flip_site(answer[0], site_dir, code_hash, *answer[1:])


def queries_at_the_planted_site(client: FlipClient) -> list[str]:
    """Federated queries, a cohort and a mock at the planted site: what the notebook is shown of them."""
    va = read_table(shared_data() / "heart-disease" / "processed.va.data", "uci-heart")
    one = va.iloc[3]
    isolating = f"age = {one.age:g} and trestbps = {one.trestbps:g} and thalach = {one.thalach:g}"
    ask = {"sites": ["Planted"]}
    results = [
        client.query("heart-disease", "count", ["token"], **ask),  # a level per patient: refused
        client.query("heart-disease", "stats", ["token"], **ask),  # text: refused
        client.query("heart-disease", "count", ["sex"], isolating, **ask),  # one patient: withheld
        client.query("heart-disease", "crosstab", ["sex", "cp"], **ask),
        client.query("heart-disease", "missing", **ask),
        client.cohort("planted-over50", "heart-disease", "age > 50", **ask),
    ]
    assert "distinct values" in results[0].refused["Planted"] and "Planted" in results[1].refused
    assert results[2].totals["Planted"] is None and abs(results[3].totals["Planted"] - len(va)) <= 2  # its noise
    mock = client.mock("heart-disease", **ask)["Planted"]
    assert mock["token"].isna().all()  # no token reaches its threshold of rows: none is in the mock
    return [repr(r.raw) for r in results] + [mock.to_csv()]


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
    # the researcher asks for the failed step's traceback (which holds a row): it is held at the site, unreviewed
    asked = client.request_release(
        "traceback", "Planted", "to see which value made train() fail at Planted", run=failing.run_id
    )
    assert asked.state == "pending", asked
    with pytest.raises(NotReleased, match="pending"):
        client.released(asked.request_id)
    seen += [repr(asked), repr(client.requests())]

    rejected = client.train(
        TINY_CELL + "\n# v3\n", dataset="heart-disease", rounds=1, min_sites=SITES, seed=0, name="reject"
    )
    answer_when_asked(rejected, site_dir, "reject", "--reason", "not this one")
    with pytest.raises(RunFailed) as refused:
        rejected.wait(180)
    assert "Planted: refused by the site" in str(refused.value)
    seen += [str(refused.value), repr(rejected.events), repr(client.run(rejected.run_id)), repr(client.sites())]

    seen += queries_at_the_planted_site(client)

    tokens = [t.encode() for t in planted["tokens"]]
    capture = planted["capture"]
    with capture.lock:
        sent, received = bytes(capture.sent), bytes(capture.received)
    assert b"/v1/fleet/push-messages" in sent and b"/site/announce" in sent  # the capture saw the site, decrypted
    assert len(sent) > 10_000
    stored = b"".join(p.read_bytes() for p in (planted["federation"] / "coordinator").rglob("*") if p.is_file())
    assert len(stored) > 10_000
    shown = "\n".join(seen).encode()
    for where, blob in (
        ("sent by the site", sent),
        ("received by the site", received),
        ("stored by the coordinator", stored),
        ("shown in the notebook", shown),
    ):
        leaked = [t for t in tokens if holds(blob, t)]
        assert not leaked, f"{len(leaked)} planted token(s) {where}"
    site_log = b"".join(p.read_bytes() for p in (site_dir / "logs").glob("run-*.log"))
    assert sum(t in site_log for t in tokens) >= 20  # the printed rows stayed in the site's own log
    held = (site_dir / "airlock" / "requests" / f"{asked.request_id}.item").read_bytes()
    assert any(t in held for t in tokens)  # the held traceback had a token: the search would have found it

    # the admin sees it with its checks (the token column's values are found in it) and refuses it
    review = flip_site("airlock", "show", site_dir, asked.request_id)
    assert "FAIL  identifiers" in review and "token" in review, review
    flip_site("airlock", "refuse", site_dir, asked.request_id, "--reason", "it holds a patient's values")
    told = {r.request_id: r for r in client.requests()}[asked.request_id]
    assert (told.state, told.reason) == ("refused", "it holds a patient's values")


def test_a_failed_steps_traceback_leaves_only_once_the_site_releases_it(planted: dict[str, Any]) -> None:
    """A cell fails on a shape mismatch; its traceback is asked for, refused once (the reason reaches the notebook),
    asked again and released: the notebook gets exactly the bytes the admin saw, signed, and the audit log holds
    each request and decision."""
    client, site_dir = planted["client"], planted["site_dir"]
    failing = client.train(SHAPE_CELL, dataset="heart-disease", rounds=1, min_sites=SITES, seed=0, name="shape")
    answer_when_asked(failing, site_dir, "approve")
    with pytest.raises(RunFailed, match=r"Planted: RuntimeError at cell line \d+ in evaluate\(\)"):
        failing.wait(180)
    purpose = "to see why evaluate() fails at Planted"
    first = client.request_release("traceback", "Planted", purpose, run=failing.run_id)
    flip_site("airlock", "refuse", site_dir, first.request_id, "--reason", "say which layer you are debugging")
    refused = {r.request_id: r for r in client.requests()}[first.request_id]
    assert (refused.state, refused.reason) == ("refused", "say which layer you are debugging")

    second = client.request_release(
        "traceback", "Planted", purpose + ": the first linear layer's input", run=failing.run_id
    )
    assert "Planted" in flip_site("airlock", "list", site_dir) and second.request_id in flip_site(
        "airlock", "list", site_dir
    )
    exact = subprocess.run(
        [BIN / "flip-site", "airlock", "show", site_dir, second.request_id, "--raw"], capture_output=True, check=True
    ).stdout
    assert b"mat1 and mat2 shapes cannot be multiplied" in exact
    with planted["capture"].lock:  # before the release: nothing of it reached the hub, or anything it stores
        sent = bytes(planted["capture"].sent)
    stored = b"".join(p.read_bytes() for p in (planted["federation"] / "coordinator").rglob("*") if p.is_file())
    assert not holds(sent, b"mat1 and mat2") and not holds(stored, b"mat1 and mat2")
    flip_site("airlock", "release", site_dir, second.request_id, "--as", "dr-checker")
    item = client.released(second.request_id)
    assert item.content == exact and item.value == exact.decode()
    with planted["capture"].lock:
        assert holds(bytes(planted["capture"].sent), b"mat1 and mat2")  # the search would have found it: now it has
    assert (item.release.checker, item.release.site, item.release.purpose) == ("dr-checker", "Planted", second.purpose)

    records = [json.loads(line) for line in (site_dir / "audit" / "audit.jsonl").read_text().splitlines()]
    airlock = [
        (r["kind"], r.get("request"), r.get("decision", r.get("state")))
        for r in records
        if r["kind"].startswith("airlock")
    ]
    assert ("airlock-request", first.request_id, "pending") in airlock
    assert ("airlock-decision", first.request_id, "refused") in airlock
    assert ("airlock-decision", second.request_id, "released") in airlock
    assert any(kind == "airlock-delivered" and rid == second.request_id for kind, rid, _ in airlock)
    assert "intact" in flip_site("audit", "verify", site_dir)


REPORT_CELL = (
    TINY_CELL
    + """
import pandas as pd
from matplotlib.figure import Figure

def report(model, data, config):
    X, y = _xy(data.test)
    with torch.no_grad():
        p = torch.sigmoid(model(X).squeeze(1))
    pred = (p > 0.5).float()
    confusion = [[int(((pred == a) & (y == b)).sum()) for b in (0.0, 1.0)] for a in (0.0, 1.0)]
    figure = Figure(figsize=(3, 3))
    figure.subplots().plot(sorted(p.tolist()), label="calibration")
    out = {"accuracy": float((pred == y).float().mean()), "confusion": confusion, "calibration": figure}
    if "token" in data.test:  # a hostile line: a patient's token as a table's label
        out["first"] = pd.DataFrame({"n": [1]}, index=[data.test["token"].iloc[0]])
    return out
"""
)


def test_a_runs_evaluation_report_is_held_checked_and_leaves_only_where_released(planted: dict[str, Any]) -> None:
    """A cell's report() of its final evaluation (numbers, a confusion matrix, a figure) is kept at each site; the
    admin who sees a patient's token in it (the identifiers check finds it) refuses it, another site releases its
    own, and the notebook gets that one, signed, as an EvaluationReport."""
    client, site_dir = planted["client"], planted["site_dir"]
    run = client.train(REPORT_CELL, dataset="heart-disease", rounds=1, min_sites=SITES, seed=0, name="report")
    answer_when_asked(run, site_dir, "approve")
    run.wait(180)
    assert run.status == "completed", run.reason
    purpose = "the confusion matrix and calibration figure for our paper"
    hostile = client.request_release("evaluation", "Planted", purpose, run=run.run_id)
    review = flip_site("airlock", "show", site_dir, hostile.request_id)
    assert "FAIL  identifiers" in review and "FAIL  figures" in review, review
    flip_site("airlock", "refuse", site_dir, hostile.request_id, "--reason", "it names a patient")

    cleveland = planted["federation"] / "sites" / "Cleveland"
    honest = client.request_release("evaluation", "Cleveland", purpose, run=run.run_id)
    figures = planted["federation"] / "figures"
    shown = flip_site("airlock", "show", cleveland, honest.request_id, "--out", figures)
    assert '"accuracy"' in shown and "<PNG," in shown and list(figures.glob("*.png"))
    flip_site("airlock", "release", cleveland, honest.request_id)
    report = client.released(honest.request_id).value
    assert isinstance(report, EvaluationReport) and 0 <= report.metrics["accuracy"] <= 1
    assert report.tables["confusion"].shape == (2, 2) and report.figures["calibration"].startswith(b"\x89PNG")
    with planted["capture"].lock:
        sent = bytes(planted["capture"].sent)
    assert not [t for t in planted["tokens"] if holds(sent, t.encode())]  # the refused report never left Planted
