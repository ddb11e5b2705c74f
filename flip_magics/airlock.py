"""The airlock as the notebook sees it: a request for an item a site's rules hold back, its state, and the item once
a person at the site released it (``flip_core.airlock``).

``FlipClient.request_release`` asks; ``FlipClient.requests`` lists the caller's requests with their states;
``FlipClient.released`` fetches one released item, checks its site's signature and hash (and that the key is the one
the hub registered for that site), and gives it back as an object: a traceback as text, a query result as a
DataFrame. No IPython here.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from flip_core.airlock import ItemKind, Release, ReleaseState, verify
from flip_core.errors import FlipError


class NotReleased(FlipError):
    """An item asked for before its site released it (or one the site refused)."""


@dataclass
class AirlockRequest:
    """One request as the hub and its site tell it now."""

    request_id: str
    site: str
    item: str
    purpose: str
    state: str
    reason: str = ""
    about: str = ""
    asked_at: float = 0.0
    decided_at: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_view(cls, view: dict[str, Any]) -> AirlockRequest:
        names = ("request_id", "site", "item", "purpose", "state", "reason", "about", "asked_at", "decided_at")
        return cls(**{k: view.get(k, "" if k not in ("asked_at", "decided_at") else 0.0) for k in names}, raw=view)

    @property
    def released(self) -> bool:
        return self.state == ReleaseState.RELEASED

    def sentence(self) -> str:
        """The request's state in one line, as ``%flip_request`` and ``flip run`` print it."""
        said = f"request {self.request_id} to {self.site} for a {self.item} is {self.state}"
        if self.state == ReleaseState.PENDING:
            return said + f": the site's admin reviews it (`flip-site airlock show {self.request_id}` at {self.site})"
        if self.state == ReleaseState.REFUSED:
            return said + f": {self.reason}" if self.reason else said
        if self.state == ReleaseState.RELEASED:
            return said + f": fetch it with %flip_released {self.request_id} (or flip airlock get {self.request_id})"
        return said


def requests_frame(requests: list[AirlockRequest]) -> pd.DataFrame:
    """The caller's requests, one row each, newest first (what ``%flip_requests`` shows)."""
    rows = [
        {
            "request": r.request_id,
            "site": r.site,
            "item": r.item,
            "state": r.state,
            "asked": _when(r.asked_at),
            "decided": _when(r.decided_at) if r.decided_at else "",
            "reason": r.reason,
            "purpose": r.purpose,
        }
        for r in requests
    ]
    columns = ["request", "site", "item", "state", "asked", "decided", "reason", "purpose"]
    return pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class ReleasedItem:
    """A released item: its bytes as the site signed them, the signed release, and the item as an object."""

    release: Release
    content: bytes

    @property
    def value(self) -> str | pd.DataFrame | EvaluationReport:
        """The traceback as text, a query result as a DataFrame, an evaluation's report as an
        :class:`EvaluationReport`."""
        text = self.content.decode("utf-8")
        if self.release.item == ItemKind.QUERY:
            return pd.read_csv(io.StringIO(text))
        if self.release.item == ItemKind.EVALUATION:
            return EvaluationReport.from_json(text)
        return text

    def caption(self) -> str:
        r = self.release
        return (
            f"released by {r.site} ({r.checker}, {_when(r.released_at)}) for request {r.request_id}: {r.purpose}; "
            f"signed by its key, {r.sha256[:19]}..."
        )


@dataclass(frozen=True)
class EvaluationReport:
    """A site's report of a run's final evaluation (the cell's ``report()``), as its site released it."""

    metrics: dict[str, float]
    tables: dict[str, pd.DataFrame]
    figures: dict[str, bytes]  # PNG, as the site re-encoded them
    error: str = ""  # a report() that failed: what the site kept instead

    @classmethod
    def from_json(cls, text: str) -> EvaluationReport:
        raw = json.loads(text)
        tables = {
            name: pd.DataFrame(t["rows"], columns=t["columns"], index=t["index"])
            for name, t in (raw.get("tables") or {}).items()
        }
        figures = {name: base64.b64decode(png) for name, png in (raw.get("figures") or {}).items()}
        error = str(raw.get("error") or "") + (f"\n{raw['traceback']}" if raw.get("traceback") else "")
        return cls(dict(raw.get("metrics") or {}), tables, figures, error)


def released_item(view: dict[str, Any]) -> ReleasedItem:
    """The item in a ``GET /api/airlock/ID`` answer, its signature and hash checked; :class:`NotReleased` when
    there is none yet, and ``flip_core.airlock.ReleaseInvalid`` when the check fails."""
    request = AirlockRequest.from_view(view)
    if not request.released or "content" not in view:
        raise NotReleased(request.sentence())
    release = Release.from_dict(view["release"])
    content = base64.b64decode(view["content"])
    verify(release, content, str(view.get("registered_key") or ""))
    return ReleasedItem(release, content)


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else ""
