"""The coordinator's state: runs, their events and sites in SQLite; models as files.

Every event a run produces is appended with a sequence number, so a notebook that lost its
connection (or a kernel that restarted) asks for everything after the last number it saw.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flip_core.runs import RunRecord, Task
from flip_core.status import TERMINAL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    flower_run_id TEXT,
    name TEXT NOT NULL,
    project TEXT NOT NULL,
    researcher TEXT NOT NULL,
    dataset TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    finished REAL,
    task TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    ts REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, seq);
CREATE TABLE IF NOT EXISTS uploads (
    owner TEXT NOT NULL,
    sha TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_by_owner ON uploads (owner, at);
CREATE TABLE IF NOT EXISTS sites (
    site TEXT PRIMARY KEY,
    node_id TEXT,
    info TEXT NOT NULL,
    last_seen REAL NOT NULL,
    state TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StoredRun:
    """A run as the store keeps it: its row, its task and its record (the record without its status)."""

    run_id: str
    flower_run_id: int | None  # Flower's ids are unsigned 64-bit: kept as text in SQLite
    name: str
    project: str
    researcher: str
    dataset: str
    status: str
    reason: str
    created: float
    finished: float | None
    task: Task
    record: RunRecord


class Store:
    """SQLite for runs, events and sites; ``models/`` for parameter files (npz, by SHA-256)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "models").mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "coordinator.sqlite", check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)
        self._db.commit()

    # -- models ---------------------------------------------------------------------
    def put_model(self, blob: bytes) -> str:
        sha = hashlib.sha256(blob).hexdigest()
        path = self.model_path(sha)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            tmp.replace(path)
        return sha

    @property
    def uploads(self) -> Path:
        """Where an uploaded model is written while it arrives (beside the models: one rename stores it)."""
        return self.root / "models"

    def adopt_model(self, upload: Path, sha: str) -> str:
        """Keep the file ``upload`` (in :attr:`uploads`, its SHA-256 ``sha`` checked by the caller) as that model."""
        path = self.model_path(sha)
        if path.exists():
            upload.unlink(missing_ok=True)
        else:
            upload.replace(path)
        return sha

    def uploaded_since(self, owner: str, since: float) -> int:
        """The bytes of models ``owner`` uploaded from ``since`` on (the quota counts every upload)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(bytes), 0) FROM uploads WHERE owner = ? AND at >= ?", (owner, since)
            ).fetchone()
        return int(row[0])

    def record_upload(self, owner: str, sha: str, size: int, at: float) -> None:
        with self._lock:
            self._db.execute("INSERT INTO uploads (owner, sha, bytes, at) VALUES (?, ?, ?, ?)", (owner, sha, size, at))
            self._db.commit()

    def model_path(self, sha: str) -> Path:
        if not (len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise KeyError(sha)
        return self.root / "models" / f"{sha}.npz"

    # -- runs -----------------------------------------------------------------------
    def create_run(self, run_id: str, task: Task, record: RunRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO runs (run_id, name, project, researcher, dataset, status, created, task, record)"
                " VALUES (?, ?, ?, ?, ?, 'submitted', ?, ?, ?)",
                (
                    run_id,
                    task.name,
                    task.project,
                    task.researcher,
                    task.dataset,
                    time.time(),
                    task.model_dump_json(exclude_unset=True),
                    json.dumps(record.as_dict()),
                ),
            )
            self._db.commit()

    def set_flower_run(self, run_id: str, flower_run_id: int) -> None:
        with self._lock:
            self._db.execute("UPDATE runs SET flower_run_id = ? WHERE run_id = ?", (str(flower_run_id), run_id))
            self._db.commit()

    def set_status(self, run_id: str, status: str, reason: str = "") -> bool:
        """Move a run to ``status``; a finished run never changes again. True if it changed."""
        with self._lock:
            row = self._db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None or row["status"] in TERMINAL or row["status"] == status:
                return False
            finished = time.time() if status in TERMINAL else None
            self._db.execute(
                "UPDATE runs SET status = ?, reason = ?, finished = ? WHERE run_id = ?",
                (status, reason, finished, run_id),
            )
            self._db.commit()
            return True

    def update_record(self, run_id: str, **fields: Any) -> None:
        """Set ``fields`` of a run's record (``RunRecord.updated``: typed as when a record is read)."""
        with self._lock:
            row = self._db.execute("SELECT record FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            record = RunRecord.model_validate_json(row["record"]).updated(**fields)
            self._db.execute("UPDATE runs SET record = ? WHERE run_id = ?", (json.dumps(record.as_dict()), run_id))
            self._db.commit()

    def run(self, run_id: str, project: str | None = None) -> StoredRun | None:
        """The run ``run_id`` (only if it is ``project``'s, when one is named: one lookup either way)."""
        if project is None:
            row = self._db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        else:
            row = self._db.execute("SELECT * FROM runs WHERE run_id = ? AND project = ?", (run_id, project)).fetchone()
        return None if row is None else self._stored(row)

    def runs(self, project: str | None = None) -> list[StoredRun]:
        sql, args = "SELECT * FROM runs", tuple[str, ...]()
        if project is not None:
            sql, args = sql + " WHERE project = ?", (project,)
        rows = self._db.execute(sql + " ORDER BY created", args).fetchall()
        return [self._stored(r) for r in rows]

    def unfinished_runs(self) -> list[StoredRun]:
        rows = self._db.execute(
            f"SELECT * FROM runs WHERE status NOT IN ({', '.join('?' * len(TERMINAL))})", tuple(TERMINAL)
        ).fetchall()
        return [self._stored(r) for r in rows]

    @staticmethod
    def _stored(row: sqlite3.Row) -> StoredRun:
        return StoredRun(
            run_id=row["run_id"],
            flower_run_id=None if row["flower_run_id"] is None else int(row["flower_run_id"]),
            name=row["name"],
            project=row["project"],
            researcher=row["researcher"],
            dataset=row["dataset"],
            status=row["status"],
            reason=row["reason"],
            created=row["created"],
            finished=row["finished"],
            task=Task.model_validate_json(row["task"]),
            record=RunRecord.model_validate_json(row["record"]),
        )

    # -- events ---------------------------------------------------------------------
    def add_events(self, run_id: str, events: list[dict[str, Any]]) -> int:
        now = time.time()
        with self._lock:
            for event in events:
                self._db.execute(
                    "INSERT INTO events (run_id, ts, payload) VALUES (?, ?, ?)",
                    (run_id, now, json.dumps(event)),
                )
            self._db.commit()
            return int(self._db.execute("SELECT MAX(seq) FROM events").fetchone()[0] or 0)

    def events(self, run_id: str, after: int = 0) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT seq, ts, payload FROM events WHERE run_id = ? AND seq > ? ORDER BY seq",
            (run_id, after),
        ).fetchall()
        return [{"seq": r["seq"], "ts": r["ts"], **json.loads(r["payload"])} for r in rows]

    # -- sites ----------------------------------------------------------------------
    def upsert_site(self, site: str, node_id: int | None, info: dict[str, Any], state: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO sites (site, node_id, info, last_seen, state) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(site) DO UPDATE SET node_id = excluded.node_id, info = excluded.info,"
                " last_seen = excluded.last_seen, state = excluded.state",
                (site, None if node_id is None else str(node_id), json.dumps(info), time.time(), state),
            )
            self._db.commit()

    def touch_site(self, site: str, state: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE sites SET last_seen = ?, state = ? WHERE site = ?", (time.time(), state, site)
            )
            self._db.commit()
            return cur.rowcount > 0

    def sites(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM sites ORDER BY site").fetchall()
        return [
            {**dict(r), "node_id": None if r["node_id"] is None else int(r["node_id"]), "info": json.loads(r["info"])}
            for r in rows
        ]
