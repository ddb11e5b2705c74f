"""The hub's store of bulk payloads: a model too large for a Flower message, named by its SHA-256.

The round loop publishes each round's request once (``PUT /internal/blobs/SHA?readers=...``) and names
the sites that may read it; each of those sites fetches it (``GET /site/blobs/SHA``) through the fleet
front with its own token. A site uploads its reply's payload (``PUT /site/blobs/SHA``), which only the
round loop reads back (``GET /internal/blobs/SITE/SHA``) and then deletes. The Flower message that
refers to a payload still crosses the SuperLink; only the bytes move here (``flip_core.bulk``).

Every upload is hashed as it is written and kept only when its SHA-256 and size are the ones its
address names, so what is stored is exactly what the name says. Files live under the coordinator's
state folder, one folder per owner ("hub" or the site's name), written to a temporary name first and
renamed when complete. A site may hold at most ``SITE_QUOTA`` payloads at once; payloads older than
``MAX_AGE_SECONDS`` are swept. Nothing here parses the bytes: the receiver decodes and checks them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from coordinator.identity import Refused
from flip_core.api import SITE_NAME

FOLDER = "blobs"  # under the coordinator's state folder
ACCEL_HEADER = "x-flip-accel"  # set by the nginx front on site routes: it serves a payload's file itself
ACCEL_PREFIX = "/_flip_payloads/"  # nginx's internal location for them (X-Accel-Redirect)
HUB = "_hub"  # the owner of what the round loop publishes (no site name starts with "_")
SHA256 = re.compile(r"[0-9a-f]{64}")
SITE_QUOTA = 8  # payloads one site may hold on the hub at once (a round needs one)
MAX_AGE_SECONDS = 6 * 3600.0  # a payload nobody fetched or deleted within this is swept
BLOB_HEADROOM = 1 << 20  # a step's header beside its model: a payload may exceed the largest model by this
WRITE_BATCH = 8 << 20  # bytes gathered before one write (and hash update) off the event loop


@dataclass(frozen=True)
class Blob:
    owner: str
    sha256: str
    size: int
    readers: frozenset[str]
    path: Path


class BlobStore:
    """Bulk payloads on disk, by owner and SHA-256 (thread-safe; uploads are streamed)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._readers: dict[tuple[str, str], frozenset[str]] = {}
        for meta in self.root.glob("*/*.json"):  # what a previous coordinator left: readable again after a restart
            try:
                self._readers[(meta.parent.name, meta.stem)] = frozenset(json.loads(meta.read_text())["readers"])
            except (OSError, ValueError, KeyError, TypeError):
                meta.unlink(missing_ok=True)

    def _path(self, owner: str, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise Refused(f"{sha256[:70]!r} is not a SHA-256 (64 lowercase hex digits)", 404)
        if owner != HUB and not SITE_NAME.fullmatch(owner):  # never a path outside the store ("..", "a/b")
            raise Refused(f"{owner[:70]!r} is not a site name", 404)
        return self.root / owner / sha256

    async def receive(
        self, owner: str, sha256: str, length: int | None, chunks: AsyncIterator[bytes], readers: frozenset[str]
    ) -> Blob:
        """Store the upload whose bytes ``chunks`` yields under ``owner``/``sha256``; refused (with a sentence)
        when it has no length, is too large, is over the owner's quota, or is not what its name says."""
        path = self._path(owner, sha256)
        if length is None:
            raise Refused("a payload upload needs a Content-Length", 411)
        if length > self.max_bytes:
            raise Refused(f"the payload is {length} bytes, more than the {self.max_bytes} this hub takes", 413)
        self.sweep()
        path.parent.mkdir(parents=True, exist_ok=True)
        if owner != HUB and len(list(path.parent.glob("*.json"))) >= SITE_QUOTA:
            raise Refused(f"site {owner!r} already holds {SITE_QUOTA} payloads on the hub; none was fetched", 429)
        temp = spool_path(path.parent, sha256)
        try:
            over = Refused(f"the payload sent more than the {length} bytes its Content-Length says", 400)
            digest, got = await spool(chunks, temp, length, over)
            if got != length:
                raise Refused(f"the payload ended after {got} of the {length} bytes its Content-Length says", 400)
            if digest != sha256:
                raise Refused("the payload's SHA-256 is not the one its address names: refused, not stored", 400)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        with self._lock:
            readers = readers | self._readers.get((owner, sha256), frozenset())
            self._readers[(owner, sha256)] = readers
            path.with_suffix(".json").write_text(json.dumps({"readers": sorted(readers), "size": length}))
        return Blob(owner, sha256, length, readers, path)

    def find(self, owner: str, sha256: str, reader: str | None = None) -> Blob:
        """The stored payload; 404 unless it exists and (``reader``) that site may read it."""
        path = self._path(owner, sha256)
        with self._lock:
            readers = self._readers.get((owner, sha256))
        if readers is None or not path.exists() or (reader is not None and reader not in readers):
            raise Refused("no such payload for this site (it was never published to it, or is gone)", 404)
        return Blob(owner, sha256, path.stat().st_size, readers, path)

    def delete(self, owner: str, sha256: str) -> bool:
        path = self._path(owner, sha256)
        with self._lock:
            self._readers.pop((owner, sha256), None)
        path.with_suffix(".json").unlink(missing_ok=True)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def sweep(self, now: float | None = None) -> int:
        """Delete payloads older than ``MAX_AGE_SECONDS`` (a run that died before deleting its own)."""
        cutoff = (time.time() if now is None else now) - MAX_AGE_SECONDS
        swept = 0
        for meta in self.root.glob("*/*.json"):
            try:
                old = meta.stat().st_mtime < cutoff
            except OSError:
                continue
            if old:
                swept += self.delete(meta.parent.name, meta.stem)
        return swept

    def held(self) -> int:
        """Bytes stored now."""
        return sum(p.stat().st_size for p in self.root.glob("*/*") if p.suffix != ".json" and p.is_file())


def spool_path(folder: Path, name: str) -> Path:
    """A fresh temporary file name in ``folder`` for an upload of ``name`` (hidden: a leading dot)."""
    return folder / f".{name}.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}"


async def spool(chunks: AsyncIterator[bytes], path: Path, limit: int, over: Exception) -> tuple[str, int]:
    """Write what ``chunks`` yields to ``path``, hashed as it goes, in batches written off the event loop (never
    whole in memory); ``over`` is raised as soon as it passes ``limit`` bytes. Its SHA-256 and size."""
    hasher = hashlib.sha256()
    got = 0
    with open(path, "wb") as out:
        pending: list[bytes] = []
        held = 0
        async for chunk in chunks:
            got += len(chunk)
            if got > limit:
                raise over
            pending.append(chunk)
            held += len(chunk)
            if held >= WRITE_BATCH:
                await asyncio.to_thread(_write, out, hasher, pending)
                pending, held = [], 0
        await asyncio.to_thread(_write, out, hasher, pending)
    return hasher.hexdigest(), got


def _write(out: object, hasher: object, chunks: list[bytes]) -> None:
    for chunk in chunks:
        hasher.update(chunk)  # type: ignore[attr-defined]
        out.write(chunk)  # type: ignore[attr-defined]


__all__ = [
    "ACCEL_HEADER",
    "ACCEL_PREFIX",
    "BLOB_HEADROOM",
    "FOLDER",
    "HUB",
    "SITE_QUOTA",
    "Blob",
    "BlobStore",
    "spool",
    "spool_path",
]
