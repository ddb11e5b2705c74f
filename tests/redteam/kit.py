"""What every attack of the red team uses. The federation (``conftest.redteam``): `flip up` as in development
(two hospitals, project 'default' auto-approved, the default policy), real processes, shared by every attack in this
folder to keep the suite's time down.

Every attack asserts two things: that nothing it was after reached the researcher (the notebook's events, the run's
record and view, the sentences it was told, what the hub stored), and that the site still serves the next run
(:func:`still_serves`; and at the end of each module, :func:`still_trains`: an honest run trains at every site).
Attacks are named for what they try; each module is one class of channel.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flip_core.errors import FlipError
from flip_core.util import wait_until
from flip_magics.client import FlipClient, RunHandle

from helpers import TINY_CELL

SITES = ("Cleveland", "Hungary")
MEMORY_LIMIT_MB = 2048  # a run's memory at the red team's sites (the default is 4096; its scratch is 1024 of it)
RUNS_LIMIT = 2  # runs holding a task process at once at each of the red team's sites (the default is 8)
SECOND_PROJECT = "second"  # a project the red team's sites also admit, for a researcher who is in both
NOISY_PROJECT = "noisy"  # one whose counts move (cell-key perturbation): the others' leave exact
PRIVATE_PROJECT = "private"  # one whose queries are answered under differential privacy (epsilon 1 each)
PRIVATE_QUERIES = 4  # its budget at each site: four such queries
# What a hostile cell wraps its loot in, "LEAK" and at least one digit (a count, an age): its shape is searched for in
# everything the researcher got. An attack's source never holds that shape itself (it builds it: "LEAK" + str(n)).
MARKER = re.compile(r"LEAK[0-9][0-9A-Za-z_.:-]*")


def hostile(train_body: str) -> str:
    """TINY_CELL whose train() runs ``train_body`` first (its lines, indented here); ``data``, ``model`` and
    ``config`` are in scope, and what it returns (if it returns) is the step's result."""
    body = "\n".join("    " + line for line in train_body.strip().splitlines())
    return (
        TINY_CELL + f"\n_honest_train = train\n\ndef train(model, data, config):\n{body}\n"
        "    return _honest_train(model, data, config)\n"
    )


@dataclass
class RedTeam:
    """The shared federation and what an attack needs of it."""

    home: Path
    connection: dict[str, Any]

    def client(self) -> FlipClient:
        return FlipClient(self.connection["coordinator_url"], self.connection["token"])

    @property
    def sites_dir(self) -> Path:
        return Path(self.connection["federation"]) / "sites"

    def train(self, source: str, name: str, **options: Any) -> Outcome:
        """Run ``source`` for one round at both sites and gather everything the researcher could see of it."""
        client = self.client()
        said: list[str] = []
        handle: RunHandle | None = None
        try:
            handle = client.train(
                source, dataset="heart-disease", rounds=options.pop("rounds", 1), seed=0, name=name, **options
            )
            handle.wait(180)
        except FlipError as exc:  # a refusal or a failed run: its sentence is part of what the researcher saw
            said.append(str(exc))
        return Outcome(client, handle, said)


@dataclass
class Outcome:
    """A run as the researcher sees it: its events, its view and record at the hub, and the sentences said."""

    client: FlipClient
    handle: RunHandle | None
    said: list[str]

    @property
    def status(self) -> str:
        return "" if self.handle is None else str(self.handle.status)

    def everything(self) -> str:
        """All the researcher got, as one text: the events (site details, metric names and values, devices, ...),
        the coordinator's view of the run with its record, the history, and every sentence it was told."""
        parts = list(self.said)
        if self.handle is not None:
            parts.append(json.dumps(list(self.handle.events), default=str))
            view = self.client.run(self.handle.run_id)
            view.pop("source", None)  # the researcher's own cell
            parts.append(json.dumps(view, default=str))
            parts.append(self.handle.history.to_csv())
            parts.append(str(self.handle.reason or ""))
        return "\n".join(parts)

    def leaked(self) -> list[str]:
        """Every marker-shaped string that reached the researcher (empty: nothing the cell wrapped left)."""
        return sorted(set(MARKER.findall(self.everything())))


def still_serves(team: RedTeam) -> None:
    """After an attack: every site's agent is online again with a task process ready for the next run (its spare,
    torch loaded). That the next run then trains is shown by the next attack's run and, at the end of each module,
    by :func:`still_trains` (an honest run after each attack would double the suite's time)."""
    client = team.client()

    def ready() -> bool:
        sites = {s["site"]: s for s in client.sites()}
        return all(name in sites and sites[name]["status"] == "online" and sites[name]["warm"] for name in SITES)

    assert wait_until(ready, 120), client.sites()


def still_trains(team: RedTeam) -> None:
    """After a module's attacks: every site takes part in an honest run again, to the end."""
    outcome = team.train(TINY_CELL, "honest-after-attacks")
    assert outcome.status == "completed", outcome.said
    assert outcome.handle is not None
    trained = set(outcome.handle.history.query("phase == 'train' and site != 'global'").site)
    assert trained == set(SITES), trained
