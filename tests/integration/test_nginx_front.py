"""The nginx fleet front (``flip up --front nginx``, ``coordinator.nginx_front``): the same allow list as FLIP's
own front, and a federation behind it trains, with a model large enough to travel beside its messages."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests

from flip_magics.client import FlipClient

from helpers import local_federation

FRONT = "this address serves only Flower's fleet API and FLIP's site routes"

# Linear(600, 600): 360,600 parameters, 1.4 MB, above the inline limit: the model travels beside its messages.
CELL = """
import torch

def build_model():
    model = torch.nn.Linear(600, 600)
    with torch.no_grad():
        model.weight.copy_(torch.arange(360000, dtype=torch.float32).reshape(600, 600) % 97 / 5)
        model.bias.zero_()
    return model

def train(model, data, config):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return {"loss": 0.0}

def evaluate(model, data, config):
    return {"rows": len(data.test)}
"""


@pytest.fixture(scope="module")
def nginx_connection(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The connection (as ``flip up`` writes it) of a two-site federation whose sites reach it through nginx."""
    with local_federation(tmp_path_factory.mktemp("flip-nginx"), sites=2, warm=False, front="nginx") as connection:
        yield connection


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/fleet/pull-messages"),  # the fleet API takes POST only
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/runtime/pull-messages"),
        ("GET", "/api/sites"),
        ("GET", "/internal/sites"),
        ("GET", "/docs"),
        ("GET", "/site/%2e%2e/internal/sites"),
        ("GET", "/site/..%2Finternal/sites"),
        ("POST", "/v1/fleet%2F..%2Fcontrol/list-runs"),
    ],
)
def test_only_the_fleet_api_and_site_routes_pass(nginx_connection: dict[str, Any], method: str, path: str) -> None:
    answer = requests.request(
        method, f"https://{nginx_connection['superlink']}{path}", verify=nginx_connection["ca"], timeout=10
    )
    assert answer.status_code == 403 and FRONT in answer.text


def test_health_answers_and_a_site_route_reaches_the_coordinator(nginx_connection: dict[str, Any]) -> None:
    base = f"https://{nginx_connection['superlink']}"
    assert requests.get(f"{base}/health", verify=nginx_connection["ca"], timeout=10).text == "ok"
    unknown = requests.get(
        f"{base}/site/presence/VA", headers={"Authorization": "Bearer nope"}, verify=nginx_connection["ca"], timeout=10
    )
    assert unknown.status_code == 401 and "not registered" in unknown.json()["error"]


def test_a_large_model_trains_behind_nginx_bit_for_bit(nginx_connection: dict[str, Any]) -> None:
    client = FlipClient(nginx_connection["coordinator_url"], nginx_connection["token"], timeout=120)
    handle = client.train(CELL, dataset="heart-disease", rounds=2, seed=0)
    handle.wait(180)
    assert handle.status == "completed", handle.reason
    got = client.model_params(handle.run_id)
    weight = (np.arange(360000, dtype=np.float32).reshape(600, 600) % np.float32(97)) / np.float32(5)
    expected = weight.astype(np.float32) * np.float32(4.0)  # doubled at every site, twice
    assert hashlib.sha256(got["weight"].tobytes()).digest() == hashlib.sha256(expected.tobytes()).digest()
    assert not got["bias"].any()


def _answer_from_nginx(connection: dict[str, Any], request_head: bytes) -> int:
    """Send a request head (its body never follows) through nginx; the answer's status."""
    import socket
    import ssl

    host, port = connection["superlink"].rsplit(":", 1)
    context = ssl.create_default_context(cafile=connection["ca"])
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=30), server_hostname=host) as sock:
        sock.sendall(request_head)
        data = sock.recv(65536)
    return int(data.split(b" ", 2)[1])


def test_unsigned_and_oversize_fleet_calls_are_refused_by_nginx(nginx_connection: dict[str, Any]) -> None:
    """The nginx front's doors (coordinator.nginx_front): a fleet call without a well-formed SuperNode credential
    gets 401, one declaring more than a fleet body may be gets 413, before a byte reaches the SuperLink."""
    unsigned = b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: hub\r\nContent-Length: 10\r\n\r\n"
    assert _answer_from_nginx(nginx_connection, unsigned) == 401
    unsigned_oversize = unsigned.replace(b"Length: 10", b"Length: 300000000")
    assert _answer_from_nginx(nginx_connection, unsigned_oversize) in (401, 413)  # nginx checks the size first
    stamp = b"2026-12-07T12:00:00.000000+00:00"
    shaped = b"flwr-public-key: QUJD\r\nflwr-signature: QUJD\r\nflwr-timestamp: " + stamp + b"\r\n"
    oversize = b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: hub\r\n" + shaped + b"Content-Length: 300000000\r\n\r\n"
    assert _answer_from_nginx(nginx_connection, oversize) == 413
    tokenless = b"PUT /site/blobs/" + b"a" * 64 + b" HTTP/1.1\r\nHost: hub\r\nContent-Length: 10\r\n\r\n"
    assert _answer_from_nginx(nginx_connection, tokenless) == 401
