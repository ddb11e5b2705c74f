"""What a run's task process is given when the run adopts it, and nothing before: made by the agent, sent by the
task service (``process.Worker.adopt``), taken by the process (``worker``).

A warm spare has imported torch and holds nothing of the site: not its catalog, no descriptor, no path of its data.
When a run adopts it, it is given the run's own: the site's name, the run's dataset entry (its paths and the whole
dataset's counts left out), the cohort's name, and the run's rows only, already split as the cell gets them
(``site_agent.data.formats.handed``, made by the agent, which reads and checks the site's files), in a sealed
in-memory file passed over their connection (``site_agent.sandbox.handed``).

A run whose cell reads files by their own path (an imaging run's cases) gets a process started for it alone, with
exactly those files bound into its sandbox (:func:`binding`): a spare's sandbox is built before any run is known, and
Landlock can narrow what a process reaches, never widen it. That costs the run's first step a process start (Python,
the sandbox, torch: seconds); table runs adopt the spare. A process serves one run: the service never hands it to a
second, and the process refuses a second adoption.

This module imports nothing that starts threads: the task process reads it before its sandbox.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from site_agent.data.catalog import DatasetEntry, Handed, SiteConfig
from site_agent.sandbox.handed import sealed, take


@dataclass(frozen=True)
class Adoption:
    """What a run's task process is given when the run adopts it: ``dataset``, the run's dataset entry at this site
    (None: the site does not hold it, which every step then says), ``cohort``, its cohort's name ("": none), and
    ``handed``, the run's rows only and the files its cell reads by path."""

    site: str
    dataset: DatasetEntry | None
    cohort: str
    handed: Handed

    def settings(self) -> dict[str, Any]:
        """What the adoption message says (JSON): the site's name, the cohort's name, and the entry without its paths
        or the whole dataset's counts (a cohort run is told of its own rows only)."""
        entry = None if self.dataset is None else asdict(untold(self.dataset))
        return {"site": self.site, "dataset": entry, "cohort": self.cohort}


def untold(entry: DatasetEntry) -> DatasetEntry:
    """A dataset's entry as a run's task process is told it: no path (of its file, index or manifest) and none of the
    whole dataset's counts; its name, format, schema and fingerprint."""
    return replace(entry, path="", source="", rows=0, train_rows=0, test_rows=0, inclusion=None)


def run_site(root: Path, settings: dict[str, Any]) -> SiteConfig:
    """The site as a run's task process knows it, from the adoption message: its name and the run's dataset alone."""
    fields = settings.get("dataset")
    if fields is None:
        return SiteConfig(root=root, name=str(settings["site"]))
    entry = DatasetEntry(**{**fields, "columns": tuple(fields["columns"]), "dtypes": tuple(fields["dtypes"])})
    return SiteConfig(root=root, name=str(settings["site"]), datasets={entry.name: entry})


def binding(files: tuple[Path, ...]) -> tuple[list[str], list[int]]:
    """What starts a task process for the one run whose ``files`` it binds: its arguments and the descriptor they
    name (a sealed list of the files), which the caller closes once the process has started; nothing for a spare."""
    if not files:
        return [], []
    listed = sealed(json.dumps([str(path) for path in files]).encode(), "flip-bind")
    return ["--bind-fd", str(listed)], [listed]


def bound_files(fd: int | None) -> list[Path]:
    """In the task process, before its sandbox: the files it was started to bind (:func:`binding`), its descriptor
    read and closed; none for a spare, which any run may adopt."""
    return [] if fd is None else [Path(path) for path in json.loads(take(fd))]
