"""The site's disclosure report: what each project has been told from each dataset, and what was held back.

For the site's information governance lead (``flip-site disclosure report DIR``): read from the audit log alone
(every query's record holds what left, the refusal's sentence, and the cells the ledger withheld with the set
each came too close to), per project and dataset: who asked, how many queries were answered and refused, how
many values left and how many were withheld, the refusals, and the ledger's withholdings.

Pure over the records: no I/O here (``site_agent.cli`` reads the log and prints).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flip_core.query import QueryKind

SHOWN = 10  # refusals and withholdings listed per project and dataset (the rest counted)


@dataclass
class Told:
    """One project's queries on one dataset at this site."""

    project: str
    dataset: str
    researchers: set[str] = field(default_factory=set)
    answered: int = 0
    refused: int = 0
    released: int = 0  # values that left (counts, statistics)
    withheld: int = 0  # values withheld (small, their complements, the ledger's)
    refusals: list[tuple[str, str]] = field(default_factory=list)  # (query, sentence)
    ledger: list[tuple[str, str]] = field(default_factory=list)  # (set, the released set it came near)
    first: str = ""
    last: str = ""


def _values(table: Any) -> tuple[int, int]:
    """(released, withheld) values of a released table, as the audit log holds it."""
    if not isinstance(table, dict):
        return 0, 0
    if "cells" in table:
        cells = [*table["cells"], table.get("total")]
        return sum(c is not None for c in cells), sum(c is None for c in cells)
    if "columns" in table and isinstance(table["columns"], dict):
        fields = [v for column in table["columns"].values() for k, v in column.items() if k != "sketch"]
        fields.append(table.get("total"))
        return sum(v is not None for v in fields), sum(v is None for v in fields)
    return 0, 0


AIRLOCK_TRAFFIC = (str(QueryKind.RELEASE), str(QueryKind.RELEASES))


def report(records: Iterable[dict[str, Any]], project: str | None = None) -> list[Told]:
    """What the query records say, per project and dataset (``project``: that one only), in order of first query."""
    told: dict[tuple[str, str], Told] = {}
    for record in records:
        if record.get("kind") != "query" or (project is not None and record.get("project") != project):
            continue
        if record.get("statistic") in AIRLOCK_TRAFFIC:  # requests for review, not answers: flip-site airlock lists them
            continue
        key = (str(record.get("project", "")), str(record.get("dataset", "")))
        entry = told.setdefault(key, Told(*key, first=str(record.get("time", ""))))
        entry.researchers.add(str(record.get("researcher", "")))
        entry.last = str(record.get("time", ""))
        if record.get("verdict") == "ok":
            entry.answered += 1
            released, withheld = _values(record.get("released"))
            entry.released += released
            entry.withheld += withheld
        else:
            entry.refused += 1
            entry.refusals.append((str(record.get("text") or record.get("where") or ""), str(record.get("reason", ""))))
        for item in record.get("ledger_withheld") or []:
            entry.ledger.append((str(item.get("set", "")), str(item.get("near", ""))))
    return list(told.values())


def lines(site: str, told: list[Told]) -> list[str]:
    """The report as text."""
    if not told:
        return [f"{site} has answered no query yet"]
    out = [f"Disclosure report of {site} (from its audit log)"]
    for entry in told:
        out += [
            "",
            f"project {entry.project}, dataset {entry.dataset}: asked by {', '.join(sorted(entry.researchers))}, "
            f"{entry.first} to {entry.last}",
            f"  {entry.answered} queries answered, {entry.refused} refused; {entry.released} values left, "
            f"{entry.withheld} withheld ({len(entry.ledger)} of them by the ledger of released sets)",
        ]
        for what, why in entry.refusals[:SHOWN]:
            out.append(f"  refused {what[:100]!r}: {why[:200]}")
        if len(entry.refusals) > SHOWN:
            out.append(f"  ... and {len(entry.refusals) - SHOWN} more refusals")
        for what, near in entry.ledger[:SHOWN]:
            out.append(f"  withheld {what[:100]!r}: within the threshold of {near[:200]}")
        if len(entry.ledger) > SHOWN:
            out.append(f"  ... and {len(entry.ledger) - SHOWN} more withheld by the ledger")
    return out


__all__ = ["Told", "lines", "report"]
