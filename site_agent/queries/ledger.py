"""A site's ledger of the cohorts it has answered queries about, against differencing.

Two cohorts that differ by one patient (``age > 50`` and ``age > 50 and not (...)``) each pass a
threshold on their own, yet the difference of their answers is that patient. So the site keeps,
per project and dataset, a fingerprint of every cohort whose answer it released, and refuses a
query whose cohort differs from one of them by fewer rows than the threshold. The whole table
counts as answered from the start (its size is in the catalog the site announces).

A fingerprint is not the rows: it is a count sketch, the number of the cohort's rows in each of
``BUCKETS`` buckets of a keyed hash of the row's position (the key is the site's own and never
leaves), and a keyed digest of the exact row set. The L1 distance between two sketches never
exceeds the number of rows in which the cohorts differ (rows only cancel, they are never
counted twice), so a difference that is truly small is always caught; a large one can read as
small only when many of its rows cancel in the same buckets, which makes the ledger refuse a
harmless query, never allow a harmful one. Nothing here talks to the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUCKETS = 4096
LEDGER_DIR = "queries"
LEDGER_FILE = "ledger.jsonl"
KEY_FILE = "ledger.key"


@dataclass(frozen=True)
class Cohort:
    """A cohort's fingerprint: its count sketch and the keyed digest of its exact rows."""

    sketch: np.ndarray  # uint32[BUCKETS]
    digest: str
    size: int
    text: str = ""


def bucket_of_rows(key: bytes, n_rows: int) -> np.ndarray:
    """The bucket of each row position 0..n_rows-1 under ``key``."""
    out = np.empty(n_rows, dtype=np.int64)
    for i in range(n_rows):
        h = hashlib.blake2b(i.to_bytes(8, "little"), key=key, digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") % BUCKETS
    return out


def fingerprint(rows: np.ndarray, buckets: np.ndarray, key: bytes, text: str = "") -> Cohort:
    """The fingerprint of the cohort holding the row positions ``rows`` (sorted or not)."""
    ordered = np.sort(np.asarray(rows, dtype=np.int64))
    sketch = np.bincount(buckets[ordered], minlength=BUCKETS).astype(np.uint32)
    digest = hashlib.blake2b(ordered.tobytes(), key=key, digest_size=16).hexdigest()
    return Cohort(sketch, digest, int(len(ordered)), text)


def closest(new: Cohort, answered: list[Cohort], threshold: int) -> Cohort | None:
    """An answered cohort that ``new`` differs from by fewer than ``threshold`` rows (None when there is none).

    The same cohort again is no difference: its answer is the same answer."""
    for old in answered:
        if old.digest == new.digest:
            continue
        lower_bound = int(np.abs(old.sketch.astype(np.int64) - new.sketch.astype(np.int64)).sum())
        if lower_bound < threshold:
            return old
    return None


def site_key(site_dir: Path) -> bytes:
    """The site's own secret for keyed hashes of rows (made once, 0600; it never leaves the site)."""
    folder = Path(site_dir) / LEDGER_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / KEY_FILE
    if not path.exists():
        tmp = folder / f"{KEY_FILE}.{os.getpid()}.{threading.get_ident()}"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            fh.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # whole or not at all; a key made a moment ago elsewhere wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes()


def _encode(sketch: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(sketch.astype("<u4").tobytes())).decode()


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<u4").astype(np.uint32)


class QueryLedger:
    """The answered cohorts of every project at one site, in ``<site>/queries/ledger.jsonl`` (thread-safe)."""

    def __init__(self, site_dir: Path) -> None:
        self.dir = Path(site_dir) / LEDGER_DIR
        self.key = site_key(site_dir)
        self._lock = threading.Lock()
        self._buckets: dict[int, np.ndarray] = {}
        self._whole: dict[int, Cohort] = {}  # the whole table's fingerprint, by its number of rows
        self._answered: dict[tuple[str, str], list[Cohort]] = {}
        self._load()

    def _load(self) -> None:
        path = self.dir / LEDGER_FILE
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                cohort = Cohort(_decode(row["sketch"]), row["digest"], int(row["size"]), row.get("text", ""))
                self._answered.setdefault((row["project"], row["dataset"]), []).append(cohort)

    def cohort(self, rows: np.ndarray, n_rows: int, text: str = "") -> Cohort:
        with self._lock:
            buckets = self._buckets.get(n_rows)
            if buckets is None:
                buckets = self._buckets[n_rows] = bucket_of_rows(self.key, n_rows)
        return fingerprint(rows, buckets, self.key, text)

    def too_close(self, project: str, dataset: str, new: Cohort, n_rows: int, threshold: int) -> Cohort | None:
        """The answered cohort (or the whole table) that ``new`` is too close to, if any."""
        with self._lock:
            whole = self._whole.get(n_rows)
        if whole is None:
            whole = self.cohort(np.arange(n_rows), n_rows, "the whole table (its size is announced)")
            with self._lock:
                self._whole[n_rows] = whole
        with self._lock:
            answered = [whole, *self._answered.get((project, dataset), [])]
        return closest(new, answered, threshold)

    def record(self, project: str, dataset: str, cohort: Cohort) -> None:
        """Remember ``cohort`` as answered for ``project`` (once: the same cohort again adds nothing)."""
        with self._lock:
            known = self._answered.setdefault((project, dataset), [])
            if any(c.digest == cohort.digest for c in known):
                return
            known.append(cohort)
            row = {
                "project": project,
                "dataset": dataset,
                "digest": cohort.digest,
                "size": cohort.size,
                "sketch": _encode(cohort.sketch),
                "text": cohort.text[:500],
                "time": time.time(),
            }
            with open(self.dir / LEDGER_FILE, "a") as fh:
                fh.write(json.dumps(row) + "\n")
