"""``flip``'s named exit statuses: its ``--help`` documents each one, and the commands return them."""

from __future__ import annotations

import pytest

from flip_local.cli import main
from flip_local.exits import FlipExit


def test_help_lists_every_exit_status_with_its_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == FlipExit.OK
    text = " ".join(capsys.readouterr().out.split())
    for code in FlipExit:
        assert f"{int(code)} {' '.join(code.meaning.split())}" in text, code


def test_a_wrong_command_line_exits_with_the_usage_status() -> None:
    with pytest.raises(SystemExit) as done:
        main(["no-such-command"])
    assert done.value.code == FlipExit.USAGE


def test_status_without_a_federation_exits_failed(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("FLIP_HOME", str(tmp_path))
    assert main(["status"]) == FlipExit.FAILED
