"""The site's side of the airlock's traffic: a researcher's request held for review, and the state of their requests.

A request (a query of kind ``release``, ``flip_core.airlock.ReleaseAsk`` in its ``airlock`` field) is checked as
any query is (the project, the researcher, the dataset; the site's policy may refuse the kind outright), its item
made here exactly as it would leave (a run's failed step's traceback, as the task process wrote it; or the exact
per-site answer to a query, as CSV, no cell withheld or moved), the automatic checks run on it
(``site_agent.disclosure.checks``), and it is held in the site's airlock (``site_agent.governance.airlock``) for its
admin. What the reply says is only the request's state. A query of kind ``releases`` asks the states of the
researcher's own requests and, once released, fetches an item with its signed release.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from flip_core.airlock import (
    MAX_ITEM_BYTES,
    MAX_LISTED,
    MAX_PENDING,
    ItemKind,
    ReleaseAsk,
    ReleaseState,
    purpose_problem,
)
from flip_core.errors import FlipError
from flip_core.filters import parse as parse_filter
from flip_core.query import MISSING_LEVEL, QUANTILE_NAMES, QUANTILES, QueryKind, QueryReply, QueryRequest, level_key
from flip_core.status import StepStatus
from site_agent.data.catalog import SiteConfig
from site_agent.data.image_datasets import IMAGE_KEY, PATIENT_KEY
from site_agent.disclosure.checks import Check, as_records, count_checks, magnitude_checks, text_checks
from site_agent.disclosure.report_review import clean_report, report_checks
from site_agent.governance.airlock import AirlockError
from site_agent.governance.gate import Governance
from site_agent.governance.policy import REFUSE, TaskFacts, decide, query_columns_refused
from site_agent.queries.filtering import mask
from site_agent.queries.ledger import QueryLedger, Scope
from site_agent.queries.statistics import QueryRefused, check_columns

if TYPE_CHECKING:
    import pandas as pd

Tables = Callable[[str], "tuple[pd.DataFrame, np.ndarray]"]
IDENTIFYING_SHARE = 0.9  # a column whose values are this nearly all distinct names patients (or their files)
_NOTHING_KEPT = {
    ItemKind.TRACEBACK: "no step of your run {run!r} failed here: there is no traceback to ask for",
    ItemKind.EVALUATION: (
        "your run {run!r} left no report here: a cell that defines report(model, data, config) has one kept from "
        "its final evaluation at each site"
    ),
}
_APART = "no released answer to this project or researcher counts rows this close to these"
LONG_VALUE = 4  # values this long (or with a decimal point) are looked for in free text; shorter ones are everywhere


class ReleaseDesk:
    """Holds researchers' requests for this site's airlock and tells them their state (thread-safe: the airlock
    locks each request, the tables are the query service's)."""

    def __init__(self, site: SiteConfig, governance: Governance, tables: Tables, ledger: QueryLedger) -> None:
        self.site = site
        self.governance = governance
        self.tables = tables
        self.ledger = ledger

    def reply(self, request: QueryRequest) -> QueryReply:
        try:
            if request.kind == QueryKind.RELEASES:
                return self._states(request)
            return self._hold(request)
        except (FlipError, KeyError, ValueError, TypeError) as exc:
            why = str(exc) if isinstance(exc, FlipError) else f"a malformed request ({type(exc).__name__})"
            return QueryReply(self.site.name, StepStatus.REFUSED, f"{self.site.name}: {why}")

    # -- a request ------------------------------------------------------------------------------------------------
    def _hold(self, request: QueryRequest) -> QueryReply:
        name, policy, airlock = self.site.name, self.governance.policy, self.governance.airlock
        ask = ReleaseAsk.from_dict(request.airlock)
        if problem := purpose_problem(ask.purpose):  # the hub checked it too; the site trusts no one's check
            raise AirlockError(f"the request's purpose: {problem}")
        waiting = [h for h in airlock.held(ReleaseState.PENDING) if h.researcher == request.researcher]
        if len(waiting) >= MAX_PENDING:
            raise AirlockError(
                f"{len(waiting)} of your requests wait for review here already; ask again once the site has "
                f"decided some (at most {MAX_PENDING} wait at once)"
            )
        if ask.item in (ItemKind.TRACEBACK, ItemKind.EVALUATION):
            kept = airlock.kept_for(ask.item, ask.run)
            facts = {} if kept is None else kept[0]
            if (facts.get("researcher"), facts.get("project")) != (request.researcher, request.project):
                raise AirlockError(_NOTHING_KEPT[ask.item].format(run=ask.run))
            dataset, kind = str(facts["dataset"]), "train"
        else:
            dataset, kind = request.dataset, "query"
        # who may ask: the project, the researcher and the dataset as a step or query of theirs would be decided (the
        # code's approval and differential privacy are the run's: the item is a person's to review, not the run's)
        asker = TaskFacts(request.project, request.researcher, dataset, source_hash="", kind=kind, dp_epsilon=0.0)
        decision = decide(policy, asker)
        if decision.verdict == REFUSE:
            return QueryReply(name, StepStatus.REFUSED, decision.reason)
        if refused := policy.refuses_release(request.project, str(ask.item)):
            held = airlock.hold(ask, request.researcher, request.project, b"", about={}, checks=[], refused=refused)
            return _state_reply(name, held.request_id, str(held.state), held.reason)
        rows: list[int] | None = None
        if ask.item == ItemKind.TRACEBACK:
            assert kept is not None
            facts, content = kept
            about = {k: facts.get(k) for k in ("run", "round", "phase", "dataset", "error_type", "error_line")}
            checks = self._text_checks(content.decode("utf-8", "replace"), dataset)
        elif ask.item == ItemKind.EVALUATION:
            assert kept is not None
            facts, content = kept
            about = {k: facts.get(k) for k in ("run", "round", "phase", "dataset")}
            content, dropped = clean_report(content)
            threshold = policy.threshold(request.project)
            found = report_checks(content, threshold, dropped, lambda text: self._found(text, dataset))
            checks = as_records(found)
        else:
            content, about, checks, rows = self._query_item(request, ask)
        held = airlock.hold(ask, request.researcher, request.project, content, about=about, checks=checks)
        if rows is not None:
            airlock.keep_rows(held.request_id, rows)
        return _state_reply(name, held.request_id, str(held.state), "")

    def _text_checks(self, text: str, dataset: str) -> list[dict[str, Any]]:
        return as_records(self._found(text, dataset))

    def _found(self, text: str, dataset: str) -> list[Check]:
        """The free-text checks over ``text`` with what this site knows of ``dataset``: its identifying columns'
        values, its other long values, the site's own folders."""
        identifiers: dict[str, set[str]] = {}
        values: dict[str, set[str]] = {}
        if dataset in self.site.datasets:
            table, _ = self.tables(dataset)
            for column in table.columns:
                series = table[column].dropna()
                if series.empty:
                    continue
                distinct = {_text(v) for v in series.unique()}
                named = str(column) in (PATIENT_KEY, IMAGE_KEY) or len(distinct) >= IDENTIFYING_SHARE * len(series)
                if named and len(series) >= 2:
                    identifiers[str(column)] = distinct
                else:
                    values[str(column)] = {v for v in distinct if len(v) >= LONG_VALUE or "." in v}
        folders = [str(self.site.root)] + [str(d.path) for d in self.site.datasets.values()]
        return text_checks(text, identifiers=identifiers, values=values, paths=folders)

    def _query_item(
        self, request: QueryRequest, ask: ReleaseAsk
    ) -> tuple[bytes, dict[str, Any], list[dict[str, Any]], list[int]]:
        """The exact per-site answer to the request's query, as CSV, and its checks."""
        policy = self.governance.policy
        if request.dataset not in self.site.datasets:
            raise QueryRefused(f"{self.site.name} does not hold {request.dataset!r}")
        table, keys = self.tables(request.dataset)
        statistic = QueryKind(ask.statistic)
        query = QueryRequest(
            request.query_id, request.project, request.researcher, request.dataset, statistic, request.columns,
            request.where, request.edges,
        )  # fmt: skip
        where = parse_filter(request.where, [str(c) for c in table.columns])
        named = tuple(sorted(set(request.columns) | set(where.columns())))
        if barred := query_columns_refused(policy, request.project, named):
            raise QueryRefused(barred)
        columns = check_columns(query, table)
        chosen = mask(where, table)
        rows = table[chosen]
        threshold = max(policy.threshold(request.project), request.threshold)
        if statistic == QueryKind.STATS:
            frame = _stats(rows, columns)
            checks = magnitude_checks({c: _numbers(rows[c]) for c in columns}, threshold)
        else:
            every = [str(c) for c in table.columns] if statistic == QueryKind.MISSING and not columns else columns
            frame = _counts(statistic, rows, every, request.edges)
            checks = count_checks(frame, threshold)
        scope = Scope(request.project, request.researcher, request.dataset)
        near = self.ledger.pending(scope, keys, threshold).why(np.flatnonzero(chosen), f"{request.text}: its rows")
        checks.append(Check("differencing", not near, f"within {threshold} rows of {near}" if near else _APART))
        content = frame.to_csv(index=False, lineterminator="\n").encode()
        if len(content) > MAX_ITEM_BYTES:
            raise QueryRefused(f"the result is {len(content)} bytes, more than one request may hold ({MAX_ITEM_BYTES})")
        about = {"query": request.text, "dataset": request.dataset, "statistic": str(statistic), "rows": len(rows)}
        return content, about, as_records(checks), np.flatnonzero(chosen).tolist()

    # -- their states -----------------------------------------------------------------------------------------------
    def _states(self, request: QueryRequest) -> QueryReply:
        ids = [str(i) for i in request.airlock.get("requests", [])][:MAX_LISTED]
        states = self.governance.airlock.states(
            ids, request.researcher, request.project, content=bool(request.airlock.get("content"))
        )
        for request_id, state in states.items():
            if "content" in state:
                state["content"] = base64.b64encode(state["content"]).decode()
                self._enter(request_id, request)
        return QueryReply(self.site.name, StepStatus.OK, table={"requests": states})

    def _enter(self, request_id: str, request: QueryRequest) -> None:
        """A delivered query item's rows, into the query ledger: a later query is checked against them as against
        any released answer (the same set again adds nothing)."""
        rows, held = self.governance.airlock.rows(request_id), self.governance.airlock.get(request_id)
        dataset = str(held.about.get("dataset", ""))
        if rows is None or dataset not in self.site.datasets:
            return
        _, keys = self.tables(dataset)
        if max(rows, default=-1) < keys.size:
            row_set = self.ledger.row_set(keys, np.asarray(rows, dtype=np.int64), f"airlock {request_id}: its rows")
            self.ledger.record(Scope(request.project, request.researcher, dataset), [row_set])


def _state_reply(site: str, request_id: str, state: str, reason: str) -> QueryReply:
    return QueryReply(site, StepStatus.OK, table={"request": request_id, "state": state, "reason": reason})


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _numbers(column: pd.Series) -> np.ndarray:
    import pandas as pd

    return pd.to_numeric(column, errors="coerce").dropna().to_numpy(dtype=float)


def _stats(rows: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Per column: rows with a value, rows without, mean, sample std, the least, the quantiles, the most."""
    import pandas as pd

    out = []
    for column in columns:
        values = _numbers(rows[column])
        line: dict[str, Any] = {"column": column, "n": values.size, "missing": int(rows[column].isna().sum())}
        line["mean"] = float(values.mean()) if values.size else None
        line["std"] = float(values.std(ddof=1)) if values.size > 1 else None
        line["min"] = float(values.min()) if values.size else None
        for q, label in zip(QUANTILES, QUANTILE_NAMES, strict=True):
            line[label] = float(np.quantile(values, q)) if values.size else None
        line["max"] = float(values.max()) if values.size else None
        out.append(line)
    return pd.DataFrame(out)


def _counts(kind: QueryKind, rows: pd.DataFrame, columns: list[str], edges: tuple[float, ...]) -> pd.DataFrame:
    """The exact count table: rows by the columns' values (missing as its own level), a histogram's bins, or the
    missing values per column."""
    import pandas as pd

    if kind == QueryKind.MISSING:
        return pd.DataFrame({"column": columns, "count": [int(rows[c].isna().sum()) for c in columns]})
    if kind == QueryKind.HIST:
        values = pd.to_numeric(rows[columns[0]], errors="coerce")
        labels = [f"below {edges[0]:g}"] + [f"{a:g} to {b:g}" for a, b in zip(edges, edges[1:], strict=False)]
        labels += [f"from {edges[-1]:g}", MISSING_LEVEL]
        where = np.searchsorted(np.asarray(edges), values.to_numpy(dtype=float), side="right")
        where[values.isna().to_numpy()] = len(labels) - 1
        counts = np.bincount(where, minlength=len(labels))
        return pd.DataFrame({columns[0]: labels, "count": counts})
    if kind == QueryKind.COUNT and not columns:
        return pd.DataFrame({"count": [len(rows)]})
    levels = rows[columns].astype(object).where(rows[columns].notna(), MISSING_LEVEL).map(_text)
    counted = levels.value_counts(sort=False)
    seen = [sorted(map(str, levels[c].unique()), key=level_key) for c in columns]
    every: pd.MultiIndex = pd.MultiIndex.from_product(seen, names=list(columns))
    return counted.reindex(every, fill_value=0).rename("count").reset_index()  # a zero is a cell too
