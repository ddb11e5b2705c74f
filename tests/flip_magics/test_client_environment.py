"""Where a notebook's client finds its coordinator: the hub's environment first, then `flip up`'s file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flip_core.errors import NotConnected
from flip_magics.client import FlipClient


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("FLIP_API_URL", "JUPYTERHUB_API_TOKEN", "FLIP_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLIP_HOME", str(tmp_path))
    return tmp_path


def test_on_a_hub_the_kernel_uses_its_users_hub_token(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "connection.json").write_text(json.dumps({"coordinator_url": "http://local:1", "token": "local"}))
    monkeypatch.setenv("FLIP_API_URL", "http://coordinator:8900/")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "hub-token")
    client = FlipClient.from_environment()
    assert (client.url, client.token, client.project) == ("http://coordinator:8900", "hub-token", None)
    assert client.session.headers["Authorization"] == "Bearer hub-token"
    assert "X-FLIP-Project" not in client.session.headers
    chosen = FlipClient.from_environment("breast")
    assert chosen.session.headers["X-FLIP-Project"] == "breast"
    monkeypatch.setenv("FLIP_PROJECT", "heart")
    assert FlipClient.from_environment().project == "heart"


def test_elsewhere_the_local_connection_file_and_a_sentence_when_there_is_none(clean_env: Path) -> None:
    with pytest.raises(NotConnected, match=r"no FLIP coordinator found: on a FLIP hub the server sets \$FLIP_API_URL"):
        FlipClient.from_environment()
    (clean_env / "connection.json").write_text(json.dumps({"coordinator_url": "http://local:1", "token": "local"}))
    client = FlipClient.from_environment()
    assert (client.url, client.token) == ("http://local:1", "local")
