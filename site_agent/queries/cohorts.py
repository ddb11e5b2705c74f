"""A site's named cohorts: the rows a project's filter matched, frozen when it was made, for training.

``%flip_cohort NAME`` freezes, at each site, the positions of the rows its filter matches in the
registered table, with the table's fingerprint and a keyed hash of the rows, in
``<site>/cohorts/PROJECT/NAME.json``. Only the count (under disclosure control) and the hash leave.
A name is kept for good: made again with the same dataset and filter over the same file it is the
same cohort (a notebook run again gets it back); with anything else it is refused, so that a run
that names a cohort trains on exactly the rows that were counted. The rows never leave the site,
and the hash is keyed with the site's own secret, so it says nothing about which rows they are.
Nothing here talks to the network.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from flip_core.errors import FlipError
from site_agent.data.catalog import CatalogError, check_name
from site_agent.queries.ledger import site_key

COHORT_DIR = "cohorts"


class CohortRefused(FlipError):
    """A cohort cannot be made or used here; the sentence says why."""


@dataclass(frozen=True)
class Cohort:
    name: str
    project: str
    dataset: str
    where: str
    fingerprint: str  # the dataset file's, when the cohort was frozen
    rows: tuple[int, ...]
    hash: str
    index: tuple[str, ...] = ()  # each row's index date (ISO), where the definition gives one (a Circe cohort's)


def cohort_hash(key: bytes, fingerprint: str, rows: tuple[int, ...], index: tuple[str, ...] = ()) -> str:
    body = fingerprint.encode() + b"\0" + ",".join(map(str, rows)).encode()
    if index:
        body += b"\0" + ",".join(index).encode()
    return "hmac-sha256:" + hmac.new(key, body, hashlib.sha256).hexdigest()


def _well_formed(cohort: Cohort) -> bool:
    """Its rows are whole numbers and its index dates ISO dates, one a row (or none): only then is the text
    :func:`cohort_hash` keys theirs alone (a last row of text holding a NUL and the dates, and no dates, reads the
    same to it as the rows with their dates)."""

    def is_date(text: object) -> bool:
        try:
            return isinstance(text, str) and date.fromisoformat(text).isoformat() == text
        except ValueError:
            return False

    rows_whole = all(type(r) is int for r in cohort.rows)
    return rows_whole and (
        not cohort.index or (len(cohort.index) == len(cohort.rows) and all(map(is_date, cohort.index)))
    )


class CohortStore:
    """The cohorts of every project at one site (thread-safe; each cohort a file of its own)."""

    def __init__(self, site_dir: Path) -> None:
        self.dir = Path(site_dir) / COHORT_DIR
        self.key = site_key(site_dir)
        self._lock = threading.Lock()

    def _path(self, project: str, name: str) -> Path:
        try:  # the catalog's rule for names: nothing that reaches out of the cohorts folder
            return self.dir / check_name("project", project) / f"{check_name('cohort', name)}.json"
        except CatalogError as exc:
            raise CohortRefused(str(exc)) from None

    def freeze(
        self,
        project: str,
        name: str,
        dataset: str,
        where: str,
        fingerprint: str,
        rows: list[int],
        index: dict[int, str] | None = None,
    ) -> Cohort:
        """The cohort ``name`` of ``project``: made now, or the one made before with the same definition.
        ``index``: each row's index date (a Circe cohort's start), frozen with it."""
        frozen = tuple(sorted(int(r) for r in rows))
        dates = tuple(index[r] for r in frozen) if index else ()
        made = Cohort(
            name, project, dataset, where, fingerprint, frozen, cohort_hash(self.key, fingerprint, frozen, dates), dates
        )
        path = self._path(project, name)
        with self._lock:
            if path.exists():
                known = self.load(project, name)
                if (known.dataset, known.where, known.fingerprint, known.rows, known.index) != (
                    dataset,
                    where,
                    fingerprint,
                    frozen,
                    dates,
                ):
                    raise CohortRefused(
                        f"cohort {name!r} of project {project!r} already exists with another definition "
                        f"({known.dataset} where {known.where or 'every row'}); choose another name"
                    )
                return known
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            body = {**made.__dict__, "rows": list(frozen), "index": list(dates), "created": time.time()}
            tmp = path.with_suffix(".tmp")
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
                json.dump(body, fh)
            tmp.replace(path)
        return made

    def load(self, project: str, name: str) -> Cohort:
        path = self._path(project, name)
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise CohortRefused(f"there is no cohort {name!r} of project {project!r} here") from None
        return Cohort(
            body["name"],
            body["project"],
            body["dataset"],
            body["where"],
            body["fingerprint"],
            tuple(body["rows"]),
            body["hash"],
            tuple(body.get("index", ())),
        )

    def checked(self, project: str, name: str, dataset: str, fingerprint: str) -> Cohort:
        """The cohort a run or a query of ``project`` on ``dataset`` uses, read once and checked: of that dataset, of
        its file as it is now, and its rows and index dates as they were frozen (the keyed hash); refused otherwise."""
        cohort = self.load(project, name)
        if cohort.dataset != dataset:
            raise CohortRefused(f"cohort {name!r} is of dataset {cohort.dataset!r}, not {dataset!r}")
        if cohort.fingerprint != fingerprint:
            raise CohortRefused(f"the file of dataset {dataset!r} changed since cohort {name!r} was made")
        if (
            not _well_formed(cohort)
            or cohort_hash(self.key, cohort.fingerprint, cohort.rows, cohort.index) != cohort.hash
        ):
            raise CohortRefused(f"cohort {name!r} was altered since it was made (its hash does not match)")
        return cohort

    def rows_for(self, project: str, name: str, dataset: str, fingerprint: str) -> list[int]:
        """The frozen rows a run of ``project`` on ``dataset`` trains on (:meth:`checked`)."""
        return list(self.checked(project, name, dataset, fingerprint).rows)

    def index_for(self, project: str, name: str, dataset: str, fingerprint: str) -> list[str] | None:
        """The frozen rows' index dates (:meth:`checked`; None: the cohort has none)."""
        return list(self.checked(project, name, dataset, fingerprint).index) or None
