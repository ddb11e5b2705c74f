"""Fixtures shared by every test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import shared_data


@pytest.fixture
def heart_dir() -> Path:
    path = shared_data() / "heart-disease"
    if not (path / "processed.cleveland.data").is_file():
        pytest.fail(f"the shared heart-disease data is missing at {path} (set FLIP_DATA_DIR)")
    return path
