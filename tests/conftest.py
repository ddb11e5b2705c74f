"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import shared_data


@pytest.fixture
def heart_dir() -> Path:
    path = shared_data() / "heart-disease"
    if not (path / "processed.cleveland.data").is_file():
        pytest.fail(f"the shared heart-disease data is missing at {path} (set FLIP_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def omop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A PostgreSQL of the session's own holding Eunomia's three hospitals' databases (the OMOP tests and their
    red-team attacks share it): its folder, the server, each site's database by site name."""
    from flip_local import eunomia, postgres

    home = tmp_path_factory.mktemp("omop")
    server = postgres.start(home / "postgres")
    try:
        databases = {d.site: d for d in eunomia.load(server, home / "secrets")}
        yield {"home": home, "server": server, "databases": databases}
    finally:
        postgres.stop(server)
