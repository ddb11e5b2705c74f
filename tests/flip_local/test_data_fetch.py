"""Behaviour tests for flip_local.data_fetch, using a fake opener (no network access)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from flip_core import paths
from flip_core.paths import data_dir
from flip_local.data_fetch import (
    DATASETS,
    DataFetchError,
    DatasetSource,
    RemoteFile,
    fetch,
    verify,
)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

FAKE_A = b"fake file A\n"
FAKE_B = b"fake file B, a bit longer\n" * 1000


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_dataset(monkeypatch):
    """Register a fake two-file data set (one SHA-256, one MD5) and return its contents by URL."""
    contents = {"https://fake.example/a.txt": FAKE_A, "https://fake.example/b.bin": FAKE_B}
    source = DatasetSource(
        name="fake-set",
        description="fake data set for tests",
        files=(
            RemoteFile("https://fake.example/a.txt", "fake-set/a.txt", sha256=_sha(FAKE_A)),
            RemoteFile("https://fake.example/b.bin", "fake-set/sub/b.bin", md5=hashlib.md5(FAKE_B).hexdigest()),
        ),
    )
    monkeypatch.setitem(DATASETS, "fake-set", source)
    return contents


def make_fake_opener(contents: dict[str, bytes], calls: list[str]):
    def fake_opener(url, timeout=None):
        calls.append(url)
        return io.BytesIO(contents[url])

    return fake_opener


def test_registry_entries():
    heart = DATASETS["heart-disease"]
    assert [f.relpath for f in heart.files] == [
        f"heart-disease/processed.{s}.data" for s in ("cleveland", "hungarian", "switzerland", "va")
    ]
    assert all(
        f.url.startswith("https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/processed.")
        for f in heart.files
    )
    assert heart.files[0].sha256 == ("a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8")
    (npz,) = DATASETS["breastmnist"].files
    assert npz.md5 == "750601b1f35ba3300ea97c75c52ff8f6" and npz.sha256 is None
    assert npz.relpath == "breastmnist/breastmnist.npz"


def test_remote_file_needs_exactly_one_digest():
    with pytest.raises(ValueError, match="exactly one"):
        RemoteFile("https://fake.example/x", "x")
    with pytest.raises(ValueError, match="exactly one"):
        RemoteFile("https://fake.example/x", "x", sha256="0" * 64, md5="0" * 32)


def test_fetch_downloads_verifies_and_skips_good_files(tmp_path, fake_dataset):
    calls: list[str] = []
    fake_opener = make_fake_opener(fake_dataset, calls)
    assert len(verify("fake-set", tmp_path)) == 2
    paths = fetch("fake-set", tmp_path, opener=fake_opener)
    assert paths == [tmp_path / "fake-set/a.txt", tmp_path / "fake-set/sub/b.bin"]
    assert paths[0].read_bytes() == FAKE_A and paths[1].read_bytes() == FAKE_B
    assert verify("fake-set", tmp_path) == []
    assert len(calls) == 2
    fetch("fake-set", tmp_path, opener=fake_opener)
    assert len(calls) == 2  # nothing downloaded again
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.bin", "fake-set", "sub"]


def test_fetch_replaces_a_corrupt_file(tmp_path, fake_dataset):
    calls: list[str] = []
    (tmp_path / "fake-set").mkdir()
    (tmp_path / "fake-set/a.txt").write_bytes(b"corrupted")
    problems = verify("fake-set", tmp_path)
    assert any("a.txt" in p and _sha(FAKE_A) in p and _sha(b"corrupted") in p for p in problems)
    fetch("fake-set", tmp_path, opener=make_fake_opener(fake_dataset, calls))
    assert (tmp_path / "fake-set/a.txt").read_bytes() == FAKE_A
    assert verify("fake-set", tmp_path) == []


def test_fetch_checksum_mismatch_raises_and_keeps_nothing(tmp_path, fake_dataset):
    fake_dataset["https://fake.example/a.txt"] = b"tampered"
    with pytest.raises(DataFetchError) as info:
        fetch("fake-set", tmp_path, opener=make_fake_opener(fake_dataset, []))
    message = str(info.value)
    for expected in ("fake-set/a.txt", "https://fake.example/a.txt", _sha(FAKE_A), _sha(b"tampered")):
        assert expected in message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_fetch_network_error_becomes_data_fetch_error(tmp_path, fake_dataset):
    def fake_opener(url, timeout=None):
        raise OSError("fake network down")

    with pytest.raises(DataFetchError, match="fake network down"):
        fetch("fake-set", tmp_path, opener=fake_opener)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(DataFetchError) as info:
        fetch("no-such-data", tmp_path, opener=make_fake_opener({}, []))
    assert "heart-disease" in str(info.value) and "breastmnist" in str(info.value)
    with pytest.raises(DataFetchError, match="no-such-data"):
        verify("no-such-data", tmp_path)


def test_data_dir_prefers_env_then_shared_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIP_DATA_DIR", str(tmp_path / "custom"))
    assert data_dir() == tmp_path / "custom"
    monkeypatch.delenv("FLIP_DATA_DIR")
    shared = Path(paths.__file__).resolve().parents[2] / "shared" / "data"
    if shared.is_dir():
        assert data_dir() == shared
    else:
        assert data_dir() == Path.home() / ".cache" / "flip" / "data"


@pytest.mark.skipif(
    not (SHARED_DATA / "heart-disease").is_dir(), reason="no shared copy of heart-disease next to the repository"
)
def test_shared_heart_disease_copy_verifies(monkeypatch):
    monkeypatch.delenv("FLIP_DATA_DIR", raising=False)
    assert data_dir() == SHARED_DATA
    assert verify("heart-disease", data_dir()) == []
