"""The ``flip`` command's hub-operator actions that need no running federation: headless tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from coordinator.app import Notifier, build_app
from coordinator.identity import HeadlessTokens
from coordinator.service import RunManager
from coordinator.store import Store
from flip_local.cli import main

from fakes import FakeControl
from helpers import coordinator_config


def who(app: TestClient, token: str | None, path: str = "/api/whoami") -> tuple[int, dict[str, str]]:
    response = app.get(path, headers={"Authorization": f"Bearer {token}"} if token else {})
    return response.status_code, response.json()


def test_headless_tokens_are_added_and_revoked_without_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    path = tmp_path / "coordinator.json"
    config = coordinator_config(tmp_path)
    config.dump(path)
    assert path.stat().st_mode & 0o777 == 0o600
    notifier = Notifier()
    manager = RunManager(Store(tmp_path), FakeControl(), notifier.notify, presence_grace=0)
    app = TestClient(build_app(config, manager, notifier, tokens=HeadlessTokens(path).grants))

    assert main(["token", "add", "ci-pipeline", "--project", "heart", "--config", str(path)]) == 0
    token = capsys.readouterr().out.rsplit(": ", 1)[1].strip()
    assert who(app, token) == (200, {"researcher": "ci-pipeline", "project": "heart"})
    assert main(["token", "list", "--config", str(path)]) == 0
    assert capsys.readouterr().out.split() == ["heart", "ci-pipeline"]
    assert main(["token", "revoke", "ci-pipeline", "--project", "heart", "--config", str(path)]) == 0
    assert "revoked 1 token(s) of ci-pipeline in project heart" in capsys.readouterr().out
    assert who(app, token)[0] == 401
    assert main(["token", "revoke", "ci-pipeline", "--project", "heart", "--config", str(path)]) == 1
    assert main(["token", "add", "x", "--project", "heart", "--config", str(tmp_path / "none.json")]) == 1
    assert "no coordinator config at" in capsys.readouterr().err
