"""The hub's book of named cohorts: per project, which dataset and filter, and what each site froze.

The rows themselves stay at the sites (``site_agent.queries.cohorts``); the hub keeps what they released
when the cohort was made (its count there, under disclosure control, and its keyed hash) so that a
run naming the cohort is sent to the sites that hold it and its record says which rows it trained
on. One JSON file in the coordinator's state folder, written whole.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

COHORTS_FILE = "cohorts.json"


class CohortBook:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / COHORTS_FILE
        self._lock = threading.Lock()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            book: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return book

    def put(
        self, project: str, name: str, dataset: str, where: str, sites: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """Record cohort ``name`` of ``project`` as the sites froze it (``sites``: site → count and hash)."""
        with self._lock:
            book = self._read()
            known = book.setdefault(project, {}).get(name, {})
            entry = {
                "name": name,
                "dataset": dataset,
                "where": where,
                "sites": {**known.get("sites", {}), **sites},
                "created": known.get("created", time.time()),
            }
            book[project][name] = entry
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(book, indent=1))
            os.replace(tmp, self.path)
        return entry

    def get(self, project: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry: dict[str, Any] | None = self._read().get(project, {}).get(name)
        return entry

    def names(self, project: str) -> list[str]:
        with self._lock:
            return sorted(self._read().get(project, {}))
