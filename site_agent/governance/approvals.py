"""Code approvals at a site: tasks waiting for the admin, and the admin's answers.

One JSON file per (project, code hash) under ``<site>/approvals/``: ``pending/`` holds what a
task brought (who, project, dataset, the source itself, its hash, when first seen),
``approved/`` and ``rejected/`` the admin's answer (who, when, the reason for a rejection).
An answer covers every rerun of the same normalised source in that project. The site agent
and the ``flip-site`` CLI share the directory; every write is a rename, so a reader never
sees half a file.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from flip_core.errors import FlipError
from site_agent.governance.policy import Approval

DIRNAME = "approvals"
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}\Z")


class ApprovalError(FlipError):
    """An admin command that cannot be done, said as a sentence."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _key(project: str, source_hash: str) -> str:
    if not _HASH.match(source_hash):
        raise ApprovalError(f"not a code hash: {source_hash!r}")
    return f"{project}--{source_hash.removeprefix('sha256:')}.json"


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


class ApprovalStore:
    def __init__(self, site_dir: Path) -> None:
        self.root = Path(site_dir) / DIRNAME

    def _path(self, state: str, project: str, source_hash: str) -> Path:
        return self.root / state / _key(project, source_hash)

    def approval(self, project: str, source_hash: str) -> Approval:
        """The admin's answer for this code in this project, if any."""
        for state in (REJECTED, APPROVED):  # a rejection after an approval wins
            path = self._path(state, project, source_hash)
            if path.exists():
                return Approval(state, json.loads(path.read_text()).get("reason", ""))
        return Approval()

    def request(
        self,
        *,
        project: str,
        researcher: str,
        dataset: str,
        source: str,
        source_hash: str,
        run_id: str,
        covariates: dict[str, Any] | None = None,
    ) -> bool:
        """Record a task waiting for approval; True the first time this code asks in this project. ``covariates``:
        the per-person table it declares of an OMOP dataset (part of its hash: the admin approves both)."""
        path = self._path(PENDING, project, source_hash)
        if path.exists():
            return False
        _write(
            path,
            {
                "project": project,
                "researcher": researcher,
                "dataset": dataset,
                "source": source,
                "hash": source_hash,
                "run_id": run_id,
                **({"covariates": covariates} if covariates is not None else {}),
                "requested": _now(),
            },
        )
        return True

    def pending(self) -> list[dict[str, Any]]:
        """Tasks waiting for an answer, oldest first."""
        folder = self.root / PENDING
        found = [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []
        return sorted(found, key=lambda r: (r["requested"], r["project"]))

    def _find(self, hash_prefix: str, project: str | None) -> dict[str, Any]:
        wanted = hash_prefix if hash_prefix.startswith("sha256:") else "sha256:" + hash_prefix
        matches = [r for r in self.pending() if r["hash"].startswith(wanted) and project in (None, r["project"])]
        if not matches:
            raise ApprovalError(
                f"no pending task has code hash {hash_prefix}"
                + (f" in project {project!r}" if project else "")
                + " (`flip-site requests DIR` lists them)"
            )
        if len({(r["project"], r["hash"]) for r in matches}) > 1:
            which = ", ".join(f"{r['project']} {r['hash'][:19]}" for r in matches)
            raise ApprovalError(
                f"{hash_prefix} matches more than one pending task ({which}): give more of the hash, or --project"
            )
        return matches[0]

    def answer(
        self, hash_prefix: str, state: str, *, reason: str = "", project: str | None = None, by: str | None = None
    ) -> dict[str, Any]:
        """Approve or reject a pending task's code; returns the record written."""
        if state not in (APPROVED, REJECTED):
            raise ApprovalError(f"unknown answer {state!r}")
        if state == REJECTED and not reason.strip():
            raise ApprovalError("a rejection needs a reason (--reason TEXT): the researcher is shown it")
        request = self._find(hash_prefix, project)
        record = {
            "project": request["project"],
            "hash": request["hash"],
            "researcher": request["researcher"],
            "dataset": request["dataset"],
            "by": by or getpass.getuser(),
            "at": _now(),
        }
        if reason:
            record["reason"] = reason.strip()
        _write(self._path(state, request["project"], request["hash"]), record)
        other = REJECTED if state == APPROVED else APPROVED
        self._path(other, request["project"], request["hash"]).unlink(missing_ok=True)
        self._path(PENDING, request["project"], request["hash"]).unlink(missing_ok=True)
        return record
