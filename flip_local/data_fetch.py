"""Registry, verification and download of FLIP's public demo data sets (``flip data fetch NAME``).

Every file is checked against a published digest (SHA-256, or MD5 where the publisher only
gives MD5). Downloads go to a temporary file beside the destination and are renamed into
place only after the digest matches, so a broken download never looks like good data.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flip_core.errors import FlipError

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


class DataFetchError(FlipError):
    """A data set could not be found, downloaded or verified."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: where it comes from, where it goes, and its digest."""

    url: str
    relpath: str
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self) -> None:
        if (self.sha256 is None) == (self.md5 is None):
            raise ValueError(f"RemoteFile {self.relpath!r} needs exactly one of sha256 or md5.")
        rel = Path(self.relpath)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"RemoteFile relpath {self.relpath!r} must be relative, without '..'.")

    @property
    def algorithm(self) -> str:
        return "sha256" if self.sha256 is not None else "md5"

    @property
    def expected(self) -> str:
        return (self.sha256 or self.md5 or "").lower()


@dataclass(frozen=True)
class DatasetSource:
    """A named data set made of one or more remote files."""

    name: str
    description: str
    files: tuple[RemoteFile, ...]


_UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/"
_HEART_SHA256 = {
    "cleveland": "a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8",
    "hungarian": "d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796",
    "switzerland": "834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314",
    "va": "e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f",
}

DATASETS: dict[str, DatasetSource] = {
    "heart-disease": DatasetSource(
        name="heart-disease",
        description="UCI Heart Disease, four real hospitals (Cleveland, Hungary, Switzerland, "
        "VA Long Beach); CC BY 4.0, Janosi, Steinbrunn, Pfisterer, Detrano (1988).",
        files=tuple(
            RemoteFile(
                url=f"{_UCI}processed.{site}.data", relpath=f"heart-disease/processed.{site}.data", sha256=digest
            )
            for site, digest in _HEART_SHA256.items()
        ),
    ),
    "breastmnist": DatasetSource(
        name="breastmnist",
        description="BreastMNIST (MedMNIST v2): 780 breast-ultrasound images, 28x28 grey; "
        "CC BY 4.0, Yang et al. 2023 / Al-Dhabyani et al. 2020.",
        files=(
            RemoteFile(
                url="https://zenodo.org/records/10519652/files/breastmnist.npz?download=1",
                relpath="breastmnist/breastmnist.npz",
                md5="750601b1f35ba3300ea97c75c52ff8f6",
            ),
        ),
    ),
}


def _source(name: str) -> DatasetSource:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataFetchError(
            f"Unknown data set {name!r}; known data sets are: {', '.join(sorted(DATASETS))}."
        ) from None


def _new_hash(algorithm: str) -> Any:
    return hashlib.new(algorithm, usedforsecurity=False)


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of the file at ``path`` with ``algorithm`` ("sha256" or "md5")."""
    digest = _new_hash(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return str(digest.hexdigest())


def _problem(remote: RemoteFile, root: Path) -> str | None:
    path = root / remote.relpath
    if not path.is_file():
        return f"{remote.relpath}: missing (expected at {path})."
    actual = file_digest(path, remote.algorithm)
    if actual != remote.expected:
        return f"{remote.relpath}: {remote.algorithm} mismatch, expected {remote.expected}, got {actual}."
    return None


def verify(name: str, root: Path) -> list[str]:
    """Check data set ``name`` under ``root``; return a list of problems (empty = all good)."""
    source = _source(name)
    return [p for f in source.files if (p := _problem(f, Path(root))) is not None]


def _download(remote: RemoteFile, target: Path, opener: Callable[..., Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = _new_hash(remote.algorithm)
        try:
            with os.fdopen(fd, "wb") as out, opener(remote.url, timeout=_TIMEOUT_S) as response:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as exc:
            raise DataFetchError(f"Could not download {remote.relpath} from {remote.url}: {exc}") from exc
        actual = digest.hexdigest()
        if actual != remote.expected:
            raise DataFetchError(
                f"Downloaded {remote.relpath} from {remote.url} has the wrong {remote.algorithm}: "
                f"expected {remote.expected}, got {actual}. The file was not kept."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(name: str, dest: Path, *, opener: Callable[..., Any] = urllib.request.urlopen) -> list[Path]:
    """Download data set ``name`` into ``dest``; return the local paths of all its files.

    Files already present with the right digest are not downloaded again; missing or bad
    ones are downloaded and verified. ``opener(url, timeout=...)`` must return a readable,
    context-managed binary stream (``urllib.request.urlopen`` by default).
    """
    source = _source(name)
    dest = Path(dest)
    paths: list[Path] = []
    for remote in source.files:
        target = dest / remote.relpath
        if _problem(remote, dest) is not None:
            _download(remote, target, opener)
        paths.append(target)
    return paths
