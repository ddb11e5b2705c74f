"""Real processes: a SuperLink, the coordinator and four hospital site agents on free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator.federation import _alive, down, status, up
from flip_magics.client import FlipClient


@dataclass
class LocalFederation:
    home: Path
    connection: dict[str, Any]

    def client(self) -> FlipClient:
        return FlipClient(self.connection["coordinator_url"], self.connection["token"])

    def pid(self, name: str) -> int:
        return next(p["pid"] for p in status(self.home)["processes"] if p["name"] == name)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    home = tmp_path_factory.mktemp("flip-home")
    previous = os.environ.get("FLIP_HOME")
    os.environ["FLIP_HOME"] = str(home)  # kernels started by the tests find the connection file here
    try:
        connection = up(home)
        yield LocalFederation(home, connection)
    finally:
        pids = [p["pid"] for p in status(home)["processes"]]
        down(home)
        if previous is None:
            os.environ.pop("FLIP_HOME", None)
        else:
            os.environ["FLIP_HOME"] = previous
        assert not [pid for pid in pids if _alive(pid)], "flip down left processes behind"
