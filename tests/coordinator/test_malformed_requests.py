"""Every body the coordinator accepts is parsed into a typed request first: a table of malformed
bodies, posted to each route of the real application (its real run service and store; only Flower's
control API is a fake), each answered with a 4xx and a sentence naming what is wrong, and nothing
stored. A generated round of arbitrary JSON values for every field checks the same (never a 500).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from coordinator.app import Notifier, build_app
from coordinator.config import TokenGrant
from coordinator.service import RunManager
from coordinator.store import Store
from flip_core.api import MAX_JSON_BYTES, MAX_SOURCE_CHARS

from fakes import FakeControl
from helpers import HEART, coordinator_config, model_bytes

RESEARCHER, SITE, INTERNAL = "researcher-token", "site-token", "internal-token"
MODEL_LIMIT = 1 << 16


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, RunManager, str, str]]:
    """The app with one online site holding heart-disease, an uploaded model and one run."""
    root = tmp_path_factory.mktemp("coordinator")
    config = coordinator_config(
        root,
        internal_token=INTERNAL,
        site_token=SITE,
        tokens={RESEARCHER: TokenGrant("alice", "heart")},
        max_model_bytes=MODEL_LIMIT,
    )
    notifier = Notifier()
    manager = RunManager(Store(root), FakeControl(), notifier.notify, presence_grace=0)
    manager.announce("VA", 1, {"version": "0.1.0", "datasets": [HEART]}, "online")
    manager.presence.hold("VA")
    with TestClient(build_app(config, manager, notifier)) as client:
        sha = client.post("/api/models", headers=auth(RESEARCHER), content=model_bytes()).json()["sha256"]
        run = client.post(
            "/api/runs",
            headers=auth(RESEARCHER),
            json={"source": "x = 1", "dataset": "heart-disease", "initial_model": sha},
        )
        assert run.status_code == 201, run.text
        yield client, manager, sha, run.json()["run_id"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def zipped(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


# -- the table --------------------------------------------------------------------------------------
TASK = {"source": "x = 1", "dataset": "heart-disease"}  # a task the check route accepts
BAD_TASK_FIELDS: dict[str, list[Any]] = {
    "source": [1, None, [], {}, True, "", "   \n", "x" * (MAX_SOURCE_CHARS + 1)],
    "dataset": [1, None, [], {}, True, "", "d" * 201],
    "rounds": ["3", 1.5, True, None, [], {}, 0, -1, 10**6, 2**70],
    "strategy": [1, None, [], "", "s" * 41, "fedsgd"],
    "min_sites": ["2", 1.5, True, [], 0, -3, 10**9],
    "seed": ["1", 1.5, True, None, [], -1, 2**64],
    "name": [1, [], {}, True, "n" * 201],
    "config": [
        [],
        "a=b",
        1,
        True,
        {"a": [1]},
        {"a": {"b": 1}},
        {"a": None},
        {"dp_epsilon": 1},
        {"": 1},
        {"k" * 101: 1},
        {f"k{i}": 1 for i in range(201)},
        {"server_lr": "fast"},
        {"a": "v" * 10_001},
    ],
    "round_timeout": ["1", True, [], 0, -1, 10**9],
    "dp_epsilon": ["1", True, [], 0, -1, 1000],
    "dp_clip": ["1", True, [], -1, 0],
    "initial_model": [1, True, [], "abc", "Z" * 64, "a" * 63],
    "client_packages": [[], "x", {"torch": 1}, {"": "1"}],
    "cohort": [1, True, [], "", "a b", "none-such"],
    "metrics": [1, "loss", {}, [1], ["val-loss"], ["_x"], ["m" * 33], ["loss", "loss"], [f"m{i}" for i in range(21)]],
    "surplus": [1, "rounds"],  # a field the task does not have
}
FLAGS = {
    "min_sites": "--min-sites",
    "round_timeout": "--round-timeout",
    "dp_epsilon": "--dp-",
    "dp_clip": "--dp-clip",
    "rounds": "--rounds",
    "seed": "--seed",
    "config": "--config",
    "strategy": "strategy",
    "source": "source",
    "metrics": "metrics",
}
BAD_BODIES = [b"", b"   ", b"{", b"[]", b"null", b"1", b'"task"', b"\xff\xfe\x00", b"NaN", b'{"source": "x",}']

ANNOUNCE = {"site": "VA", "node_id": 1, "info": {"version": "0.1.0", "datasets": [HEART]}}
BAD_ANNOUNCE_FIELDS: dict[str, list[Any]] = {
    "site": [1, None, [], "", "a b", "x" * 65, "../VA"],
    "node_id": ["1", 1.5, True, -1, 2**65],
    "info": [
        [],
        "x",
        1,
        {"datasets": "x"},
        {"datasets": [1]},
        {"datasets": [{"name": 1}]},
        {"datasets": [{"name": "d", "rows": -1}]},
        {"datasets": [{"name": "d", "rows": "300"}]},
        {"datasets": [{"name": "d", "extra": 1}]},
        {"datasets": [{"name": "d", "projects": "heart"}]},
        {"datasets": [{"name": "d", "projects": [1]}]},
        {"datasets": [{"name": "d", "projects": [""]}]},
        {"datasets": [{"name": "d", "projects": ["p"] * 1001}]},
        {"warm": "yes"},
        {"version": 1},
        {"surplus": 1},
    ],
    "state": ["gone", 1, None],
    "surplus": [1],
}

EVENT = {"type": "metrics", "round": 1, "site": "global", "phase": "train", "metrics": {"loss": 0.5}}
BAD_EVENTS: list[Any] = [
    {},
    EVENT,
    "x",
    [1],
    [None],
    [{"type": "nope"}],
    [{"round": 1}],
    [{"type": "site"}],
    [{**EVENT, "round": "1"}],
    [{**EVENT, "round": -1}],
    [{**EVENT, "metrics": {"loss": "low"}}],
    [{**EVENT, "metrics": [0.5]}],
    [{**EVENT, "phase": "testing"}],
    [{**EVENT, "site": "a b"}],
    [{**EVENT, "surplus": 1}],
    [{"type": "run", "status": "done"}],
    [{"type": "run", "status": "completed", "model_sha256": "abc"}],
    [{"type": "site", "site": "VA", "status": "training", "round": 1, "samples": -5}],
    [{"type": "round", "round": 1, "sites": 1, "seconds": "fast"}],
    [EVENT] * 10_001,
]
BAD_RINGS: list[Any] = [{}, [], {"sites": "VA"}, {"sites": [1]}, {"sites": ["a b"]}, {"sites": ["VA"], "x": 1}]


def npy_member(header: str, data: bytes = b"\0" * 8) -> bytes:
    """An .npy of format 1.0 with this header text (numpy's dict literal, or anything else) and these bytes."""
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


def compressed(method: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        archive.writestr("w.npy", npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }"))
    return buffer.getvalue()


def flipped(blob: bytes, at: int, mask: int) -> bytes:
    data = bytearray(blob)
    data[at] |= mask
    return bytes(data)


def garbled(blob: bytes) -> bytes:
    """The archive with its member's compressed bytes turned to garbage (its records intact)."""
    data = bytearray(blob)
    start = data.index(b"w.npy") + len(b"w.npy")
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    return bytes(data)


def bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(
            "w.npy", npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (1000000,), }", bytes(8_000_000))
        )
    return buffer.getvalue()


STORED = npz(w=np.zeros(4))
CENTRAL = STORED.rindex(b"PK\x01\x02")

BAD_MODELS = {
    "empty": b"",
    "wrong magic": b"PK\x05\x07" + STORED[4:],
    "encrypted": flipped(STORED, CENTRAL + 8, 1),
    "bzip2": compressed(zipfile.ZIP_BZIP2),
    "lzma": compressed(zipfile.ZIP_LZMA),
    "garbled deflate": garbled(compressed(zipfile.ZIP_DEFLATED)),
    "zip bomb": bomb(),
    "huge shape": zipped(
        "w.npy",
        npy_member("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4611686018427387904), }"),
    ),
    "negative shape": zipped("w.npy", npy_member("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }")),
    "code in header": zipped("w.npy", npy_member("__import__('os').system('true')")),
    "object dtype": zipped("w.npy", npy_member("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }")),
    "record dtype": zipped("w.npy", npy_member("{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,), }")),
    "datetimes": zipped("w.npy", npy_member("{'descr': '<M8[s]', 'fortran_order': False, 'shape': (1,), }")),
    "format 9": zipped("w.npy", b"\x93NUMPY\x09\x00" + b"\0" * 64),
    "nested archive": zipped("w.npy", npz(w=np.zeros(2))),
    "outside path": zipped("../w.npy", npy_member("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }")),
    "end record only": STORED[-22:],
    "text": b"weights",
    "pickle": b"\x80\x04K\x01.",
    "npy": np.lib.format.magic(1, 0) + b"{}",
    "zip of text": zipped("notes.txt", b"hello"),
    "zip of junk arrays": zipped("w.npy", b"\x93NUMPY junk"),
    "strings": npz(w=np.array(["a", "b"])),
    "objects": npz(w=np.array([{"a": 1}], dtype=object)),
    "truncated": npz(w=np.zeros(100))[:-40],
    "no arrays": npz(),
    "too big": npz(w=np.zeros(MODEL_LIMIT // 8 + 10)),
}


def task_cases() -> Iterator[Any]:
    for field, values in BAD_TASK_FIELDS.items():
        for i, value in enumerate(values):
            body = {**TASK, field: value}
            if field == "dp_clip":
                body["dp_epsilon"] = 1.0
            yield pytest.param(field, json.dumps(body).encode(), id=f"{field}-{i}")
    for i, raw in enumerate(BAD_BODIES):
        yield pytest.param("", raw, id=f"body-{i}")
    yield pytest.param("", b'{"source": "' + b"x" * MAX_JSON_BYTES + b'"}', id="body-oversized")


def assert_sentence(response: Any, *names: str) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    message = response.json()["error"]
    assert isinstance(message, str) and len(message.split()) >= 3, message
    assert not message.lstrip().startswith("Traceback"), message
    if names:
        assert any(name in message for name in names), (names, message)
    return str(message)


@pytest.mark.parametrize("route", ["/api/runs/check", "/api/runs"])
@pytest.mark.parametrize(("field", "body"), list(task_cases()))
def test_a_malformed_task_is_refused_with_a_sentence_naming_the_field(
    coordinator: tuple[TestClient, RunManager, str, str],
    route: str,
    field: str,
    body: bytes,
) -> None:
    client, manager, _, _ = coordinator
    before = len(manager.store.runs())
    response = client.post(route, headers={**auth(RESEARCHER), "Content-Type": "application/json"}, content=body)
    names = (field, FLAGS.get(field, field)) if field else ("the task",)
    assert_sentence(response, *names)
    assert len(manager.store.runs()) == before  # nothing was created


QUERY = {"dataset": "heart-disease", "kind": "count"}  # the announced HEART has no columns: any column is unknown
BAD_QUERY_FIELDS: dict[str, list[Any]] = {
    "dataset": [1, None, [], "", "d" * 201, "heart"],
    "kind": [1, None, "mean", "COUNT", []],
    "columns": ["sex", [1], [""], ["c"] * 21, ["age"], ["sex", "sex"]],
    "where": [1, [], "x" * 4001, "age > ", "lower(age) > 1", "t.age > 1", "__class__ = 1", "(select 1) = 1", "a=1"],
    "bins": ["10", 0, 101, 1.5, True, None],
    "range": [[1], [2, 1], "1 2", [1, "2"], [None, 1], [1, 2, 3]],
    "sites": [[], "VA", ["a b"], ["Nowhere"], [1]],
    "threshold": [0, -1, "10", 10**7, True, 1.5],
    "text": [1, "t" * 4001],
    "surplus": [1],
}


def query_cases() -> Iterator[Any]:
    for field, values in BAD_QUERY_FIELDS.items():
        for i, value in enumerate(values):
            body = {**QUERY, field: value}
            if field == "range":
                body.update(kind="hist", columns=["age"])
            yield pytest.param(field, json.dumps(body).encode(), id=f"{field}-{i}")
    for i, raw in enumerate(BAD_BODIES):
        yield pytest.param("", raw, id=f"body-{i}")


@pytest.mark.parametrize(("field", "body"), list(query_cases()))
def test_a_malformed_query_is_refused_with_a_sentence_and_never_reaches_a_site(
    coordinator: tuple[TestClient, RunManager, str, str], field: str, body: bytes
) -> None:
    client, manager, _, _ = coordinator
    response = client.post(
        "/api/queries", headers={**auth(RESEARCHER), "Content-Type": "application/json"}, content=body
    )
    assert_sentence(response)
    assert "query-line" not in manager.control.started  # type: ignore[attr-defined]  # no query line was started


COHORT = {"name": "over50", "dataset": "heart-disease"}
BAD_COHORT_FIELDS: dict[str, list[Any]] = {
    "name": [1, None, "", "a b", "../x", "n" * 65],
    "dataset": [1, None, "", "heart"],
    "where": [1, "x" * 4001, "lower(age) > 1", "age > "],
    "sites": [[], "VA", ["Nowhere"]],
    "surplus": [1],
}


def cohort_cases() -> Iterator[Any]:
    for field, values in BAD_COHORT_FIELDS.items():
        for i, value in enumerate(values):
            yield pytest.param(json.dumps({**COHORT, field: value}).encode(), id=f"{field}-{i}")
    for i, raw in enumerate(BAD_BODIES):
        yield pytest.param(raw, id=f"body-{i}")


@pytest.mark.parametrize("body", list(cohort_cases()))
def test_a_malformed_cohort_is_refused_with_a_sentence_and_nothing_is_frozen(
    coordinator: tuple[TestClient, RunManager, str, str], body: bytes
) -> None:
    client, manager, _, _ = coordinator
    response = client.post(
        "/api/cohorts", headers={**auth(RESEARCHER), "Content-Type": "application/json"}, content=body
    )
    assert_sentence(response)
    assert manager.cohorts.names("heart") == []
    assert "query-line" not in manager.control.started  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", list(BAD_MODELS))
@pytest.mark.parametrize(
    ("route", "method", "token"), [("/api/models", "POST", RESEARCHER), ("/internal/runs/RUN/model", "PUT", INTERNAL)]
)
def test_bytes_that_are_not_a_model_are_refused_and_not_stored(
    coordinator: tuple[TestClient, RunManager, str, str],
    name: str,
    route: str,
    method: str,
    token: str,
) -> None:
    client, manager, _, run_id = coordinator
    stored = sorted((manager.store.root / "models").iterdir())
    response = client.request(method, route.replace("RUN", run_id), headers=auth(token), content=BAD_MODELS[name])
    message = assert_sentence(response, "model")
    assert response.status_code == (413 if name == "too big" else 400), message
    assert sorted((manager.store.root / "models").iterdir()) == stored


def test_a_real_model_is_still_taken(coordinator: tuple[TestClient, RunManager, str, str]) -> None:
    client, _, _, _ = coordinator
    response = client.post("/api/models", headers=auth(RESEARCHER), content=npz(w=np.ones((2, 2), np.float32)))
    assert response.status_code == 201 and len(response.json()["sha256"]) == 64


def announce_cases() -> Iterator[Any]:
    for field, values in BAD_ANNOUNCE_FIELDS.items():
        for i, value in enumerate(values):
            yield pytest.param(field, json.dumps({**ANNOUNCE, field: value}).encode(), id=f"{field}-{i}")
    for i, raw in enumerate(BAD_BODIES):
        yield pytest.param("", raw, id=f"body-{i}")


@pytest.mark.parametrize(("field", "body"), list(announce_cases()))
def test_a_malformed_announcement_is_refused_and_the_site_unchanged(
    coordinator: tuple[TestClient, RunManager, str, str],
    field: str,
    body: bytes,
) -> None:
    client, manager, _, _ = coordinator
    before = manager.store.sites()
    response = client.post("/site/announce", headers={**auth(SITE), "Content-Type": "application/json"}, content=body)
    assert_sentence(response, *((field,) if field else ("the announcement",)))
    assert manager.store.sites() == before


EVENT_BODIES = [b for b in BAD_BODIES if b != b"[]"]  # no events at all is a batch of none


@pytest.mark.parametrize(
    "body",
    [json.dumps(b).encode() for b in BAD_EVENTS] + EVENT_BODIES,
    ids=[f"events-{i}" for i in range(len(BAD_EVENTS))] + [f"body-{i}" for i in range(len(EVENT_BODIES))],
)
def test_malformed_events_from_the_server_loop_are_refused_and_not_stored(
    coordinator: tuple[TestClient, RunManager, str, str],
    body: bytes,
) -> None:
    client, manager, _, run_id = coordinator
    before = manager.store.events(run_id)
    response = client.post(f"/internal/runs/{run_id}/events", headers=auth(INTERNAL), content=body)
    assert_sentence(response, "the events")
    assert manager.store.events(run_id) == before


@pytest.mark.parametrize("body", [json.dumps(b).encode() for b in BAD_RINGS] + BAD_BODIES)
def test_a_malformed_ring_is_refused(coordinator: tuple[TestClient, RunManager, str, str], body: bytes) -> None:
    client, _, _, _ = coordinator
    assert_sentence(client.post("/internal/ring", headers=auth(INTERNAL), content=body), "the ring")


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("events?after=abc", "after"),
        ("events?after=-1", "after"),
        ("events?after=1e3", "after"),
        ("events?after=99999999999999999999", "after"),
        ("events?stream=2", "stream"),
    ],
)
def test_malformed_query_parameters_are_refused(
    coordinator: tuple[TestClient, RunManager, str, str], path: str, named: str
) -> None:
    client, _, _, run_id = coordinator
    assert_sentence(client.get(f"/api/runs/{run_id}/{path}", headers=auth(RESEARCHER)), named)


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/nope",
        "/api/runs/nope/model",
        "/api/runs/nope/events",
        "/internal/models/nope",
        "/internal/runs/nope/task",
    ],
)
def test_unknown_runs_and_models_are_a_404_sentence(
    coordinator: tuple[TestClient, RunManager, str, str], path: str
) -> None:
    client, _, _, _ = coordinator
    token = INTERNAL if path.startswith("/internal") else RESEARCHER
    response = client.get(path, headers=auth(token))
    assert response.status_code == 404 and assert_sentence(response)


