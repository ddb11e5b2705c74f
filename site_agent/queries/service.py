"""The site's answers to federated queries: policy first, then the filter, the ledger, the statistic.

No researcher code runs for a query: the agent itself reads its table (as the dataset's format
says, ``site_agent.data.formats``), turns the filter's text into a row mask
(``site_agent.queries.filtering``, never evaluated), refuses a cohort too close to one it already
answered (``site_agent.queries.ledger``), computes the statistic under the disclosure threshold
(``site_agent.queries.statistics``) or freezes the rows as a named cohort
(``site_agent.queries.cohorts``), and writes what it released, or why it refused, to the audit log
before the reply leaves. The threshold is the site's for the project, raised (never lowered) by the
one the query asks for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flip_core.covariates import canonical, read_covariates
from flip_core.errors import FlipError
from flip_core.filters import parse as parse_filter
from flip_core.query import QueryKind, QueryReply, QueryRequest, decode_query, encode_reply
from flip_core.status import StepStatus
from site_agent.data.catalog import SiteConfig, open_file, verified_bytes
from site_agent.data.formats import load_table
from site_agent.data.image_datasets import IMAGES, INTENSITY, verify_cases
from site_agent.data.omop import OMOP, circe_persons
from site_agent.data.omop_db import Source
from site_agent.data.omop_features import build, concept_persons
from site_agent.data.readers import ImageError
from site_agent.governance.gate import Governance
from site_agent.governance.policy import Budget, TaskFacts, decide, query_columns_refused
from site_agent.queries.characterise import TOP_WINDOW, top_table, within_cohort
from site_agent.queries.cohorts import CohortRefused, CohortStore
from site_agent.queries.filtering import mask
from site_agent.queries.glm import ModelRefused
from site_agent.queries.image_mock import make_image_mock
from site_agent.queries.image_statistics import voxel_histogram
from site_agent.queries.ledger import QueryLedger, Scope
from site_agent.queries.mock import make_mock
from site_agent.queries.models import answer_model, model_columns
from site_agent.queries.private import answer_privately, check_bounds
from site_agent.queries.releases import ReleaseDesk
from site_agent.queries.statistics import QueryRefused, answer
from site_agent.queries.survival_steps import answer_survival, survival_columns

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

MODELS = (QueryKind.GLM, QueryKind.SURVIVAL)  # exact statistics: no model under differential privacy
DECLARED_KEPT = 4  # declared covariate tables kept (a fit asks for the same one at every step)
MOCK_MAX_ROWS = 2000  # enough to develop a cell against; what travels stays small whatever the table's size


class QueryService:
    """Answers the query messages that reach this site (thread-safe: each message has its own thread)."""

    def __init__(self, site: SiteConfig, governance: Governance, cohorts: CohortStore) -> None:
        self.site = site
        self.governance = governance
        self.cohorts = cohorts
        self.ledger = QueryLedger(site.root)
        self._tables: dict[str, tuple[tuple[int, int], pd.DataFrame, np.ndarray]] = {}
        self._declared_tables: dict[tuple[str, int, int, str, str], pd.DataFrame] = {}  # the last few, by persons
        self._lock = threading.Lock()
        self._budget_lock = threading.Lock()
        self.releases = ReleaseDesk(site, governance, self._table, self.ledger)

    def answer(self, blob: bytes | bytearray) -> bytes:
        started = time.monotonic()
        request = decode_query(blob)
        withheld: list[dict[str, str]] = []
        reply = self.reply(request, withheld)
        reply.seconds = time.monotonic() - started
        self.governance.audit.append(
            "query",
            query=request.query_id,
            project=request.project,
            researcher=request.researcher,
            dataset=request.dataset,
            text=request.text,
            statistic=str(request.kind),
            columns=list(request.columns),
            where=request.where,
            verdict=str(reply.status),
            reason=reply.reason,
            threshold=reply.threshold,
            released=_released(request, reply.table),
            ledger_withheld=withheld,
        )
        return encode_reply(reply)

    def reply(self, request: QueryRequest, withheld: list[dict[str, str]] | None = None) -> QueryReply:
        """What this site releases for ``request``: its answer, or a refusal in a sentence; ``withheld`` is given
        the sets its ledger withheld (each with the released set it came too close to)."""
        if request.kind in (QueryKind.RELEASE, QueryKind.RELEASES):  # the airlock: its own policy and audit records
            return self.releases.reply(request)
        name, policy = self.site.name, self.governance.policy
        facts = TaskFacts(request.project, request.researcher, request.dataset, source_hash="", kind="query")
        decision = decide(policy, facts)
        if not decision.allowed:
            return QueryReply(name, StepStatus.REFUSED, decision.reason)
        if request.dataset not in self.site.datasets:
            return QueryReply(name, StepStatus.NO_DATASET, f"{name} does not hold {request.dataset!r}")
        threshold = max(policy.threshold(request.project), request.threshold)
        try:
            table, keys = self._table(request.dataset)
            positions = dates = None
            if request.cohort and request.kind not in (QueryKind.COHORT, QueryKind.MOCK):
                table, keys, positions, dates = self._within(request, table, keys)
            if request.kind in MODELS and request.model.get("covariates") is not None:
                table = self._declared(request, table, positions, dates)
            if request.kind == QueryKind.MOCK:  # the site's threshold for the project: one mock, whatever is asked
                own = policy.threshold(request.project)
                return QueryReply(name, StepStatus.OK, threshold=own, table=self._mock(request, table, own))
            cohort = parse_filter(request.where, [str(c) for c in table.columns])
            formula = model_columns(request) if request.kind == QueryKind.GLM else ()
            formula += survival_columns(request.model) if request.kind == QueryKind.SURVIVAL else ()
            named = tuple(sorted(set(request.columns) | set(cohort.columns()) | set(formula)))
            if barred := query_columns_refused(policy, request.project, named):
                return QueryReply(name, StepStatus.REFUSED, barred, threshold)
            rows, index = (mask(cohort, table), None) if not request.circe else self._circe_rows(request, len(table))
            if request.kind == QueryKind.TOP:  # a row per (person, concept) of the persons asked
                table, keys, rows = self._concepts(request, table, keys, rows, positions, dates)
            found = policy.project(request.project)
            if request.kind in MODELS and found is not None and found.query_epsilon is not None:
                raise ModelRefused("this project's queries are answered under differential privacy here, and a "
                                   "model's statistics are exact: no model is fitted with this site")  # fmt: skip
            if found is not None and found.query_epsilon is not None:
                return self._privately(request, facts, table, rows, threshold, found.query_epsilon)
            scope = Scope(request.project, request.researcher, request.dataset)
            pending = self.ledger.pending(scope, keys, threshold, policy.noise(request.project))
            if withheld is not None:
                pending.withheld = withheld
            chosen = np.flatnonzero(rows)
            near = chosen.size >= threshold and pending.why(chosen, f"{request.text or request.where}: its rows")
            if near:
                return QueryReply(name, StepStatus.REFUSED, _too_close(name, threshold, near), threshold)
            if request.kind == QueryKind.COHORT:
                table_out = self._freeze(
                    request, rows, threshold, lambda asked: answer(asked, table, rows, threshold, pending), index
                )
            elif request.kind == QueryKind.GLM:
                alone, fraction = (found.model_alone, found.model_parameter_fraction) if found else (False, 0.2)
                table_out = answer_model(request, table, rows, threshold, pending, fraction, alone)
            elif request.kind == QueryKind.SURVIVAL:
                alone, fraction = (found.model_alone, found.model_parameter_fraction) if found else (False, 0.2)
                table_out = answer_survival(request.model, table, rows, threshold, pending, request.text, fraction,
                                            alone)  # fmt: skip
            elif request.kind == QueryKind.TOP:
                table_out = top_table(table, rows, request.limit, threshold, pending, request.text or "top")
            elif request.kind == QueryKind.HIST and request.columns == (INTENSITY,) and self._is_images(request):
                table_out = voxel_histogram(self._images(request.dataset, rows), request.edges, threshold)
            else:
                table_out = answer(request, table, rows, threshold, pending)
        except FlipError as exc:
            return QueryReply(name, StepStatus.REFUSED, f"{name}: {exc}", threshold)
        pending.commit()
        return QueryReply(name, StepStatus.OK, threshold=threshold, table=table_out)

    def _privately(
        self,
        request: QueryRequest,
        facts: TaskFacts,
        table: pd.DataFrame,
        rows: np.ndarray,
        threshold: int,
        per_query: float,
    ) -> QueryReply:
        """``request`` answered under differential privacy (``site_agent.queries.private``): the project's budget
        checked and charged first, then the answer, whatever it is (a refusal from the data costs the same)."""
        name, policy = self.site.name, self.governance.policy
        project = policy.project(request.project)
        assert project is not None and project.max_epsilon is not None, "decide() admits known projects only"
        try:
            check_bounds(request.kind, request.edges)
        except QueryRefused as exc:
            return QueryReply(name, StepStatus.REFUSED, f"{name}: {exc}", threshold)
        with self._budget_lock:  # checked and charged together: two queries at once cannot both pass the last of it
            spend = self.governance.ledger.spend(request.project, project.dp_delta, query=per_query)
            decision = decide(policy, replace(facts, dp_epsilon=per_query), budget=Budget(spend.spent, spend.after))
            if not decision.allowed:
                return QueryReply(name, StepStatus.REFUSED, decision.reason, threshold)
            self.governance.ledger.charge_query(request.project, request.query_id, per_query)
        try:
            if request.kind == QueryKind.COHORT:
                out = self._freeze(
                    request, rows, threshold, lambda asked: answer_privately(asked, table, rows, threshold, per_query)
                )
            else:
                out = answer_privately(request, table, rows, threshold, per_query)
        except FlipError as exc:
            return QueryReply(name, StepStatus.REFUSED, f"{name}: {exc}", threshold)
        out["private"].update(spent=spend.after, budget=project.max_epsilon)
        return QueryReply(name, StepStatus.OK, threshold=threshold, table=out)

    def _freeze(
        self,
        request: QueryRequest,
        rows: np.ndarray,
        threshold: int,
        count: Callable[[QueryRequest], dict[str, Any]],
        index: dict[int, str] | None = None,
    ) -> dict[str, Any]:
        """Freeze the cohort's rows here under its name (with their index dates, a Circe cohort's); what leaves is
        their count (``count`` answers the cohort asked as a count: through the ledger, or under differential
        privacy) and the cohort's hash."""
        size, limit = int(rows.sum()), self.governance.policy.cohort_limit_rows
        if limit is not None and size > limit:
            raise CohortRefused(
                f"cohort {request.cohort!r} would hold more rows than this site's limit for a cohort ({limit}); "
                "narrow its definition"
            )
        if size < threshold:
            raise CohortRefused(
                f"cohort {request.cohort!r} would hold fewer than {threshold} rows here, too few to count or train on"
            )
        entry = self.site.dataset(request.dataset)
        cohort = self.cohorts.freeze(
            request.project,
            request.cohort,
            request.dataset,
            request.where
            or (f"circe:sha256:{hashlib.sha256(request.circe.encode()).hexdigest()}" if request.circe else ""),
            entry.fingerprint,
            np.flatnonzero(rows).tolist(),
            index,
        )
        counted = count(replace(request, kind=QueryKind.COUNT, columns=()))
        return {**counted, "cohort": cohort.name, "hash": cohort.hash}

    def _within(
        self, request: QueryRequest, table: pd.DataFrame, keys: np.ndarray
    ) -> tuple[pd.DataFrame, np.ndarray, list[int], list[str] | None]:
        """The frozen cohort's rows of the table (with its index date's columns, a Circe cohort's), their keys, their
        positions in the whole table and their index dates (``site_agent.queries.characterise``)."""
        entry = self.site.dataset(request.dataset)
        cohort = self.cohorts.checked(request.project, request.cohort, request.dataset, entry.fingerprint)
        rows, index = list(cohort.rows), list(cohort.index) or None
        within, within_keys = within_cohort(table, keys, rows, index)
        return within, within_keys, rows, index

    def _declared(
        self, request: QueryRequest, table: pd.DataFrame, positions: list[int] | None, dates: list[str] | None
    ) -> pd.DataFrame:
        """The cohort's rows with the columns a covariate specification declares, built in the OMOP database at
        each person's index date (``site_agent.data.omop_features``), as a training task's table is."""
        entry = self.site.dataset(request.dataset)
        if entry.format != OMOP.name or positions is None or dates is None:
            raise QueryRefused("covariates are built at the index dates of a Circe cohort of an OMOP database")
        try:
            spec = read_covariates(request.model["covariates"])
        except ValueError as exc:
            raise QueryRefused(str(exc)) from None
        stat = Path(entry.path).stat()  # built once per fit, not at each of its steps (as the persons' table is read)
        persons = hashlib.sha256(json.dumps([positions, dates]).encode()).hexdigest()
        key = (request.dataset, stat.st_mtime_ns, stat.st_size, persons, canonical(spec))
        with self._lock:
            built = self._declared_tables.get(key)
        if built is None:
            built = build(Source.read(Path(entry.path)), spec, positions, dates)
            with self._lock:
                self._declared_tables = {
                    **dict(list(self._declared_tables.items())[-(DECLARED_KEPT - 1) :]),
                    key: built,
                }
        return table.assign(**{str(c): built[c].to_numpy() for c in built.columns})

    def _concepts(
        self,
        request: QueryRequest,
        table: pd.DataFrame,
        keys: np.ndarray,
        rows: np.ndarray,
        positions: list[int] | None,
        dates: list[str] | None,
    ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """``top``'s rows: each (person, concept) pair of the table's persons, keyed by the person's row key and the
        concept, selected where the person is; an OMOP database's only, never under differential privacy."""
        import pandas as pd

        entry = self.site.dataset(request.dataset)
        if entry.format != OMOP.name:
            raise QueryRefused(f"top counts an OMOP database's concepts; {request.dataset!r} is not one")
        found = self.governance.policy.project(request.project)
        if found is not None and found.query_epsilon is not None:
            raise QueryRefused("top is not answered under differential privacy: ask count, stats or hist")
        persons = positions if positions is not None else list(range(len(table)))
        source = Source.read(Path(entry.path))
        pairs = concept_persons(source, request.columns[0], persons, dates, TOP_WINDOW)
        person = pairs["person"].to_numpy(dtype=np.intp)
        pair_keys = self.ledger.keys(pd.DataFrame({"person": keys[person], "concept": pairs["concept_id"]}))
        return pairs, pair_keys, np.asarray(rows, dtype=bool)[person]

    def _circe_rows(self, request: QueryRequest, size: int) -> tuple[np.ndarray, dict[int, str]]:
        """The rows an OHDSI Circe definition selects, and each one's index date: rendered and run in the dataset's
        own database (an OMOP CDM, ``site_agent.data.omop``); a cohort only."""
        entry = self.site.dataset(request.dataset)
        if request.kind != QueryKind.COHORT or entry.format != OMOP.name:
            raise QueryRefused(f"a Circe definition makes a cohort of an OMOP database; {request.dataset!r} is not one")
        try:
            definition = json.loads(request.circe)
        except json.JSONDecodeError:
            raise QueryRefused("the Circe definition is not JSON") from None
        index = circe_persons(Source.read(Path(entry.path)), definition)
        rows = np.zeros(size, dtype=bool)
        rows[list(index)] = True
        return rows, index

    def _mock(self, request: QueryRequest, table: pd.DataFrame, threshold: int) -> dict[str, Any]:
        """The dataset's mock, made here under this threshold: the same one every time for the same file. An imaging
        dataset's carries the forms its images take, for the kernel to write (``site_agent.queries.image_mock``)."""
        entry = self.site.dataset(request.dataset)
        seed = int.from_bytes(hashlib.sha256(f"{self.site.name}|{entry.fingerprint}|{threshold}".encode()).digest()[:8])
        images: dict[str, Any] = {}
        if entry.format == IMAGES.name:
            index = json.loads(verified_bytes(self.site, request.dataset, open_file))
            mock, images = make_image_mock(index, table, threshold, seed)
        else:
            mock = make_mock(table, threshold, seed).head(MOCK_MAX_ROWS)  # rows drawn independently: any are a sample
        rows = mock.astype(object).where(mock.notna(), None).to_numpy().tolist()
        out = {"columns": [str(c) for c in mock.columns], "dtypes": [str(t) for t in mock.dtypes], "rows": rows}
        return {**out, "images": images} if images else out

    def _is_images(self, request: QueryRequest) -> bool:
        return self.site.dataset(request.dataset).format == IMAGES.name

    def _images(self, dataset: str, rows: np.ndarray) -> list[Path]:
        """The image files of the matching cases, each checked against its registered fingerprint first."""
        index = json.loads(verified_bytes(self.site, dataset, open_file))
        positions = np.flatnonzero(rows).tolist()
        try:
            verify_cases(index, positions)
        except ImageError as exc:
            raise QueryRefused(f"an image of dataset {dataset!r} changed since it was registered ({exc})") from None
        return [Path(index["cases"][i]["image"]) for i in positions]

    def _table(self, dataset: str) -> tuple[pd.DataFrame, np.ndarray]:
        """The dataset's whole table, read once, and again (checked against its fingerprint) when its file changes,
        with its rows' keys for the ledger."""
        stat = Path(self.site.dataset(dataset).path).stat()
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._tables.get(dataset)
            if cached is not None and cached[0] == key:
                return cached[1], cached[2]
        table = load_table(self.site, dataset)
        keys = self.ledger.keys(table)
        with self._lock:
            self._tables[dataset] = (key, table, keys)
        return table, keys


def _circe_text(definition: str) -> str:
    """What a cohort made by a Circe definition records as its definition: the definition's hash."""
    return f"circe:sha256:{hashlib.sha256(definition.encode()).hexdigest()}" if definition else ""


def _too_close(site: str, threshold: int, earlier: str) -> str:
    return (
        f"{site} refused this query: its cohort differs by fewer than {threshold} rows from rows whose count it "
        f"already released to this project or researcher ({earlier[:200]}); two answers that close could reveal "
        "single patients"
    )


def _released(request: QueryRequest, table: dict[str, Any]) -> dict[str, Any]:
    """What left, for the audit log: the released table itself, or a mock's shape (its rows are synthetic)."""
    if request.kind == QueryKind.MOCK and "rows" in table:
        forms = {"image_forms": table["images"]["forms"]} if "images" in table else {}  # released, not synthetic
        return {"mock_rows": len(table["rows"]), "columns": table["columns"], **forms}
    if request.kind == QueryKind.RELEASES:  # the items themselves: the airlock's own records say what left
        return {"states": {i: s.get("state") for i, s in table.get("requests", {}).items()}}
    return table
