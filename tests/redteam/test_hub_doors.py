"""Attacks on the hub's doors: its fleet front (the sites' one address, on the open network) and the coordinator's
API, as an outsider with no credential, an insider site, or a researcher of another project would try them.

Each attack asserts what it was after did not happen: the SuperLink and the coordinator did not take the bytes into
memory (their peak resident memory, read from ``/proc``), a slow client did not keep its connection while others
were served, a hostile upload was a 4xx sentence and stored nothing, another project's run and datasets could not be
told from ones that do not exist. The hub still serves the federation after them (a run, to its end).
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import socket
import ssl
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.testclient import TestClient

from coordinator.config import CoordinatorConfig, add_token
from flip_core.certs import SITE_KEYS, load_site_keys
from flip_core.codec import pack_arrays
from flip_local.federation import status

from fakes import FakeControl
from helpers import TINY_CELL, coordinator_config, model_bytes
from kit import SITES, RedTeam, still_serves, still_trains

pytestmark = pytest.mark.integration

MiB = 1 << 20


# -- what the attacks share ------------------------------------------------------------------------------------


def pid_of(team: RedTeam, name: str) -> int:
    [pid] = [p["pid"] for p in status(team.home)["processes"] if p["name"] == name]
    return int(pid)


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


class Peak:
    """How far a process's resident memory rose above where it stood, from now on (the kernel's high-water mark,
    reset here: ``/proc/PID/clear_refs``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        self.start = _kib(pid, "VmRSS")

    def rise_mib(self) -> float:
        return (_kib(self.pid, "VmHWM") - self.start) / 1024