def test_a_site_name_that_is_not_one_is_refused_on_the_presence_route(
    coordinator: tuple[TestClient, RunManager, str, str],
) -> None:
    client, _, _, _ = coordinator
    assert_sentence(client.get("/site/presence/a%20b", headers=auth(SITE)), "site name")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(
    max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(field=st.sampled_from([*BAD_TASK_FIELDS, *BAD_ANNOUNCE_FIELDS]), value=JSON)
def test_no_value_in_any_field_makes_a_server_error(
    coordinator: tuple[TestClient, RunManager, str, str],
    field: str,
    value: Any,
) -> None:
    client, _, _, _ = coordinator
    for route, token, base in (("/api/runs/check", RESEARCHER, TASK), ("/site/announce", SITE, ANNOUNCE)):
        response = client.post(route, headers=auth(token), json={**base, field: value})
        assert response.status_code < 500, (route, field, value, response.text[:300])
        if response.status_code >= 400:
            assert_sentence(response)


BAD_PAYLOAD_CALLS = [
    ("PUT", "/site/blobs/abc?site=VA", b"x", 404, "not a SHA-256"),
    ("PUT", f"/site/blobs/{'A' * 64}?site=VA", b"x", 404, "not a SHA-256"),
    ("PUT", f"/site/blobs/{'a' * 64}", b"x", 400, "names its site"),  # the shared token must say which site
    ("PUT", f"/site/blobs/{'a' * 64}?site=a%20b", b"x", 400, "names its site"),
    ("PUT", f"/site/blobs/{'a' * 64}?site=VA", b"x", 400, "SHA-256 is not the one"),
    ("PUT", f"/site/blobs/{'a' * 64}?site=VA", b"x" * (MODEL_LIMIT + (1 << 20) + 1), 413, "more than the"),
    ("GET", f"/site/blobs/{'a' * 64}?site=VA", b"", 404, "no such payload"),
    ("GET", f"/internal/blobs/VA/{'a' * 64}", b"", 404, "no such payload"),
    ("PUT", "/internal/blobs/zz", b"x", 404, "not a SHA-256"),
    ("GET", f"/internal/blobs/..%2E/{'a' * 64}", b"", 404, "not a site name"),
    ("DELETE", f"/internal/blobs/.hidden/{'a' * 64}", b"", 404, "not a site name"),
]


@pytest.mark.parametrize("method,path,body,status,said", BAD_PAYLOAD_CALLS)
def test_a_malformed_payload_call_is_refused_with_a_sentence_and_nothing_stored(
    coordinator: tuple[TestClient, RunManager, str, str], method: str, path: str, body: bytes, status: int, said: str
) -> None:
    client = coordinator[0]
    token = INTERNAL if path.startswith("/internal") else SITE
    response = client.request(method, path, content=body or None, headers=auth(token))
    assert response.status_code == status and said in response.json()["error"], response.text
    store = client.app.state.flip.blobs  # type: ignore[attr-defined]
    assert store.held() == 0
