"""The hub's bulk payloads: only the sites a payload was published to read it, only the round loop reads a
site's, and nothing is stored that is not what its SHA-256 name says."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from coordinator.app import Notifier, build_app
from coordinator.blobs import HUB, MAX_AGE_SECONDS, SITE_QUOTA, BlobStore
from coordinator.registry import SiteRegistry
from coordinator.service import RunManager
from coordinator.store import Store

from fakes import FakeControl
from helpers import coordinator_config

INTERNAL = {"Authorization": "Bearer internal"}


@pytest.fixture
def hub(tmp_path: Path) -> tuple[TestClient, dict[str, dict[str, str]]]:
    config = coordinator_config(tmp_path, max_model_bytes=1 << 20)
    registry = SiteRegistry(config.registry_path)
    tokens = {name: registry.register(name, i, f"sha256:{i}") for i, name in enumerate(("VA", "Hungary"), 1)}
    notifier = Notifier()
    manager = RunManager(Store(tmp_path), FakeControl(), notifier.notify, presence_grace=0)
    client = TestClient(build_app(config, manager, notifier))
    return client, {name: {"Authorization": f"Bearer {t}"} for name, t in tokens.items()}


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def test_a_published_payload_reaches_only_the_sites_it_was_published_to(hub) -> None:
    client, site = hub
    blob = os.urandom(300_000)
    put = client.put(f"/internal/blobs/{sha(blob)}?readers=VA", content=blob, headers=INTERNAL)
    assert put.status_code == 200 and put.json() == {"sha256": sha(blob), "size": len(blob)}
    got = client.get(f"/site/blobs/{sha(blob)}", headers=site["VA"])
    assert got.status_code == 200 and got.content == blob and got.headers["content-length"] == str(len(blob))
    other = client.get(f"/site/blobs/{sha(blob)}", headers=site["Hungary"])
    assert other.status_code == 404 and "never published to it" in other.json()["error"]
    assert client.get(f"/site/blobs/{sha(blob)}").status_code == 401
    assert client.put(f"/internal/blobs/{sha(blob)}?readers=VA", content=blob, headers=site["VA"]).status_code == 401


def test_a_sites_payload_is_read_by_the_round_loop_alone_and_deleted_after(hub) -> None:
    client, site = hub
    blob = os.urandom(200_000)
    assert client.put(f"/site/blobs/{sha(blob)}", content=blob, headers=site["Hungary"]).status_code == 200
    assert client.get(f"/site/blobs/{sha(blob)}", headers=site["Hungary"]).status_code == 404  # not a hub payload
    assert client.get(f"/site/blobs/{sha(blob)}", headers=site["VA"]).status_code == 404
    assert client.get(f"/internal/blobs/VA/{sha(blob)}", headers=INTERNAL).status_code == 404  # not VA's
    got = client.get(f"/internal/blobs/Hungary/{sha(blob)}", headers=INTERNAL)
    assert got.status_code == 200 and got.content == blob
    assert client.delete(f"/internal/blobs/Hungary/{sha(blob)}", headers=INTERNAL).json() == {"deleted": True}
    assert client.get(f"/internal/blobs/Hungary/{sha(blob)}", headers=INTERNAL).status_code == 404


def test_an_upload_that_is_not_what_its_name_says_is_refused_and_not_kept(hub, tmp_path: Path) -> None:
    client, site = hub
    blob = os.urandom(100_000)
    wrong = client.put(f"/site/blobs/{sha(b'something else')}", content=blob, headers=site["VA"])
    assert wrong.status_code == 400 and "SHA-256 is not the one its address names" in wrong.json()["error"]
    bad_name = client.put("/site/blobs/..%2Fsites.json", content=blob, headers=site["VA"])
    assert bad_name.status_code == 404
    too_big = os.urandom((1 << 20) + (1 << 20) + 1)  # over the largest model plus a step's header
    refused = client.put(f"/site/blobs/{sha(too_big)}", content=too_big, headers=site["VA"])
    assert refused.status_code == 413 and "more than the" in refused.json()["error"]
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []  # nothing half-written stays


def test_a_site_cannot_fill_the_hubs_disk(hub) -> None:
    client, site = hub
    for i in range(SITE_QUOTA):
        blob = bytes([i]) * 1000
        assert client.put(f"/site/blobs/{sha(blob)}", content=blob, headers=site["VA"]).status_code == 200
    blob = b"one more" * 100
    over = client.put(f"/site/blobs/{sha(blob)}", content=blob, headers=site["VA"])
    assert over.status_code == 429 and f"already holds {SITE_QUOTA} payloads" in over.json()["error"]
    assert client.put(f"/site/blobs/{sha(blob)}", content=blob, headers=site["Hungary"]).status_code == 200


def test_old_payloads_are_swept_and_a_restarted_store_still_knows_its_readers(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1 << 20)
    blob = b"x" * 5000

    async def once() -> None:
        async def chunks():
            yield blob

        await store.receive(HUB, sha(blob), len(blob), chunks(), frozenset({"VA"}))

    asyncio.run(once())
    again = BlobStore(tmp_path, 1 << 20)
    assert again.find(HUB, sha(blob), reader="VA").size == len(blob)
    assert store.sweep(now=time.time() + MAX_AGE_SECONDS + 60) == 1
    assert store.held() == 0


def test_to_the_nginx_front_the_coordinator_names_the_file_and_sends_no_bytes(hub) -> None:
    client, site = hub
    blob = os.urandom(50_000)
    client.put(f"/internal/blobs/{sha(blob)}?readers=VA", content=blob, headers=INTERNAL)
    told = client.get(f"/site/blobs/{sha(blob)}", headers={**site["VA"], "x-flip-accel": "1"})
    assert told.status_code == 200 and told.content == b""
    assert told.headers["x-accel-redirect"] == f"/_flip_payloads/{HUB}/{sha(blob)}"
    refused = client.get(f"/site/blobs/{sha(blob)}", headers={**site["Hungary"], "x-flip-accel": "1"})
    assert refused.status_code == 404 and "x-accel-redirect" not in refused.headers  # authorised first
