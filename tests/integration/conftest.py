"""Real processes: a SuperLink, the coordinator and four hospital site agents on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flip_local.federation import status
from flip_local.processes import alive as _alive
from flip_magics.client import FlipClient

from helpers import local_federation


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
    with local_federation(home) as connection:  # kernels started by the tests find the connection file here
        try:
            yield LocalFederation(home, connection)
        finally:
            pids = [p["pid"] for p in status(home)["processes"]]
    assert not [pid for pid in pids if _alive(pid)], "flip down left processes behind"