def signed(key: ec.EllipticCurvePrivateKey) -> list[tuple[bytes, bytes]]:
    """Credential headers signed with ``key``, as Flower's SuperNode signs each fleet call."""
    stamp = datetime.datetime.now(datetime.UTC).isoformat()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signature = key.sign(stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return [
        (b"flwr-public-key", base64.b64encode(pem)),
        (b"flwr-timestamp", stamp.encode()),
        (b"flwr-signature", base64.b64encode(signature)),
    ]


def site_key(team: RedTeam) -> ec.EllipticCurvePrivateKey:
    """A registered site's own key (an insider: a hospital's host turned hostile)."""
    private, _ = load_site_keys(team.sites_dir / SITES[0] / SITE_KEYS / f"{SITES[0]}.key")
    return private


def head(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: hub", *(k + b": " + v for k, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def front(team: RedTeam) -> ssl.SSLSocket:
    host, port = team.connection["superlink"].rsplit(":", 1)
    context = ssl.create_default_context(cafile=team.connection["ca"])
    raw = socket.create_connection((host, int(port)), timeout=30)
    return context.wrap_socket(raw, server_hostname=host)


def coordinator(team: RedTeam) -> socket.socket:
    host, port = team.connection["coordinator_url"].removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the answer on ``sock``, read until the server closes it."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    status_line, _, rest = data.partition(b"\r\n\r\n")
    return int(status_line.split(b" ", 2)[1]), rest


def pour(sock: socket.socket, total: int) -> int:
    """Send up to ``total`` zero bytes; how many the server took before it closed the connection."""
    chunk, sent = bytes(MiB), 0
    try:
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
        pass
    return sent


def other_project(team: RedTeam) -> dict[str, str]:
    """A researcher of a second project, with a headless token of its own (``flip token add``)."""
    token = add_token(Path(team.connection["federation"]) / "coordinator.json", "mallory", "elsewhere")
    return {"Authorization": f"Bearer {token}"}


def api(team: RedTeam, method: str, path: str, headers: dict[str, str], **kwargs: Any) -> requests.Response:
    return requests.request(method, team.connection["coordinator_url"] + path, headers=headers, timeout=60, **kwargs)


# -- the fleet front ---------------------------------------------------------------------------------------------


def test_an_unauthenticated_oversize_fleet_post_is_refused_before_the_superlink_grows(redteam: RedTeam) -> None:
    superlink, front_process = Peak(pid_of(redteam, "superlink")), Peak(pid_of(redteam, "fleet-front"))
    forged = signed(ec.generate_private_key(ec.SECP384R1()))  # a well-signed key of the attacker's own
    said = []
    for credential in ([], [(b"flwr-public-key", b"AAAA"), (b"flwr-signature", b"AAAA")], forged):
        with front(redteam) as sock:
            sock.sendall(head("POST", "/v1/fleet/push-messages", [*credential, (b"Content-Length", b"300000000")]))
            status, body = answer(sock)  # the refusal comes before a byte of the body was sent
            said.append(body.decode())
            assert status == 401, body
            pour(sock, 300_000_000)  # the body anyway, as the attack sent it: nowhere to go
    assert "not a registered site's" in said[-1]
    assert superlink.rise_mib() < 32, superlink.rise_mib()  # was +585 MB for one 300 MB body
    assert front_process.rise_mib() < 32, front_process.rise_mib()


def test_a_registered_sites_oversize_fleet_body_is_capped_at_the_front(redteam: RedTeam) -> None:
    superlink = Peak(pid_of(redteam, "superlink"))
    key = site_key(redteam)
    with front(redteam) as sock:  # declared
        sock.sendall(head("POST", "/v1/fleet/push-object", [*signed(key), (b"Content-Length", b"300000000")]))
        status, body = answer(sock)
        assert status == 413 and b"at most" in body
    with front(redteam) as sock:  # undeclared (chunked): read up to the limit, then refused, nothing forwarded
        sock.sendall(head("POST", "/v1/fleet/push-object", [*signed(key), (b"Transfer-Encoding", b"chunked")]))
        chunk = b"%x\r\n%s\r\n" % (MiB, bytes(MiB))
        try:
            for _ in range(6):  # past the 4 MiB a fleet body may be
                sock.sendall(chunk)
        except OSError:
            pass
        status, _ = answer(sock)
        assert status == 413
    assert superlink.rise_mib() < 32, superlink.rise_mib()


def _slow_loris(open_connection: Callable[[], socket.socket], served: Callable[[], bool]) -> tuple[int, int, bool]:
    """Send a request head one byte every 0.2 s (a head of 300 bytes would take a minute), checking that another
    client is ``served`` after each byte; (bytes sent before the server let go, of how many, all served)."""
    data = b"GET /health HTTP/1.1\r\nHost: hub\r\nX-Slow: " + b"a" * 260 + b"\r\n\r\n"
    ok = True
    with open_connection() as sock:
        for sent, byte in enumerate(data):
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return sent, len(data), ok
            ok = ok and served()
            time.sleep(0.2)  # the attacker's pace
    return len(data), len(data), ok


def test_a_slow_loris_is_dropped_by_the_front_and_the_coordinator_while_others_are_served(redteam: RedTeam) -> None:
    ca, base = redteam.connection["ca"], f"https://{redteam.connection['superlink']}"
    results: dict[str, tuple[int, int, bool]] = {}

    def front_served() -> bool:
        return requests.get(base + "/health", verify=ca, timeout=10).text == "ok"

    def coordinator_served() -> bool:
        return api(redteam, "GET", "/api/health", {}).status_code == 200

    attack = threading.Thread(target=lambda: results.update(front=_slow_loris(lambda: front(redteam), front_served)))
    attack.start()
    results["coordinator"] = _slow_loris(lambda: coordinator(redteam), coordinator_served)
    attack.join(120)
    for name, (sent, total, served) in results.items():
        assert sent < total, f"the {name} waited for the whole slow head"
        assert served, f"the {name} did not serve others meanwhile"


# -- uploads -----------------------------------------------------------------------------------------------------


def test_a_model_upload_larger_than_the_cap_is_refused_and_never_held_in_memory(redteam: RedTeam) -> None:
    token = {"Authorization": f"Bearer {redteam.connection['token']}"}
    hub = Peak(pid_of(redteam, "coordinator"))
    with coordinator(redteam) as sock:  # over the cap by its length: refused before it is read
        credential = [(b"Authorization", token["Authorization"].encode()), (b"Content-Length", str(5 << 30).encode())]
        sock.sendall(head("POST", "/api/models", credential))
        status, body = answer(sock)
        assert status == 413 and "more than the" in json.loads(body)["error"]

    def junk() -> Iterator[bytes]:  # 512 MiB without a length, not a model: streamed to disk, then refused
        for _ in range(64):
            yield bytes(8 * MiB)

    refused = api(redteam, "POST", "/api/models", token, data=junk())
    assert refused.status_code == 400 and "not a model" in refused.json()["error"]
    assert hub.rise_mib() < 64, hub.rise_mib()  # the body went to disk in pieces, never whole into memory


def _npy(header: str, data: bytes = bytes(8)) -> bytes:
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


def _zip(name: str, data: bytes, method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def _bomb() -> bytes:
    """Two deflated members of a few bytes whose records say each unpacks to 3.75 GiB (what a reader would allocate)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in ("a.npy", "b.npy"):
            archive.writestr(name, bytes(1000))
    bomb, at = bytearray(buffer.getvalue()), 0
    while (at := bomb.find(b"PK\x01\x02", at)) >= 0:
        bomb[at + 24 : at + 28] = (0xF0000000).to_bytes(4, "little")  # its uncompressed size
        at += 4
    return bytes(bomb)


def _crafted() -> dict[str, bytes]:
    good = pack_arrays({"w": np.zeros(4, np.float32)})
    central = good.rindex(b"PK\x01\x02")
    encrypted = bytearray(good)
    encrypted[central + 8] |= 1
    deflated = bytearray(_zip("w.npy", _npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }"), 8))
    at = deflated.index(b"w.npy") + 5
    deflated[at : at + 16] = bytes(b ^ 0xFF for b in deflated[at : at + 16])
    shape = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s,), }"
    return {
        "wrong magic": b"MZ" + good[2:],
        "truncated": good[: len(good) // 2],
        "encrypted": bytes(encrypted),
        "bzip2": _zip("w.npy", _npy(shape % 1), zipfile.ZIP_BZIP2),
        "garbled deflate": bytes(deflated),
        "pickled objects": _zip("w.npy", _npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }")),
        "strings": _zip("w.npy", _npy("{'descr': '<U8', 'fortran_order': False, 'shape': (1,), }")),
        "huge declared shape": _zip("w.npy", _npy(shape % f"{2**62}, {2**62}")),
        "code in the header": _zip("w.npy", _npy("__import__('os').system('touch /tmp/pwned')")),
        "nested archive": _zip("w.npy", good),
        "a shape its bytes do not fill": _zip("w.npy", _npy(shape % (2 << 30), bytes(8 << 20)), zipfile.ZIP_DEFLATED),
        "zip bomb": _bomb(),
    }


def test_crafted_npz_uploads_are_answered_with_a_sentence_and_nothing_is_stored(redteam: RedTeam) -> None:
    token = {"Authorization": f"Bearer {redteam.connection['token']}"}
    config = CoordinatorConfig.load(Path(redteam.connection["federation"]) / "coordinator.json")
    models = config.state_dir / "models"
    before = sorted(models.iterdir())
    for name, blob in _crafted().items():
        response = api(redteam, "POST", "/api/models", token, data=blob)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:200])
        sentence = response.json()["error"]
        assert "model" in sentence and "Traceback" not in sentence, (name, sentence)
    assert sorted(models.iterdir()) == before
    assert not Path("/tmp/pwned").exists()


# -- another project -------------------------------------------------------------------------------------------


def test_a_run_id_of_another_project_is_answered_as_an_unknown_one(redteam: RedTeam) -> None:
    outcome = redteam.train(TINY_CELL, "doors-theirs")
    assert outcome.handle is not None and outcome.status == "completed", outcome.said
    run_id, mallory = outcome.handle.run_id, other_project(redteam)
    unknown = "0" * len(run_id)
    for method, route in [
        ("GET", "/api/runs/{}"),
        ("GET", "/api/runs/{}/events?stream=0"),
        ("GET", "/api/runs/{}/events"),
        ("GET", "/api/runs/{}/model"),
        ("POST", "/api/runs/{}/stop"),
    ]:
        theirs = api(redteam, method, route.format(run_id), mallory)
        none = api(redteam, method, route.format(unknown), mallory)
        assert (theirs.status_code, none.status_code) == (404, 404), route
        assert theirs.json()["error"].replace(run_id, unknown) == none.json()["error"], route
    assert run_id not in {r["run_id"] for r in api(redteam, "GET", "/api/runs", mallory).json()}
    assert outcome.client.run(run_id)["status"] == "completed"  # and the stop did nothing to it
    still_serves(redteam)


def test_a_second_projects_researcher_sees_none_of_the_first_projects_datasets(redteam: RedTeam) -> None:
    mallory = other_project(redteam)
    sites = api(redteam, "GET", "/api/sites", mallory).json()
    assert {s["site"] for s in sites} == set(SITES)
    assert [d for s in sites for d in s["datasets"]] == []
    check = api(redteam, "POST", "/api/runs/check", mallory, json={"source": "x = 1", "dataset": "heart-disease"})
    query = api(redteam, "POST", "/api/queries", mallory, json={"dataset": "heart-disease", "kind": "count"})
    for refused in (check, query):
        assert refused.status_code == 404
        assert refused.json()["error"].startswith("unknown dataset 'heart-disease': the datasets that exist are none")
    ours = redteam.client().sites()  # the first project still sees its own, without the list of who else may
    assert all("heart-disease" in {d["name"] for d in s["datasets"]} for s in ours)
    assert all("projects" not in d for s in ours for d in s["datasets"])


# the hub's disk, attacked through the coordinator's real app and store (a quota small enough to reach in a test)
TOKEN, OTHER = "researcher-token", "other-project-token"
MODEL = model_bytes()


def hub_app(state: Path, **config: Any) -> TestClient:
    from coordinator.app import Notifier, build_app
    from coordinator.config import TokenGrant
    from coordinator.service import RunManager
    from coordinator.store import Store

    tokens = {TOKEN: TokenGrant("alice", "heart"), OTHER: TokenGrant("bob", "lungs")}
    manager = RunManager(Store(state), FakeControl(), lambda: None, presence_grace=0)
    return TestClient(build_app(coordinator_config(state, tokens=tokens, **config), manager, Notifier()))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_researcher_cannot_fill_the_hubs_disk_with_uploads(tmp_path: Path) -> None:
    # the attack: upload model after model (each under the largest model) until the hub's disk is full
    models = [model_bytes(seed) for seed in range(4)]  # four different models of one size
    size = len(models[0])
    client = hub_app(tmp_path, upload_quota_bytes=2 * size + size // 2)
    kept = [client.post("/api/models", headers=auth(TOKEN), content=m) for m in (models[0], models[0], models[1])]
    assert [r.status_code for r in kept] == [201, 201, 201]  # the same model again takes no more room: not counted
    declared = client.post("/api/models", headers=auth(TOKEN), content=models[2])
    streamed = client.post("/api/models", headers=auth(TOKEN), content=iter([models[2][:10], models[2][10:]]))
    assert declared.status_code == streamed.status_code == 413
    left = 2 * size + size // 2 - 2 * size
    sentence = f"the model passes what is left of your upload quota ({left} of {2 * size + size // 2} bytes a day)"
    assert sentence in declared.json()["error"] and sentence in streamed.json()["error"]
    assert len(list((tmp_path / "models").iterdir())) == 2  # the two models; nothing partial left
    assert client.post("/api/models", headers=auth(OTHER), content=models[3]).status_code == 201  # another's quota


def test_a_researchers_second_upload_while_the_first_arrives_is_refused(tmp_path: Path) -> None:
    from coordinator import web

    client = hub_app(tmp_path)
    web._uploading.add("heart/alice")  # as while alice's first upload is still arriving
    try:
        second = client.post("/api/models", headers=auth(TOKEN), content=MODEL)
        assert second.status_code == 429 and "one model upload at a time" in second.json()["error"]
        assert client.post("/api/models", headers=auth(OTHER), content=MODEL).status_code == 201  # bob's is his own
    finally:
        web._uploading.discard("heart/alice")
    assert client.post("/api/models", headers=auth(TOKEN), content=MODEL).status_code == 201


def test_after_these_attacks_every_site_still_trains(redteam) -> None:
    still_trains(redteam)
